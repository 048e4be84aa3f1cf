"""Feature-cache benchmark (TARGETS.md, "Feature cache"): bytes per image vs the raw arrays, warm read rate of
a random training batch of 50 images (10..100 regions x 2048, float16), and resume start time with 100k
finished entries.

    python benchmarks/bench_cache.py [--images 2000] [--resume-entries 100000] [--runs 5] [--dir DIR]

Prints min and median of ``--runs`` runs for each timed figure next to its target. The read rates are measured
twice, interleaved on the same random batches: with the CRC32 check every read does (the default) and without
it (``FeatureCache.open(..., check_crc=False)``), so the check's cost is a ratio from one run; rates per CPU
second are printed too (less sensitive to other jobs on a shared machine).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glied.datasets.cache import CacheWriter, FeatureCache, make_manifest  # noqa: E402
from glied.datasets.inputs import InputImage  # noqa: E402
from glied.records import RegionFeatures  # noqa: E402


def _regions(rng, n, d) -> RegionFeatures:
    return RegionFeatures(boxes=rng.random((n, 4), dtype=np.float32) * 600,
                          features=rng.random((n, d), dtype=np.float32).astype(np.float16),
                          obj_ids=rng.integers(0, 1600, n), obj_scores=rng.random(n, dtype=np.float32),
                          attr_ids=rng.integers(0, 400, n), attr_scores=rng.random(n, dtype=np.float32),
                          image_w=640, image_h=480)


def _raw_bytes(r: RegionFeatures) -> tuple[int, int]:
    """(all stored arrays at their stored dtypes, features + boxes only)."""
    n = len(r)
    return n * 2048 * 2 + n * 4 * 4 + n * 4 * 4, n * 2048 * 2 + n * 4 * 4


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_size_and_reads(root: str, n_images: int, runs: int) -> None:
    rng = np.random.default_rng(0)
    ident = {"name": "bench", "config": {}, "weights_fingerprint": "none", "feature_dim": 2048}
    raw_all = raw_fb = 0
    t0 = time.perf_counter()
    with CacheWriter(root, make_manifest(ident, "float16")) as w:
        for i in range(n_images):
            r = _regions(rng, int(rng.integers(10, 101)), 2048)
            a, b = _raw_bytes(r)
            raw_all += a
            raw_fb += b
            w.put(str(100000 + i), r)
    write_s = time.perf_counter() - t0
    disk = _du(root)
    print(f"cache of {n_images} images (10..100 regions x 2048 float16): {disk / 2**20:.1f} MiB on disk, "
          f"written at {n_images / write_s:.0f} images/s ({disk / write_s / 2**20:.0f} MiB/s, fsync'd)")
    print(f"bytes/image: {disk / n_images:,.0f} vs raw arrays {raw_all / n_images:,.0f} -> "
          f"{disk / raw_all:.4f}x (target <= 1.05x); vs features+boxes only {disk / raw_fb:.4f}x")

    cache = FeatureCache.open(root)                     # CRC32 of each entry checked on every read
    nocrc = FeatureCache.open(root, check_crc=False)    # the same without the check: its cost, same run
    ids = cache.ids()
    batch, n_batches = 50, 40
    for _ in range(2):                                  # warm the page cache
        for i in ids:
            cache.regions(i).features.sum(dtype=np.float32)
    for i in ids:
        nocrc.regions(i).features.sum(dtype=np.float32)  # map its pages too
    rates: dict[str, list[float]] = collections.defaultdict(list)
    for run in range(runs):                             # the two modes interleaved, same random batches
        for c, tag in ((cache, ""), (nocrc, "_nocrc")):
            r = np.random.default_rng(run)
            t, tc = time.perf_counter(), time.process_time()
            for _ in range(n_batches):
                for i in r.choice(len(ids), batch, replace=False):
                    c.regions(ids[i])
            rates["views" + tag].append(batch * n_batches / (time.perf_counter() - t))
            rates["views_cpu" + tag].append(batch * n_batches / max(time.process_time() - tc, 1e-9))
            t, tc = time.perf_counter(), time.process_time()
            for _ in range(n_batches):                   # FeatureCache.batch: padded to the batch's max R
                c.batch([ids[i] for i in r.choice(len(ids), batch, replace=False)])
            rates["batch" + tag].append(batch * n_batches / (time.perf_counter() - t))
            rates["batch_cpu" + tag].append(batch * n_batches / max(time.process_time() - tc, 1e-9))

    def fig(what: str, tag: str = "") -> str:
        w, c = rates[what + tag], rates[what + "_cpu" + tag]
        return (f"min {min(w):,.0f} / median {statistics.median(w):,.0f} images/s "
                f"(per CPU second: median {statistics.median(c):,.0f})")

    print(f"random batch of 50, warm, records only (views, CRC checked): {fig('views')}; "
          f"without the CRC check: {fig('views', '_nocrc')}")
    print(f"random batch of 50, warm, FeatureCache.batch -> padded (50, R_max, 2048) float16, CRC checked: "
          f"{fig('batch')} (target >= 5,000); without the CRC check: {fig('batch', '_nocrc')}; median ratio "
          f"{statistics.median(rates['batch']) / statistics.median(rates['batch_nocrc']):.2f}")


def bench_resume(root: str, n_entries: int, runs: int) -> None:
    """Resume start = open the cache for writing (recover the tail, load the index) + enumerate the input list
    + drop finished ids. Entries are small (10 x 8) so the data stays small; the index has the same
    per-entry size as with 2048-d features."""
    rng = np.random.default_rng(1)
    ident = {"name": "bench", "config": {}, "weights_fingerprint": "none", "feature_dim": 8}
    m = make_manifest(ident, "float16")
    t0 = time.perf_counter()
    with CacheWriter(root, m, commit_every=4096) as w:
        for i in range(n_entries):
            n = int(rng.integers(10, 101)) // 10
            w.put(f"train2014/COCO_train2014_{i:012d}.jpg", _regions(rng, n, 8))
    build_s = time.perf_counter() - t0
    lst = os.path.join(os.path.dirname(root), "list.txt")
    with open(lst, "w") as f:
        for i in range(n_entries + n_entries // 10):
            f.write(f"train2014/COCO_train2014_{i:012d}.jpg\n")
    idx = os.path.getsize(os.path.join(root, "index.log"))
    print(f"resume: {n_entries:,} finished entries (index {idx / 2**20:.1f} MiB, built in {build_s:.0f} s)")
    from glied.datasets.inputs import enumerate_inputs

    times, t_open, cpu = [], [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        items = enumerate_inputs(lst, images_root=os.path.dirname(root))
        t1 = time.perf_counter()
        w = CacheWriter(root, m)
        todo = [it for it in items if it.id not in w]
        t2 = time.perf_counter()
        cpu.append(time.process_time() - c)
        w.close()
        assert len(todo) == n_entries // 10 and isinstance(todo[0], InputImage)
        times.append(t2 - t)
        t_open.append(t2 - t1)
    print(f"resume start (list of {len(items):,} paths + open cache + skip finished): min {min(times):.2f} / "
          f"median {statistics.median(times):.2f} s (target <= 2 s; CPU time median {statistics.median(cpu):.2f} s); "
          f"of which opening the cache min {min(t_open):.2f} / median {statistics.median(t_open):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resume-entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="Scratch folder (default: a temporary one, removed after).")
    a = ap.parse_args()
    tmp = a.dir or tempfile.mkdtemp(prefix="bench_cache_")
    try:
        bench_size_and_reads(os.path.join(tmp, "reads"), a.images, a.runs)
        bench_resume(os.path.join(tmp, "resume"), a.resume_entries, a.runs)
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
