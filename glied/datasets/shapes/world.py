"""Write a shapes world: images, COCO detection ``instances.json`` and Karpathy ``captions.json``.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same seed gives the same
bytes whatever the number of worker processes, and a world of N images is a prefix of a world of M > N images
(apart from the split of the last images).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from glied.datasets.shapes.grammar import captions_for
from glied.datasets.shapes.render import COLOURS, SHAPES, SIZES, render_scene, sample_scene
from glied.errors import ConfigError
from glied.fileio import write_atomic, write_json_atomic

FORMAT_VERSION = 3  # 2: captions mention objects in reading order; 3: no object more than mildly hidden


@dataclass(frozen=True)
class ShapesConfig:
    """Settings of a shapes world. ``val_fraction``/``test_fraction`` of images go to val/test."""

    n_images: int = 1000
    seed: int = 0
    size: int = 128
    max_objects: int = 4
    captions_per_image: int = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    jpeg_quality: int = 92

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.n_images < 1:
            raise ConfigError(f"--count must be at least 1 (got {self.n_images})")
        if not 64 <= self.size <= 1024:
            raise ConfigError(f"--size must be between 64 and 1024 pixels (got {self.size})")
        if not 1 <= self.max_objects <= 4:
            raise ConfigError(f"max_objects must be 1..4 (got {self.max_objects})")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction + test_fraction must be below 1")


ATTRIBUTES = [(name, "colour") for name in COLOURS] + [(name, "size") for name in SIZES]
ATTR_INDEX = {name: i for i, (name, _) in enumerate(ATTRIBUTES)}


def _split_of(i: int, cfg: ShapesConfig) -> str:
    """Deterministic split from a hash of (seed, i): val/test get their fractions, the rest is train."""
    u = np.random.default_rng([cfg.seed, i, 7919]).random()
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def _make_one(args: tuple[int, ShapesConfig, str]) -> dict:
    """Render image ``i``, write its JPEG, return its objects and captions (runs in a worker)."""
    i, cfg, image_dir = args
    rng = np.random.default_rng([cfg.seed, i])
    objects = sample_scene(rng, cfg.size, cfg.max_objects)
    img = render_scene(rng, cfg.size, objects)
    caps = captions_for(objects, rng, cfg.size, cfg.captions_per_image)
    name = f"{i:06d}.jpg"
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
    if not ok:
        raise RuntimeError(f"could not encode image {i}")
    path = os.path.join(image_dir, name)
    write_atomic(path, lambda tmp: buf.tofile(tmp))
    return {
        "i": i,
        "file_name": name,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "box": [round(v, 2) for v in o.box]}
            for o in objects
        ],
        "captions": caps,
        "split": _split_of(i, cfg),
    }


def make_shapes(out_dir: str | os.PathLike, cfg: ShapesConfig, workers: int | None = None,
                progress: bool = False) -> dict:
    """Render ``cfg.n_images`` scenes into ``out_dir`` and write the two annotation files.

    Returns a summary dict (counts per split, number of objects). The json files are written atomically
    after every image exists, so an interrupted run leaves no half-valid annotation file.
    """
    cfg.validate()
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(i, cfg, str(image_dir)) for i in range(cfg.n_images)]
    if workers > 1 and cfg.n_images >= 64:
        with ProcessPoolExecutor(workers) as pool:
            items = list(pool.map(_make_one, jobs, chunksize=64))
    else:
        items = [_make_one(j) for j in jobs]

    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    cat_id = {s: k + 1 for k, s in enumerate(SHAPES)}
    attributes = [{"id": k, "name": n, "type": t} for k, (n, t) in enumerate(ATTRIBUTES)]
    images, annotations, kimages = [], [], []
    ann_id, sent_id = 1, 0
    for it in items:
        i = it["i"]
        images.append({"id": i, "file_name": it["file_name"], "width": cfg.size, "height": cfg.size,
                       "split": it["split"]})
        for o in it["objects"]:
            x1, y1, x2, y2 = o["box"]
            annotations.append({
                "id": ann_id, "image_id": i, "category_id": cat_id[o["shape"]],
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                "attribute_ids": [ATTR_INDEX[o["colour"]], ATTR_INDEX[o["size"]]],
                "attributes": [o["colour"], o["size"]],
            })
            ann_id += 1
        sentences = []
        for raw in it["captions"]:
            sentences.append({"raw": raw, "tokens": raw.split(), "imgid": i, "sentid": sent_id})
            sent_id += 1
        kimages.append({"filepath": "images", "filename": it["file_name"], "cocoid": i, "imgid": i,
                        "split": it["split"], "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences})
    info = {"description": "glied synthetic shapes world", "version": FORMAT_VERSION, "config": cfg.to_dict()}
    write_json_atomic(out / "instances.json", {"info": info, "images": images, "annotations": annotations,
                                          "categories": categories, "attributes": attributes})
    write_json_atomic(out / "captions.json", {"dataset": "shapes", "info": info, "images": kimages})
    splits = {s: sum(1 for im in images if im["split"] == s) for s in ("train", "val", "test")}
    return {"images": len(images), "objects": len(annotations), "splits": splits, "out": str(out)}
