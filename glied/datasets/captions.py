"""Prepared captions joined with cached region features and attribute words, batched with padding masks.

The decoder reads features through :class:`FeatureSource`, the read contract of the feature cache
(``glied.datasets.cache.FeatureCache``): ``.manifest``, ``.ids()``, ``id in source``, ``.regions(id)``,
``.attributes(id)``. Anything with those members works (tests use an in-memory one).

One dataset item is one image with all its captions; :func:`collate` pads regions (10..100 per image),
attribute words and captions and returns boolean masks (True = real entry).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from glied.errors import ConfigError, InputError
from glied.records import AttributeWords, RegionFeatures
from glied.tokens import UNK



@runtime_checkable
class FeatureSource(Protocol):
    """What the decoder needs from a feature cache."""

    manifest: dict

    def ids(self) -> Iterable[str]: ...

    def __contains__(self, image_id: object) -> bool: ...

    def regions(self, image_id: str) -> RegionFeatures: ...

    def attributes(self, image_id: str) -> Optional[AttributeWords]: ...


#: box-geometry columns appended to each region's features when a decoder reads box positions
GEOMETRY_DIMS = 5


def region_matrix(reg: RegionFeatures, box_geometry: bool = False) -> np.ndarray:
    """The decoder's input rows for one image's regions: (R, D) float32 features, or (R, D + 5) with the
    box geometry (x1/W, y1/H, x2/W, y2/H, box area / image area) appended, so the decoder sees where each
    region lies (RoI-pooled features alone carry no absolute position). Always a writable copy."""
    feats = np.array(reg.features, dtype=np.float32)  # (R, D)
    if not box_geometry:
        return feats
    w, h = float(max(reg.image_w, 1)), float(max(reg.image_h, 1))
    b = np.asarray(reg.boxes, dtype=np.float32).reshape(-1, 4)  # (R, 4) x1 y1 x2 y2 pixels
    geo = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                    (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)], axis=1)  # (R, 5)
    return np.concatenate([feats, np.clip(geo, 0.0, 1.0).astype(np.float32)], axis=1)  # (R, D + 5)


def attribute_vocab_map(attr_vocab: Optional[list[str]], wtoi: dict[str, int]) -> np.ndarray:
    """Cache attribute-vocabulary index -> caption-vocabulary id (out-of-vocabulary words -> <unk>)."""
    return np.array([wtoi.get(w, UNK) for w in (attr_vocab or [])], dtype=np.int64)


class CaptionDataset(torch.utils.data.Dataset):
    """Images of one split of prepared data with their features.

    Args:
        data: a :class:`glied.datasets.prepared.PreparedData`.
        features: a :class:`FeatureSource`.
        split: "train", "val" or "test".
        max_attrs: keep at most this many attribute words per image (best first); None keeps all.
        captions_per_image: if set, each access returns that many of the image's captions drawn at random
            (torch RNG, so a seeded epoch is reproducible); None returns all of them.
        box_geometry: append each region's box geometry to its features (see :func:`region_matrix`).
        where: name of the cache for error messages.

    Raises InputError if any image of the split is missing from the cache (naming the ids and the cache).
    """

    def __init__(self, data: Any, features: FeatureSource, split: str, max_attrs: Optional[int] = None,
                 where: str = "feature cache", captions_per_image: Optional[int] = None,
                 box_geometry: bool = False) -> None:
        self.data, self.features, self.split, self.max_attrs = data, features, split, max_attrs
        self.box_geometry = box_geometry
        self.captions_per_image = captions_per_image
        self.indices = data.split_indices(split)
        if not self.indices:
            raise InputError(f"{data.root}: the {split} split is empty")
        self.ids = [data.images[i]["id"] for i in self.indices]
        missing = [i for i in self.ids if i not in features]
        if missing:
            damaged = [i for i in missing if i in getattr(features, "damaged", {})]
            if damaged:
                raise InputError(f"{where}: {len(damaged)} {split} images have damaged cache entries (e.g. "
                                 f"{damaged[0]}: {features.damaged[damaged[0]]}); run `glied verify-cache "
                                 f"{where} --repair`, then `glied extract` into it again")
            raise InputError(f"{where}: {len(missing)} of {len(self.ids)} {split} images are missing from "
                             "the "
                             f"feature cache (e.g. {', '.join(map(str, missing[:3]))}); extract features for "
                             "every image of the prepared data first (`glied extract`)")
        empty = [i for i in self.ids if _num_regions(features, i) == 0]
        if empty:
            raise InputError(f"{where}: {len(empty)} {split} images have no regions in the feature cache (e.g. "
                             f"{', '.join(map(str, empty[:3]))}); the decoder needs at least one region per "
                             "image: drop them from the prepared data or extract them with another detector")
        attr_identity = features.manifest.get("attributes") or {}
        self.attr_map = attribute_vocab_map(attr_identity.get("vocab"), data.wtoi)
        self.max_length = int(data.labels.shape[1])
        order = np.argsort(data.image_index, kind="stable")
        starts = np.searchsorted(data.image_index[order], np.arange(len(data.images) + 1))
        self._rows = [order[starts[i]:starts[i + 1]] for i in self.indices]  # label rows per item

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        reg = self.features.regions(image_id)
        feats = region_matrix(reg, self.box_geometry)  # (R, D[+5]) a writable copy (cache arrays are read-only)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise InputError(f"feature cache: image {image_id} has no regions (features shape {feats.shape})")
        attrs = self.features.attributes(image_id)
        if attrs is None or len(attrs) == 0:
            a_ids, a_probs = np.zeros(0, np.int64), np.zeros(0, np.float32)
        else:
            word_ids = np.array(attrs.word_ids, dtype=np.int64)
            a_ids = self.attr_map[word_ids] if len(self.attr_map) else np.full(len(word_ids), UNK)
            a_probs = np.array(attrs.probs, dtype=np.float32)
            if self.max_attrs is not None:
                a_ids, a_probs = a_ids[: self.max_attrs], a_probs[: self.max_attrs]
        rows = self._rows[i]
        if self.captions_per_image is not None and len(rows) > self.captions_per_image:
            rows = rows[torch.randperm(len(rows))[: self.captions_per_image].numpy()]
        return {"index": i, "regions": torch.from_numpy(feats), "attr_ids": torch.from_numpy(a_ids),
                "attr_probs": torch.from_numpy(a_probs),
                "captions": torch.from_numpy(self.data.labels[rows].astype(np.int64))}


def _num_regions(features: FeatureSource, image_id: str) -> int:
    """Regions of one image; from the cache index when the source has one (no data read)."""
    n = getattr(features, "num_regions", None)
    return n(image_id) if n is not None else len(features.regions(image_id).features)


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of dataset items into a batch.

    Returns: index (B,), regions (B, Rmax, D), region_mask (B, Rmax) bool, attr_ids (B, Kmax), attr_probs
    (B, Kmax), attr_mask (B, Kmax) bool, captions (B, Smax, L) with L the longest caption of the batch
    (missing caption slots all <pad>).
    """
    b = len(items)
    r_max = max(it["regions"].shape[0] for it in items)
    d = items[0]["regions"].shape[1]
    k_max = max(it["attr_ids"].shape[0] for it in items)
    s_max = max(it["captions"].shape[0] for it in items)
    # trim caption columns to the longest real caption of the batch (saves decoding pad positions)
    length = max(1, max(int((it["captions"] != 0).sum(1).max()) if it["captions"].numel() else 0
                        for it in items))
    regions = torch.zeros(b, r_max, d)
    region_mask = torch.zeros(b, r_max, dtype=torch.bool)
    attr_ids = torch.zeros(b, k_max, dtype=torch.long)
    attr_probs = torch.zeros(b, k_max)
    attr_mask = torch.zeros(b, k_max, dtype=torch.bool)
    captions = torch.zeros(b, s_max, length, dtype=torch.long)
    for j, it in enumerate(items):
        r, k, s = it["regions"].shape[0], it["attr_ids"].shape[0], it["captions"].shape[0]
        if it["regions"].shape[1] != d:
            raise ConfigError(f"feature dimension differs inside one batch ({d} vs {it['regions'].shape[1]})")
        regions[j, :r], region_mask[j, :r] = it["regions"], True
        attr_ids[j, :k], attr_probs[j, :k], attr_mask[j, :k] = it["attr_ids"], it["attr_probs"], True
        captions[j, :s] = it["captions"][:, :length]
    return {"index": torch.tensor([it["index"] for it in items]), "regions": regions,
            "region_mask": region_mask,
            "attr_ids": attr_ids, "attr_probs": attr_probs, "attr_mask": attr_mask, "captions": captions}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(regions, region_mask, attr_ids, attr_probs, attr_mask) of a collated batch, on ``device``."""
    keys = ("regions", "region_mask", "attr_ids", "attr_probs", "attr_mask")
    return tuple(batch[k].to(device) for k in keys)
