"""What the decoder is given: how well a feature cache's regions cover a shapes world's objects.

For every photo of a split, matches the cached regions to the ground-truth boxes of instances.json (IoU):
objects found (a region with IoU >= 0.5), objects found twice or more (duplicate regions), regions on no
object (IoU < 0.3 with all), the class of the best region of each object (and the photos where every
object's best region has its class), and the number of regions.

    python benchmarks/region_coverage.py WORLD CACHE [--split test|all] [--detector RUN] [--captions CAPTIONS.json]

The class names come from the cache manifest or, where it has none, from the detector run (--detector).
--captions (e.g. the demo's captions/unseen_captions.json, with WORLD its unseen_world and CACHE that world
extracted by the same detector): the share of photos named exactly (benchmarks/score_naming.py's scorer),
separately for the photos where every object's best region has its class and for the others, which tells the
decoder's errors from those of the regions it was given.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from glied.datasets.cache import FeatureCache


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) x1y1x2y2 -> (N, M)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world")
    ap.add_argument("cache")
    ap.add_argument("--split", default="test", help="train, val, test, or all")
    ap.add_argument("--detector", help="the detector run or checkpoint that made the cache (for its class names)")
    ap.add_argument("--captions", help="captions of the photos (JSON [{file_name, caption}]): naming split by "
                                       "whether the regions are right")
    a = ap.parse_args()
    inst = json.loads((Path(a.world) / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    gts: dict[int, list] = {}
    for ann in inst["annotations"]:
        x, y, w, h = ann["bbox"]
        gts.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], cats[ann["category_id"]]))
    cache = FeatureCache.open(a.cache)
    names = list((cache.manifest.get("extractor") or {}).get("classes") or [])
    if not names and a.detector:
        from glied.extractors.bottomup.weights import checkpoint_vocab, load_checkpoint
        det = Path(a.detector)
        names = checkpoint_vocab(load_checkpoint(det / "checkpoint.pt" if det.is_dir() else det))["class_names"]
    stats = Counter()
    n_regions = []
    per_n = {}
    regions_right: dict[int, bool] = {}
    for im in inst["images"]:
        if a.split != "all" and im.get("split", a.split) != a.split:
            continue
        reg = cache.regions(str(im["id"]))
        boxes = np.asarray(reg.boxes, np.float32)
        g = np.array([b for b, _ in gts[im["id"]]], np.float32)
        m = iou(g, boxes)  # (G, R)
        n_regions.append(len(boxes))
        hits = (m >= 0.5).sum(1)
        stats["objects"] += len(g)
        stats["found"] += int((hits >= 1).sum())
        stats["duplicated"] += int((hits >= 2).sum())
        stats["background_regions"] += int((m.max(0) < 0.3).sum())
        best = m.argmax(1)
        all_right = bool(names)
        for k, (_, cls) in enumerate(gts[im["id"]]):
            right = bool(hits[k]) and bool(names) and names[int(reg.obj_ids[best[k]])] == cls
            stats["class_right"] += int(right)
            all_right &= right
        stats["images_all_right"] += all_right
        regions_right[im["id"]] = all_right
        all_found = bool((hits >= 1).all())
        row = per_n.setdefault(len(g), [0, 0])
        row[0] += all_found
        row[1] += 1
        stats["images"] += 1
        stats["images_all_found"] += all_found
    print(f"{a.split}: {stats['images']} photos, {stats['objects']} objects")
    print(f"  regions per photo: mean {np.mean(n_regions):.1f}, min {min(n_regions)}, max {max(n_regions)}")
    print(f"  objects found (IoU>=0.5): {stats['found'] / stats['objects']:.3f}; photos with all found: "
          f"{stats['images_all_found'] / stats['images']:.3f} "
          f"({', '.join(f'{n} obj: {c}/{t}' for n, (c, t) in sorted(per_n.items()))})")
    print(f"  objects with >= 2 regions: {stats['duplicated'] / stats['objects']:.3f}; "
          f"regions on no object (IoU<0.3): {stats['background_regions'] / sum(n_regions):.3f}")
    if names:
        print(f"  best region's class right: {stats['class_right'] / max(stats['found'], 1):.3f}; photos where every "
              f"object is found and its best region has its class: {stats['images_all_right'] / stats['images']:.3f} "
              f"(what the regions' own labels support for naming every shape)")
    if a.captions:
        named_split(inst, a.captions, regions_right)


def named_split(inst: dict, captions: str, regions_right: dict[int, bool]) -> None:
    """Photos named exactly, among those whose regions are right (every object's best region has its class)
    and among the others."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from score_naming import parse, truth_and_patterns

    truth, pats = truth_and_patterns(inst)
    caps = {r["file_name"]: r["caption"] for r in json.loads(Path(captions).read_text())}
    counts = {True: [0, 0], False: [0, 0]}  # regions right -> [named, photos]
    for im in inst["images"]:
        if im["id"] not in regions_right or im["file_name"] not in caps:
            continue
        row = counts[regions_right[im["id"]]]
        row[0] += parse(caps[im["file_name"]], pats) == truth[im["id"]]
        row[1] += 1
    (a, b), (c, d) = counts[True], counts[False]
    print(f"  named exactly ({captions}): {a + c} of {b + d} photos; {a} of the {b} whose regions are right, "
          f"{c} of the {d} others")


if __name__ == "__main__":
    main()
