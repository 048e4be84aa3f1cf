"""Retrieval benchmarks: query speed of the `vse` index against `teran` all-pairs alignment, the end-to-end time
of the COCO 5k protocol for `vse`, and (with --shapes) rsum of both models on the shapes world test split.

    python benchmarks/bench_retrieval.py --work /tmp/bench-retrieval [--threads 2]
    python benchmarks/bench_retrieval.py --work /tmp/bench-retrieval --shapes PREP CACHE --epochs 10

Speed gallery: 5,000 images x 36 regions x 2048 random features (a real feature cache, float16) and 25,000
random captions (5 per image, 8..16 words of a 10,000-word vocabulary), models at the paper's sizes with
random weights (speed does not depend on the weights). A query is answered one at a time: embed it with the
real encoder, score it against the whole gallery, take the top 10 (embedding and search timed apart).
The gallery is what an index holds, random unit vectors of the right shapes (search speed does not depend on
the values; embedding 5,000 images with TERAN's 2048-wide visual transformer alone takes hours on a CPU):
  * vse: one 1024-d vector per image (5,000) and per caption (25,000); a query is one matrix-vector product.
  * teran: every region and word vector (5,000 x 37 x 1024 regions, 25,000 x 16 x 1024 words); a query is
    aligned (MrSw) with every gallery item.
The vse index build rate is measured on 500 images and 2,500 captions.
Prints one JSON object; ratios are measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI on a busy machine: spinning threads were 20x slower
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_IMAGES, CAPS, REGIONS, DIM, VOCAB, EXTRA = 5000, 5, 36, 2048, 10000, 40


def make_gallery(work: Path) -> tuple[Path, Path]:
    """(prepared data, cache) of random features and captions; all 5,000 images in the test split."""
    from glied.datasets.cache import CacheWriter, FeatureCache, make_manifest
    from glied.datasets.prepared import PrepareConfig, prepare
    from glied.records import RegionFeatures

    cache, prep = work / "cache", work / "prep"
    rng = np.random.default_rng(0)
    if not (prep / "manifest.json").is_file():
        words = [f"w{i}" for i in range(VOCAB)]
        images = []
        for i in range(N_IMAGES + EXTRA):       # + 20 train (their captions hold the whole vocabulary), 20 val
            if N_IMAGES <= i < N_IMAGES + 20:
                k = (i - N_IMAGES) * CAPS
                sents = [" ".join(words[(k + j) * 100:(k + j + 1) * 100]) for j in range(CAPS)]
            else:
                sents = [" ".join(words[j] for j in rng.integers(0, VOCAB, int(rng.integers(8, 17))))
                         for _ in range(CAPS)]
            split = "test" if i < N_IMAGES else ("train" if i < N_IMAGES + 20 else "val")
            images.append({"filepath": "x", "filename": f"{i}.jpg", "cocoid": i, "imgid": i, "split": split,
                           "sentences": [{"raw": s, "tokens": s.split()} for s in sents]})
        work.mkdir(parents=True, exist_ok=True)
        (work / "captions.json").write_text(json.dumps({"dataset": "random", "images": images}))
        prepare(work / "captions.json", prep, PrepareConfig(count_threshold=0, max_length=16))
    if not (cache / "manifest.json").is_file() or len(FeatureCache.open(cache)) < N_IMAGES + EXTRA:
        ident = {"name": "random", "config": {}, "weights_fingerprint": "random", "feature_dim": DIM}
        with CacheWriter(cache, make_manifest(ident, "float16")) as w:
            for i in range(N_IMAGES + EXTRA):
                if str(i) in w:
                    continue
                xy = rng.random((REGIONS, 2), np.float32) * 400
                boxes = np.concatenate([xy, xy + 20 + rng.random((REGIONS, 2), np.float32) * 200], 1)
                f = np.maximum(rng.standard_normal((REGIONS, DIM), np.float32), 0)
                z = np.zeros(REGIONS, np.int64)
                w.put(str(i), RegionFeatures(boxes, f, z, np.ones(REGIONS, np.float32), z,
                                             np.ones(REGIONS, np.float32), 640, 480), None)
    return prep, cache


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stats(ts: list[float]) -> dict:
    return {"min_s": round(min(ts), 5), "median_s": round(statistics.median(ts), 5), "runs": len(ts)}


def speed(prep: Path, cache: Path, queries: int, teran_queries: int) -> dict:
    from glied.datasets.cache import FeatureCache
    from glied.datasets.prepared import PreparedData
    from glied.models.retrieval import Embedding, build_retrieval_model
    from glied.models.retrieval.model import make_config
    from glied.models.retrieval.text import VocabTokenizer
    from glied.pipeline.retrieval import embed_images, embed_texts, image_batch, score_all

    data = PreparedData.load(prep)
    c = FeatureCache.open(cache)
    ids = [str(i) for i in range(N_IMAGES)]
    texts = [" ".join(s) for im in data.images[:N_IMAGES] for s in im["sentences"]]
    tok = VocabTokenizer(data.vocab, 32)
    res: dict = {}
    torch.manual_seed(0)

    # ---- index build rate (vse, paper size): a sample of the gallery, in the batches `glied index` uses
    vse = build_retrieval_model(make_config("vse", "paper", feature_dim=DIM, vocab_size=len(data.vocab))).eval()
    n_img, n_cap = min(500, N_IMAGES), min(2500, len(texts))
    t0, c0 = time.perf_counter(), time.process_time()
    embed_images(vse, c, ids[:n_img])
    t1, c1 = time.perf_counter(), time.process_time()
    embed_texts(vse, tok, texts[:n_cap])
    t2, c2 = time.perf_counter(), time.process_time()
    res["vse_index_build"] = {"images_per_s": round(n_img / (t1 - t0), 1), "captions_per_s": round(n_cap / (t2 - t1), 1),
                              "images_cpu_s_per_1000": round(1000 * (c1 - c0) / n_img, 2),
                              "captions_cpu_s_per_1000": round(1000 * (c2 - c1) / n_cap, 2)}

    # ---- galleries: what an index holds (search speed does not depend on the values): unit vectors
    g = torch.Generator().manual_seed(2)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    d = vse.config.embed_dim
    gal_img = Embedding(unit(N_IMAGES, 1, d), torch.ones(N_IMAGES, 1, dtype=torch.bool))
    gal_txt = Embedding(unit(len(texts), 1, d), torch.ones(len(texts), 1, dtype=torch.bool))
    rng = np.random.default_rng(1)
    q_txt = [texts[i] for i in rng.integers(0, len(texts), queries)]
    q_img = [ids[i] for i in rng.integers(0, len(ids), queries)]

    def bench(model, gallery: Embedding, queries: list, embed, direction: str, repeats: int) -> dict:
        """Per query: embed it, then score it against the whole gallery and take the top 10 (timed apart)."""
        t_embed, t_search = [], []
        with torch.inference_mode():
            for _ in range(repeats):
                te = ts = 0.0
                for q in queries:
                    t0 = time.perf_counter()
                    e = embed(q)
                    t1 = time.perf_counter()
                    s = score_all(model, gallery, e)[:, 0] if direction == "t2i" else score_all(model, e, gallery)[0]
                    torch.from_numpy(s).topk(10)
                    ts += time.perf_counter() - t1
                    te += t1 - t0
                t_embed.append(te)
                t_search.append(ts)
        n = len(queries)
        total = [a + b for a, b in zip(t_embed, t_search)]
        return {"queries": n, "per_s_end_to_end": round(n / min(total), 3), "per_s_search_only": round(n / min(t_search), 3),
                "end_to_end": stats(total), "search_only": stats(t_search)}

    def text_query(model):
        return lambda q: embed_texts(model, tok, [q])

    def image_query(model):
        return lambda q: model.embed_images(*image_batch(c, [q]))

    cpu0 = time.process_time()
    res["vse"] = {"t2i": bench(vse, gal_img, q_txt, text_query(vse), "t2i", 5),
                  "i2t": bench(vse, gal_txt, q_img, image_query(vse), "i2t", 5)}
    del gal_txt, gal_img

    # ---- teran: real query encoders, all-pairs MrSw over every region / word vector of the gallery
    teran = build_retrieval_model(make_config("teran", "paper", feature_dim=DIM, vocab_size=len(data.vocab))).eval()
    d = teran.config.embed_dim
    img_mask = torch.ones(N_IMAGES, REGIONS + 1, dtype=torch.bool)
    img_mask[:, 0] = False                                   # the CLS slot
    res["teran"] = {"t2i": bench(teran, Embedding(unit(N_IMAGES, REGIONS + 1, d), img_mask), q_txt[:teran_queries],
                                 text_query(teran), "t2i", 3)}
    _, mask_t = tok.encode(texts)
    n_i2t = max(1, teran_queries // 4)
    res["teran"]["i2t"] = bench(teran, Embedding(unit(len(texts), mask_t.shape[1], d), mask_t), q_img[:n_i2t],
                                image_query(teran), "i2t", 3)
    res["speedup_vse_over_teran"] = {
        f"{d}_{k}": round(res["vse"][d][k] / res["teran"][d][k], 1)
        for d in ("t2i", "i2t") for k in ("per_s_end_to_end", "per_s_search_only")}
    res["cpu_seconds_of_query_timing"] = round(time.process_time() - cpu0, 1)
    res["teran_5k_protocol_estimate_h"] = round(N_IMAGES / res["teran"]["i2t"]["per_s_end_to_end"] / 3600, 2)
    return res


def eval_5k(prep: Path, cache: Path, work: Path, preset: str, repeats: int) -> dict:
    """End-to-end `evaluate_retrieval --protocol 5k` of a (random-weight) vse run of the given size preset:
    read 5,000 images' regions from the cache, embed them and 25,000 captions, score, rank."""
    from glied.pipeline.retrieval import RetrievalTrainConfig, evaluate_retrieval, train_retrieval

    run = work / f"vse-{preset}-run"
    if not (run / "last.pt").is_file():
        import shutil
        shutil.rmtree(run, ignore_errors=True)
        train_retrieval(prep, cache, run, RetrievalTrainConfig(model="vse", preset=preset, epochs=0),
                        log=lambda s: None)
    ts, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        m = evaluate_retrieval(run, cache, prep, "test", "5k", log=lambda s: None)
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": stats(ts), "cpu_seconds": stats(cpu), "images": m["images_per_fold"], "captions": m["captions"],
            "preset": preset}


def shapes(prep: str, cache: str, work: Path, epochs: int) -> dict:
    """Train vse and teran ("small" sizes, same epochs and batch size) and evaluate both on the test split."""
    from glied.pipeline.retrieval import RetrievalTrainConfig, evaluate_retrieval, train_retrieval

    out = {}
    for model in ("vse", "teran"):
        run = work / f"shapes-{model}"
        if not (run / "best.pt").is_file():
            import shutil
            shutil.rmtree(run, ignore_errors=True)
            s = train_retrieval(prep, cache, run, RetrievalTrainConfig(model=model, preset="small", epochs=epochs,
                                                                       batch_size=64, lr_decay_epoch=epochs * 2 // 3),
                                log=print)
            train_s = s["seconds"]
        else:
            train_s = None
        m = evaluate_retrieval(run, cache, prep, "test", "all", ndcg=True, log=print)
        out[model] = {k: m[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                                        "i2t_ndcg25", "t2i_ndcg25", "seconds")} | {"train_s": train_s}
    return out


def main() -> None:
    global N_IMAGES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="Scratch folder (gallery, runs).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=N_IMAGES, help="Gallery images (a smoke test uses fewer).")
    ap.add_argument("--queries", type=int, default=200, help="vse queries per timing run.")
    ap.add_argument("--teran-queries", type=int, default=8, help="teran text queries per timing run.")
    ap.add_argument("--eval-repeats", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="Query speed only (no 5k evaluation).")
    ap.add_argument("--shapes", nargs=2, metavar=("PREP", "CACHE"), default=None)
    ap.add_argument("--epochs", type=int, default=10)
    a = ap.parse_args()
    N_IMAGES = a.images
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    res = {"threads": a.threads, "load_before": [round(x, 2) for x in load]}
    if not a.skip_speed:
        prep, cache = make_gallery(a.work)
        res["speed"] = speed(prep, cache, a.queries, a.teran_queries)
        if not a.skip_eval:
            res["eval_5k_vse"] = {p: eval_5k(prep, cache, a.work, p, a.eval_repeats) for p in ("paper", "small")}
    if a.shapes:
        res["shapes"] = shapes(a.shapes[0], a.shapes[1], a.work, a.epochs)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
