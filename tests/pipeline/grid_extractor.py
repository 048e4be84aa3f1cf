"""A small, real, deterministic region extractor for the extraction tests (not a test module itself).

A seeded two-layer torch conv net over the image resized to a short side of 64, RoIAlign over a fixed grid
of boxes (plus the whole image), mean-pooled to ``dim`` features. It follows the region-extractor contract
of :class:`glied.extractors.Extractor` (``identity()``, ``extract()``, ``extract_given_boxes()``), boxes in original pixels.

Loaded by ``glied extract --extractor-module path/to/grid_extractor.py:make_extractor``; the environment
variable ``GRID_EXTRACTOR_DELAY`` (seconds per image) slows it down so a test can kill it mid-run.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch
import torchvision

from glied.errors import InputError
from glied.records import RegionFeatures


class GridRegionExtractor:
    def __init__(self, dim: int = 32, grid: int = 3, delay: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.grid, self.delay = dim, grid, delay
        self.max_aspect = 50.0
        self.w1 = torch.randn(16, 3, 3, 3, generator=g) * 0.2
        self.w2 = torch.randn(dim, 16, 3, 3, generator=g) * 0.2
        self.calls = 0

    def identity(self) -> dict:
        h = hashlib.sha256(self.w1.numpy().tobytes() + self.w2.numpy().tobytes()).hexdigest()[:16]
        return {"name": "test-grid", "config": {"dim": self.dim, "grid": self.grid, "short_side": 64},
                "weights_fingerprint": h, "feature_dim": self.dim}

    def _grid_boxes(self, w: int, h: int) -> np.ndarray:
        n = self.grid + (1 if h > w else 0)          # region count depends on the image: R varies
        xs, ys = np.linspace(0, w, n + 1), np.linspace(0, h, n + 1)
        b = [[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(n) for i in range(n)]
        return np.array([[0, 0, w, h]] + b, np.float32)

    @torch.no_grad()
    def _one(self, img: np.ndarray, boxes: np.ndarray) -> RegionFeatures:
        h, w = img.shape[:2]
        s = 64.0 / min(h, w)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        x = torch.nn.functional.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False)
        f = torch.relu(torch.nn.functional.conv2d(x, self.w1, padding=1))
        f = torch.relu(torch.nn.functional.conv2d(f, self.w2, padding=1))                # (1, D, h, w)
        rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes) * s], 1)    # (R, 5)
        feats = torchvision.ops.roi_align(f, rois, output_size=(4, 4), aligned=True).mean((2, 3))  # (R, D)
        r = len(boxes)
        score = feats[:, 0].sigmoid().numpy()
        if self.delay:
            time.sleep(self.delay)
        self.calls += 1
        return RegionFeatures(boxes=boxes.astype(np.float32), features=feats.numpy().astype(np.float32),
                              obj_ids=np.arange(r, dtype=np.int64) % 5, obj_scores=score.astype(np.float32),
                              attr_ids=np.arange(r, dtype=np.int64) % 3,
                              attr_scores=(1 - score).astype(np.float32), image_w=w, image_h=h)

    def extract(self, images: list[np.ndarray]) -> list[RegionFeatures]:
        for k, im in enumerate(images):              # like the bottom-up detector: refuse a sliver of an image
            h, w = im.shape[:2]
            if max(h, w) > self.max_aspect * min(h, w):
                raise InputError(f"image {k}: {w}x{h} is too elongated (crop or pad the image)")
        return [self._one(im, self._grid_boxes(im.shape[1], im.shape[0])) for im in images]

    def extract_given_boxes(self, image: np.ndarray, boxes) -> RegionFeatures:
        """One image, exactly the given (N, 4) boxes (the bottom-up extractor's signature)."""
        return self._one(image, np.asarray(boxes, np.float32).reshape(-1, 4))


class WordExtractor:
    """A deterministic attribute-word predictor (mean colour -> word probabilities) for the cache tests."""

    vocab = ["red", "green", "blue", "dark", "bright"]

    def __init__(self, top_k: int = 3):
        self.top_k = top_k

    def identity(self) -> dict:
        return {"name": "test-words", "config": {"rule": "mean-colour"}, "weights_fingerprint": "none"}

    def extract(self, images):
        from glied.records import AttributeWords

        out = []
        for im in images:
            b, g, r = (im.reshape(-1, 3).mean(0) / 255.0).tolist()
            p = np.array([r, g, b, 1 - (r + g + b) / 3, (r + g + b) / 3], np.float32)
            order = np.argsort(-p, kind="stable")[: self.top_k]
            out.append(AttributeWords(word_ids=order.astype(np.int64), probs=p[order],
                                      word_map=np.ones((len(self.vocab), 2, 2), np.float32)))
        return out


def make_extractor(weights=None, device="cpu", precision="fp32"):
    """Factory for ``--extractor-module``: ignores weights; delay from $GRID_EXTRACTOR_DELAY."""
    torch.set_num_threads(1)
    return GridRegionExtractor(delay=float(os.environ.get("GRID_EXTRACTOR_DELAY", "0")))
