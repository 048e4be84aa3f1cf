"""Tiny prepared data + an in-memory feature source implementing the decoder's FeatureSource contract.

Not a test module (no test_ prefix): test files and the DDP worker script load it by path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from glied.records import AttributeWords, RegionFeatures

COLOURS = ["red", "blue", "green"]
SHAPES = ["circle", "square", "star"]


def make_prepared(root: Path, n_images: int = 36, seed: int = 0) -> Path:
    """Write a Karpathy json of synthetic captions and prepare it into root/prep; returns the prep dir."""
    from glied.datasets.prepared import PrepareConfig, prepare

    rng = np.random.default_rng(seed)
    images = []
    objects = {}
    for i in range(n_images):
        k = int(rng.integers(1, 3))
        objs = [(COLOURS[int(rng.integers(3))], SHAPES[int(rng.integers(3))]) for _ in range(k)]
        objects[str(i)] = objs
        phrases = [f"a {c} {s}" for c, s in objs]
        sents = [" and ".join(phrases), "there is " + " and ".join(phrases), " and ".join(reversed(phrases))]
        split = "train" if i < n_images * 2 // 3 else ("val" if i < n_images * 5 // 6 else "test")
        images.append({"filepath": "images", "filename": f"{i:06d}.jpg", "cocoid": i, "imgid": i, "split": split,
                       "sentids": [3 * i + j for j in range(3)],
                       "sentences": [{"raw": s, "tokens": s.split(), "imgid": i, "sentid": 3 * i + j}
                                     for j, s in enumerate(sents)]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    (root / "objects.json").write_text(json.dumps(objects))
    prepare(root / "captions.json", root / "prep", PrepareConfig(count_threshold=0, max_length=12))
    return root / "prep"


class MemoryFeatures:
    """In-memory FeatureSource: regions are noisy projections of (colour, shape) one-hots, 2..5 regions per
    image (so batches need padding); attribute words come from a vocab with one word outside the captions."""

    def __init__(self, root: Path, dim: int = 32, name: str = "memory", drop: tuple[str, ...] = ()):
        self.objects = json.loads((root / "objects.json").read_text())
        for d in drop:
            self.objects.pop(d)
        self.vocab = COLOURS + SHAPES + ["zebra"]
        self.dim = dim
        self.proj = np.random.default_rng(1).normal(size=(6, dim)).astype(np.float32)
        self.path = f"memory:{root}"
        self.manifest = {"format_version": 1, "dtype": "float32",
                         "extractor": {"name": name, "config": {}, "weights_fingerprint": "x", "feature_dim": dim},
                         "attributes": {"name": "words", "config": {}, "vocab": self.vocab, "top_k": 4}}

    def ids(self):
        return list(self.objects)

    def __contains__(self, image_id):
        return image_id in self.objects

    def regions(self, image_id):
        objs = self.objects[image_id]
        rng = np.random.default_rng(int(image_id))
        rows = []
        for c, s in objs:
            v = np.zeros(6, np.float32)
            v[COLOURS.index(c)] = 1
            v[3 + SHAPES.index(s)] = 1
            rows.append(v)
        rows += [np.zeros(6, np.float32)] * (2 + int(image_id) % 3)  # background
        f = np.maximum(np.stack(rows) @ self.proj + 0.1 * rng.normal(size=(len(rows), self.dim)), 0)
        r = len(rows)
        return RegionFeatures(np.zeros((r, 4), np.float32), f.astype(np.float32), np.zeros(r, np.int64),
                              np.ones(r, np.float32), np.zeros(r, np.int64), np.ones(r, np.float32), 64, 64)

    def attributes(self, image_id):
        words = {w for o in self.objects[image_id] for w in o}
        p = np.array([0.9 if w in words else 0.1 for w in self.vocab], np.float32)
        order = np.argsort(-p, kind="stable")[:4]
        return AttributeWords(order.astype(np.int64), p[order])


def tiny_config(**kw):
    from glied.pipeline.train import DecoderTrainConfig

    base = dict(model="glied", epochs=1, scst_epochs=0, stage="both", batch_size=8, lr=2e-3, warmup_steps=0,
                d_model=32, d_embed=16, n_heads=4, scst_samples=2, scst_lr=1e-3)
    base.update(kw)
    return DecoderTrainConfig(**base)


def write_cache(path, feats):
    """Write an in-memory feature source (e.g. :class:`MemoryFeatures`) into a real feature cache at ``path``."""
    from glied.datasets.cache import CacheWriter, make_manifest

    m = make_manifest(feats.manifest["extractor"], "float16", feats.manifest["attributes"])
    with CacheWriter(path, m) as w:
        for i in feats.ids():
            w.put(i, feats.regions(i), feats.attributes(i))
    return path
