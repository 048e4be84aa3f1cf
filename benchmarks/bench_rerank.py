"""Cost of `glied search --rerank`: a query answered by a vse index alone vs the same index with its top k
re-scored by a teran run's region-word alignment, on a gallery of random cached features.

    python benchmarks/bench_rerank.py --work /tmp/bench-rerank [--images 1000] [--rerank-k 20] [--threads 2]

Gallery: the random cache and captions of ``bench_retrieval.py`` (36 regions x 2048 per image, 5 captions per
image), both models at the paper's sizes with random weights (cost does not depend on the weights), trained
for 0 epochs through ``train_retrieval``; the index built with ``build_index`` (images and captions). Timed
per query, one at a time, through the same calls `glied search` makes: text -> top 10 images
(``Index.text_to_images`` vs ``Reranker.text_to_images``: + reading k images' regions from the cache, the
teran visual encoder over them and k MrSw scores; and with an index that stores the teran run's region
vectors, ``glied index --rerank``: the k stored vectors instead) and cached image -> top 10 captions (+ the
teran embedding of the query image and of the k candidate captions). Prints one JSON object; ratios come
from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the glied CLI does on a busy machine
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_retrieval as br  # noqa: E402


def per_query(fn, queries: list, repeats: int) -> dict:
    """Seconds per query: min and median over ``repeats`` passes over ``queries``."""
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for q in queries:
            fn(q)
        passes.append((time.perf_counter() - t0) / len(queries))
    return {"min_ms": round(1000 * min(passes), 2), "median_ms": round(1000 * statistics.median(passes), 2),
            "passes": repeats, "queries": len(queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rerank-k", type=int, default=20)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    br.N_IMAGES = a.images
    torch.set_num_threads(a.threads)
    from glied.pipeline.retrieval import (Index, Reranker, RetrievalTrainConfig, build_index, open_cache,
                                          train_retrieval)

    res = {"threads": a.threads, "images": a.images, "rerank_k": a.rerank_k,
           "load_before": [round(x, 2) for x in os.getloadavg()]}
    prep, cache = br.make_gallery(a.work)
    for model in ("vse", "teran"):
        if not (a.work / model / "last.pt").is_file():
            train_retrieval(prep, cache, a.work / model, RetrievalTrainConfig(model=model, epochs=0),
                            log=lambda s: None)
    if not (a.work / "index" / "index.pt").is_file():
        t0 = time.perf_counter()
        build_index(a.work / "vse", cache, a.work / "index", data=prep)
        res["index_build_s"] = round(time.perf_counter() - t0, 1)
    if not (a.work / "index-rerank" / "index.pt").is_file():
        t0 = time.perf_counter()
        build_index(a.work / "vse", cache, a.work / "index-rerank", data=prep, rerank=a.work / "teran")
        res["index_build_with_teran_vectors_s"] = round(time.perf_counter() - t0, 1)
    res["index_mb"] = {n: round((a.work / n / "index.pt").stat().st_size / 2**20, 1)
                       for n in ("index", "index-rerank")}
    index = Index(a.work / "index")
    second = Reranker(a.work / "teran", index, a.rerank_k)
    stored_index = Index(a.work / "index-rerank")
    stored = Reranker(a.work / "teran", stored_index, a.rerank_k)
    assert stored.stored and not second.stored
    texts = index.data["captions"]["texts"]
    q_txt = [texts[(i * 7919) % len(texts)] for i in range(a.queries)]
    q_img = [index.image_ids[(i * 104729) % len(index.image_ids)] for i in range(a.queries)]
    c = open_cache(cache)

    def rerank_image(i):
        second.image_to_captions(index.embed_cached(c, i), second.embed_cached(c, i), 10)

    res["t2i"] = {"vse": per_query(lambda q: index.text_to_images(q, 10), q_txt, a.repeats),
                  "vse_rerank": per_query(lambda q: second.text_to_images(q, 10), q_txt, a.repeats),
                  "vse_rerank_stored": per_query(lambda q: stored.text_to_images(q, 10), q_txt, a.repeats)}
    res["i2t"] = {"vse": per_query(lambda i: index.image_to_captions(index.embed_cached(c, i), 10), q_img, a.repeats),
                  "vse_rerank": per_query(rerank_image, q_img, a.repeats)}
    for d in ("t2i", "i2t"):
        res[d]["rerank_over_vse_median"] = round(res[d]["vse_rerank"]["median_ms"] / res[d]["vse"]["median_ms"], 2)
    res["t2i"]["stored_rerank_over_vse_median"] = round(res["t2i"]["vse_rerank_stored"]["median_ms"]
                                                        / res["t2i"]["vse"]["median_ms"], 2)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
