"""EXPERIMENTS ONLY: a feature source for the shapes world built from the ground-truth boxes, not from images.

It implements the decoder's FeatureSource read contract (manifest, ids, __contains__, regions, attributes) so the
training recipe can be tuned before the real bottom-up extractor and MIL detector exist. Numbers obtained with it
are NOT results of the pipeline: label them "oracle box features".

Region feature = ReLU(P [one-hot shape; one-hot colour; one-hot size; box geometry] + noise), P a fixed random
(2048 x 21) projection; plus 2-4 background regions of noise. Attribute words: every colour/shape/size word with a
probability (present words ~U(0.6, 1), absent ~U(0, 0.4)), top-k best first, so absent words appear too.

    python benchmarks/shapes_box_features.py WORLD_DIR   # prints one image's records
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from glied.records import AttributeWords, RegionFeatures


class ShapesBoxFeatures:
    def __init__(self, world: str | Path, dim: int = 2048, top_k: int = 10, noise: float = 0.3, seed: int = 0):
        inst = json.loads((Path(world) / "instances.json").read_text())
        self.cats = {c["id"]: c["name"] for c in inst["categories"]}
        self.attrs = {a["id"]: a["name"] for a in inst["attributes"]}
        self.vocab = [self.cats[k] for k in sorted(self.cats)] + [self.attrs[k] for k in sorted(self.attrs)]
        self.images = {str(im["id"]): im for im in inst["images"]}
        self.anns: dict[str, list] = {k: [] for k in self.images}
        for a in inst["annotations"]:
            self.anns[str(a["image_id"])].append(a)
        self.n_in = len(self.cats) + len(self.attrs) + 4
        rng = np.random.default_rng(seed)
        self.proj = rng.normal(0, 1.0, (self.n_in, dim)).astype(np.float32)
        self.dim, self.top_k, self.noise, self.seed = dim, top_k, noise, seed
        self.path = f"oracle-box-features:{world}"
        self.manifest = {
            "format_version": 1, "dtype": "float32",
            "extractor": {"name": "shapes-oracle-boxes", "config": {"noise": noise, "seed": seed},
                          "weights_fingerprint": "none", "feature_dim": dim},
            "attributes": {"name": "shapes-oracle-words", "config": {"seed": seed}, "vocab": self.vocab,
                           "top_k": top_k},
        }

    def ids(self) -> list[str]:
        return list(self.images)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self.images

    def _rng(self, image_id: str, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(image_id), salt])

    def regions(self, image_id: str) -> RegionFeatures:
        im, anns = self.images[image_id], self.anns[image_id]
        rng = self._rng(image_id, 1)
        w, h = im["width"], im["height"]
        rows, boxes = [], []
        nc = len(self.cats)
        for a in anns:
            v = np.zeros(self.n_in, np.float32)
            v[a["category_id"] - 1] = 1
            for aid in a["attribute_ids"]:
                v[nc + aid] = 1
            x, y, bw, bh = a["bbox"]
            v[-4:] = [x / w, y / h, (x + bw) / w, (y + bh) / h]
            rows.append(v)
            boxes.append([x, y, x + bw, y + bh])
        for _ in range(int(rng.integers(2, 5))):  # background regions
            v = np.zeros(self.n_in, np.float32)
            x1, y1 = rng.uniform(0, 0.7, 2)
            v[-4:] = [x1, y1, x1 + 0.3, y1 + 0.3]
            rows.append(v)
            boxes.append([x1 * w, y1 * h, (x1 + 0.3) * w, (y1 + 0.3) * h])
        order = rng.permutation(len(rows))
        x = np.stack(rows)[order] @ self.proj  # (R, dim)
        feats = np.maximum(x + rng.normal(0, self.noise, x.shape), 0).astype(np.float32)
        r = len(rows)
        return RegionFeatures(np.asarray(boxes, np.float32)[order], feats, np.zeros(r, np.int64),
                              np.ones(r, np.float32), np.zeros(r, np.int64), np.ones(r, np.float32), w, h)

    def attributes(self, image_id: str) -> AttributeWords:
        rng = self._rng(image_id, 2)
        present = set()
        for a in self.anns[image_id]:
            present.add(self.cats[a["category_id"]])
            present.update(a["attributes"])
        p = np.array([rng.uniform(0.6, 1.0) if wd in present else rng.uniform(0.0, 0.4) for wd in self.vocab],
                     np.float32)
        order = np.argsort(-p)[: self.top_k]
        return AttributeWords(order.astype(np.int64), p[order])


if __name__ == "__main__":
    src = ShapesBoxFeatures(sys.argv[1])
    i = src.ids()[0]
    print(src.regions(i).features.shape, src.attributes(i))
