"""How high can a word mAP go on the shapes world? An oracle that knows each scene's contents.

Many shapes-world caption words are drawn at random by the caption grammar ("we see", "a scene with", which
pair of objects a relation names), so no image model can predict them. This script fits, per vocabulary word,
a gradient-boosted classifier on the TRUE scene contents over the training split and reports its word AP /
mAP on a held-out split: an estimate of the ceiling for the MIL detector's all-word mAP, computed with the
same vocabulary, labels and metric as `glied evaluate-attributes`.

The scene contents are the counts of each shape, colour and size and the number of objects, plus what else the
grammar reads off the scene (and the photo shows): per shape, the largest number of its objects sharing one
colour (the grammar counts identical objects: "two red circles"); and the geometry: for a single object
whether it sits left, right or in the middle, for several how many ordered pairs stand in each relation (left
of / right of / above / below / next to, by the grammar's own rule on the boxes' centres and half-sizes).
Without these (``--no-geometry``: counts only, the first version of this estimate) plural and relation words
("circles", "left", "above", ...) look random although they are not, and the ceiling comes out too low.

Usage: python benchmarks/mil_word_ceiling.py PREP [--split test] [--vocab-size 1000] [--no-geometry]
(PREP: prepared data of a shapes world; instances.json is read next to its captions file.)
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier

from glied.datasets.prepared import PreparedData
from glied.datasets.shapes.grammar import relation
from glied.datasets.shapes.render import SceneObject
from glied.extractors.mil.evaluate import word_metrics
from glied.pipeline.attributes import concept_groups
from glied.extractors.mil.vocab import build_labels, build_vocab


RELATIONS = ("to the left of", "to the right of", "above", "below", "next to")


def _geometry(anns: list[dict], size: float) -> list[float]:
    """Single object: one-hot left / middle / right (the grammar's thirds); several: the number of ordered
    pairs in each of ``RELATIONS`` (boxes' centres; half the larger box side as the radius)."""
    objs = []
    for a in anns:
        x, y, w, h = a["bbox"]
        objs.append(SceneObject("", "", "", x + w / 2, y + h / 2, max(w, h) / 2, 0.0, (x, y, x + w, y + h)))
    out = [0.0] * (3 + len(RELATIONS))
    if len(objs) == 1:
        cx = objs[0].cx
        out[0 if cx < 0.4 * size else (2 if cx > 0.6 * size else 1)] = 1.0
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i != j:
                out[3 + RELATIONS.index(relation(a, b))] += 1.0
    return out


def scene_features(prep: PreparedData, geometry: bool = True) -> np.ndarray:
    inst = json.loads((Path(prep.manifest["source"]).parent / "instances.json").read_text())
    sizes = {int(im["id"]): float(im["width"]) for im in inst["images"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    names = sorted(set(cats.values())) + [a["name"] for a in inst["attributes"]]
    per_image: dict[int, list] = {}
    for a in inst["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    shapes = sorted(set(cats.values()))
    n_geo = len(shapes) + 3 + len(RELATIONS) if geometry else 0
    feats = np.zeros((len(prep.images), len(names) + 6 + n_geo))
    for i, im in enumerate(prep.images):
        anns = per_image.get(int(im["id"]), [])
        c = Counter(cats[a["category_id"]] for a in anns) + Counter(t for a in anns for t in a["attributes"])
        for k, n in c.items():
            feats[i, names.index(k)] = n
        feats[i, len(names) + min(len(anns), 5)] = 1
        if geometry:
            same = Counter((cats[a["category_id"]], tuple(a["attributes"][:1])) for a in anns)  # (shape, colour)
            groups = [max([n for (sh, _), n in same.items() if sh == s] or [0]) for s in shapes]
            feats[i, len(names) + 6:] = groups + _geometry(anns, sizes.get(int(im["id"]), 128.0))
    return feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prep")
    ap.add_argument("--split", default="test")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--no-geometry", action="store_true", help="leave the scene's geometry out (too low a ceiling)")
    a = ap.parse_args()
    prep = PreparedData.load(a.prep)
    tr, te = prep.split_indices("train"), prep.split_indices(a.split)
    vocab = build_vocab([prep.images[i]["sentences"] for i in tr], a.vocab_size)
    ls_tr = build_labels([prep.images[i]["sentences"] for i in tr], vocab)
    ls_te = build_labels([prep.images[i]["sentences"] for i in te], vocab)
    y_tr, y_te = ls_tr.labels, ls_te.labels
    x = scene_features(prep, geometry=not a.no_geometry)
    x_tr, x_te = x[[tr[k] for k in ls_tr.keep]], x[[te[k] for k in ls_te.keep]]  # rows of the labelled images
    scores = np.zeros(y_te.shape)
    for j in range(len(vocab)):
        if y_tr[:, j].min() == y_tr[:, j].max():
            scores[:, j] = y_tr[0, j]
        else:
            clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0)
            scores[:, j] = clf.fit(x_tr, y_tr[:, j]).predict_proba(x_te)[:, 1]
    m = word_metrics(scores, y_te, vocab, (5, 10), concept_groups(prep))
    geo = "without" if a.no_geometry else "with"
    print(f"scene-oracle ({geo} geometry) word mAP on {a.split}: {m['mAP']:.4f} over {m['n_words_evaluated']} words")
    print("  " + ", ".join(f"{k} {v['mAP']:.4f} ({v['n_words']} words)" for k, v in m["subsets"].items()))
    print("lowest:", ", ".join(f"{w} {v:.2f}" for w, v in sorted(m["ap"].items(), key=lambda t: t[1])[:15]))


if __name__ == "__main__":
    main()
