"""Word-detection metrics: per-word average precision, mAP, and precision / recall at a top-k cut.

- AP of a word: sklearn ``average_precision_score`` over the evaluated images, computed only for words with
  at least one positive image (others are listed in ``words_without_positives``).
- mAP: mean of those APs.
- P@k / R@k: per image, the k most probable words are the prediction; P@k = |top-k & truth| / k averaged over
  all images, R@k = |top-k & truth| / |truth| averaged over images with at least one true word.
  k is capped at the vocabulary size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score


def word_metrics(probs: np.ndarray, labels: np.ndarray, vocab: Sequence[str],
                 top_ks: Sequence[int] = (5, 10, 50), subsets: dict[str, Sequence[str]] | None = None) -> dict:
    """Metrics of image-level word probabilities.

    Args:
        probs: (N, V) float p(w|I).
        labels: (N, V) {0, 1} truth (words in any caption of the image).
        vocab: V words.
        top_ks: cuts for precision / recall.
        subsets: optional named word lists; each gets its own mAP over its words that have positives
            (e.g. the visual concept words of a dataset).

    Returns:
        JSON-able dict: ``mAP``, ``n_images``, ``n_words_evaluated``, ``ap`` {word: AP}, ``words_without_positives``,
        ``at_k`` {k: {precision, recall}}, ``subsets`` {name: {mAP, n_words, missing}}.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(bool)
    if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise ValueError(f"probs {probs.shape}, labels {labels.shape} and vocab ({len(vocab)}) disagree")
    n, v = probs.shape
    ap: dict[str, float] = {}
    no_pos: list[str] = []
    for j, w in enumerate(vocab):
        if n and labels[:, j].any():
            ap[w] = float(average_precision_score(labels[:, j], probs[:, j]))
        else:
            no_pos.append(w)
    at_k: dict[str, dict] = {}
    order = np.argsort(-probs, axis=1, kind="stable") if n else np.zeros((0, v), np.int64)
    n_true = labels.sum(1)
    for k in top_ks:
        kk = max(1, min(int(k), v))
        hits = np.take_along_axis(labels, order[:, :kk], axis=1).sum(1) if n else np.zeros(0)
        has = n_true > 0
        at_k[str(kk)] = {
            "precision": float(hits.mean() / kk) if n else float("nan"),
            "recall": float((hits[has] / n_true[has]).mean()) if has.any() else float("nan"),
        }
    subs = {}
    for name, words in (subsets or {}).items():
        got = [ap[w] for w in words if w in ap]
        subs[name] = {"mAP": float(np.mean(got)) if got else float("nan"), "n_words": len(got),
                      "missing": [w for w in words if w not in ap]}
    return {
        "mAP": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "n_images": int(n),
        "n_words_evaluated": len(ap),
        "mean_true_words_per_image": float(n_true.mean()) if n else 0.0,
        "at_k": at_k,
        "subsets": subs,
        "ap": ap,
        "words_without_positives": no_pos,
    }
