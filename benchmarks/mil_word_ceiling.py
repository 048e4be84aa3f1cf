"""How high can a word mAP go on the shapes world? An oracle that knows each scene's contents.

Many shapes-world caption words are drawn at random by the caption grammar ("we see", "a scene with", the
relation and its pair of objects), so no image model can predict them. This script fits, per vocabulary word,
a gradient-boosted classifier on the TRUE scene contents (counts of each shape, colour and size, number of
objects; positions left out) over the training split and reports its word AP / mAP on a held-out split:
an estimate of the ceiling for the MIL detector's all-word mAP, computed with the same vocabulary, labels and
metric as `glied evaluate-attributes`.

Usage: python benchmarks/mil_word_ceiling.py PREP [--split test] [--vocab-size 1000]
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
from glied.extractors.mil.evaluate import word_metrics
from glied.extractors.mil.vocab import build_labels, build_vocab


def scene_features(prep: PreparedData) -> np.ndarray:
    inst = json.loads((Path(prep.manifest["source"]).parent / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    names = sorted(set(cats.values())) + [a["name"] for a in inst["attributes"]]
    per_image: dict[int, list] = {}
    for a in inst["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    feats = np.zeros((len(prep.images), len(names) + 6))
    for i, im in enumerate(prep.images):
        anns = per_image.get(int(im["id"]), [])
        c = Counter(cats[a["category_id"]] for a in anns) + Counter(t for a in anns for t in a["attributes"])
        for k, n in c.items():
            feats[i, names.index(k)] = n
        feats[i, len(names) + min(len(anns), 5)] = 1
    return feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prep")
    ap.add_argument("--split", default="test")
    ap.add_argument("--vocab-size", type=int, default=1000)
    a = ap.parse_args()
    prep = PreparedData.load(a.prep)
    tr, te = prep.split_indices("train"), prep.split_indices(a.split)
    vocab = build_vocab([prep.images[i]["sentences"] for i in tr], a.vocab_size)
    y_tr = build_labels([prep.images[i]["sentences"] for i in tr], vocab).labels
    y_te = build_labels([prep.images[i]["sentences"] for i in te], vocab).labels
    x = scene_features(prep)
    x_tr, x_te = x[tr], x[te]
    scores = np.zeros(y_te.shape)
    for j in range(len(vocab)):
        if y_tr[:, j].min() == y_tr[:, j].max():
            scores[:, j] = y_tr[0, j]
        else:
            clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0)
            scores[:, j] = clf.fit(x_tr, y_tr[:, j]).predict_proba(x_te)[:, 1]
    m = word_metrics(scores, y_te, vocab, (5, 10))
    print(f"scene-oracle word mAP on {a.split}: {m['mAP']:.4f} over {m['n_words_evaluated']} words")
    print("lowest:", ", ".join(f"{w} {v:.2f}" for w, v in sorted(m["ap"].items(), key=lambda t: t[1])[:15]))


if __name__ == "__main__":
    main()
