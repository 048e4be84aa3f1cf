"""CIDEr-D: our vectorised scorer vs pycocoevalcap's ``Cider.compute_score`` on 5,000 images x 5 references.

Captions are synthetic but COCO-like (Zipf word frequencies over an 8,000-word vocabulary, 8-12 words). Prints
  * agreement (max |difference| of per-image scores),
  * from scratch: building the df index + scoring all 5,000 candidates vs Cider.compute_score,
  * indexed: scoring the 5,000 candidates against references indexed once (what SCST does every step),
    and a 50-image x 5-sample SCST batch,
each as min / median of ``--repeats`` runs and the ratio of medians.

    python benchmarks/bench_cider.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider

from glied.models.cider import CiderD, cider_d


def corpus(n: int = 5000, refs: int = 5, vocab: int = 8000, seed: int = 0):
    rng = np.random.default_rng(seed)

    def sent():
        return " ".join(f"w{min(int(x), vocab)}" for x in rng.zipf(1.3, rng.integers(8, 13)))

    gts = {i: [sent() for _ in range(refs)] for i in range(n)}
    res = {i: [sent()] for i in range(n)}
    return gts, res


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def show(name: str, ours: list[float], theirs: list[float]) -> None:
    print(f"{name:34s} ours {min(ours) * 1e3:8.1f} / {statistics.median(ours) * 1e3:8.1f} ms   pycocoevalcap "
          f"{min(theirs) * 1e3:8.1f} / {statistics.median(theirs) * 1e3:8.1f} ms   "
          f"speed-up {statistics.median(theirs) / statistics.median(ours):6.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gts, res = corpus()
    keys = list(gts)
    _, ref_scores = Cider().compute_score(gts, res)
    _, our_scores = cider_d(gts, res)
    print(f"5,000 images x 5 refs: max |ours - pycocoevalcap| = {np.abs(ref_scores - our_scores).max():.2e}")
    theirs = timed(lambda: Cider().compute_score(gts, res), args.repeats)
    ours = timed(lambda: cider_d(gts, res), args.repeats)
    show("from scratch (index + 5,000 cands)", ours, theirs)
    index = CiderD([gts[k] for k in keys])
    cands = [res[k][0] for k in keys]
    idx = np.arange(len(keys))
    ours = timed(lambda: index.score(cands, idx), args.repeats)
    show("indexed refs, 5,000 candidates", ours, theirs)
    rng = np.random.default_rng(1)
    b = np.repeat(rng.choice(len(keys), 50, replace=False), 5)
    batch = [res[keys[i]][0] for i in rng.choice(len(keys), len(b))]
    ours_b = timed(lambda: index.score(batch, b), args.repeats)
    print(f"{'indexed refs, SCST batch 50 x 5':34s} ours {min(ours_b) * 1e3:8.2f} / "
          f"{statistics.median(ours_b) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
