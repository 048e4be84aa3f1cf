#!/usr/bin/env python3
"""Speed and reduced-precision agreement of the bottom-up region extractor on this machine (run by hand).

    python benchmarks/bench_bottomup.py [--weights faster_rcnn_from_caffe_attr.pkl] [--runs 5] [--threads 2]

Without --weights the random reference checkpoint (same layout and size as the published one) is generated in a
temp dir; speed does not depend on the weight values. Prints, for R101-C4 on a 600x1000 input with 300 proposals
and butd selection, seconds/image and images/s (min and median of --runs runs, modes interleaved run by run so a
noisy shared machine affects them alike) for:

- ``port-style``: glied's model run the way the detectron2 port runs it (fp32, FrozenBN as separate ops, NCHW,
  res5 on all 300 RoIs in one batch) -- the same-run anchor for the port (about 13 s/image on a quiet machine here);
- ``fp32-exact``: FrozenBN as separate ops, NCHW, res5 in chunks of 16 RoIs (bit-identical to the port);
- ``fp32-fast`` (the fp32 default on CPU): backbone and RPN as fp32-exact; res5 with FrozenBN folded into the
  convolutions, channels-last, chunks of 16;
- ``fp32-gemm``: res5 as GEMMs over all RoIs of a chunk (``GemmRes5``: FrozenBN folded, 1x1 convolutions as
  one sgemm each, residual added by the GEMM), backbone and RPN as fp32-exact;
- ``bf16``: res5 in bf16 (backbone and RPN fp32), channels-last, res5 in chunks of 16;

Besides wall-clock seconds it prints this process's CPU seconds per image (all threads): on a shared,
overloaded machine the CPU time of a compute-bound run is the steadier figure (run with --threads 1 to keep
thread spin-waiting out of it).

then the small shapes configuration (128 px, fp32 and bf16), and bf16-vs-fp32 agreement on three photos:
median / min feature cosine on the same boxes (fp32's butd boxes, given-box extraction) and the share of fp32's
butd boxes matched by bf16's at IoU >= 0.9.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glied.extractors.bottomup.config import BottomUpConfig  # noqa: E402
from glied.extractors.bottomup.extractor import RegionExtractor  # noqa: E402
from glied.extractors.bottomup.model import BottomUpDetector  # noqa: E402
from scripts.bottomup_parity.harness import match_boxes, write_random_checkpoint  # noqa: E402
from glied.extractors.bottomup.weights import load_detectron2_state, read_detectron2_pickle  # noqa: E402


def photos():
    try:
        import skimage.data as d
        return {n: np.ascontiguousarray(getattr(d, n)()[:, :, ::-1]) for n in ("astronaut", "coffee", "chelsea")}
    except ImportError:
        rng = np.random.default_rng(0)
        return {f"random{i}": rng.integers(0, 255, (400, 600, 3), dtype=np.uint8) for i in range(3)}


def timed(fn, *a):
    """(wall seconds, process CPU seconds) of fn(*a)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*a)
    return time.perf_counter() - t, time.process_time() - c


def summary(ts):
    return "min %6.2f s  median %6.2f s  (%5.3f / %5.3f images/s)" % (
        min(ts), statistics.median(ts), 1 / min(ts), 1 / statistics.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-r101", action="store_true")
    ap.add_argument("--modes", default="port-style,fp32-exact,fp32-fast,fp32-gemm,bf16")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, runs={args.runs}")

    imgs = photos()
    a = next(iter(imgs.values()))
    import cv2
    img600 = cv2.resize(a, (1000, 600), interpolation=cv2.INTER_LINEAR)      # network input exactly 600x1000

    if not args.skip_r101:
        with tempfile.TemporaryDirectory() as td:
            path = args.weights or Path(td) / "random.pkl"
            if not args.weights:
                write_random_checkpoint(path)
            state = read_detectron2_pickle(path)
        base = BottomUpDetector(BottomUpConfig.r101_vg())
        load_detectron2_state(base, state)
        del state
        port = RegionExtractor(copy.deepcopy(base).replace_cfg(res5_chunk=300), fp32_mode="exact")
        exact = RegionExtractor(copy.deepcopy(base), fp32_mode="exact")
        fp32 = RegionExtractor(copy.deepcopy(base), fp32_mode="fast")
        gemm = RegionExtractor(copy.deepcopy(base), fp32_mode="gemm")
        bf16 = RegionExtractor(copy.deepcopy(base), precision="bf16")
        modes = {"port-style": port, "fp32-exact": exact, "fp32-fast": fp32, "fp32-gemm": gemm, "bf16": bf16}
        modes = {m: e for m, e in modes.items() if m in args.modes.split(",")}
        for e in modes.values():                          # warm-up on a small input (allocations, oneDNN caches)
            e.extract([cv2.resize(a, (150, 90))])
        times = {m: [] for m in modes}
        cpu = {m: [] for m in modes}
        for r in range(args.runs):
            for m, e in modes.items():
                w, c = timed(e.extract, [img600])
                times[m].append(w)
                cpu[m].append(c)
            print(f"  run {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f} s ({cpu[m][-1]:.2f} CPU s)" for m in modes)
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)
        print("\nR101-C4, 600x1000 input, 300 proposals, butd selection (seconds per image):")
        for m in modes:
            print(f"  {m:10s} wall {summary(times[m])}")
            print(f"  {'':10s} CPU  {summary(cpu[m])}")
        if "port-style" in modes:
            for what, tab in (("wall", times), ("CPU", cpu)):
                pm = statistics.median(tab["port-style"])
                for m in modes:
                    if m != "port-style":
                        print(f"  speed-up {m} vs port-style ({what} time): median "
                              f"{pm / statistics.median(tab[m]):.2f}x, min {min(tab['port-style']) / min(tab[m]):.2f}x")

    if not args.skip_r101 and not args.skip_agreement:
        print("\nbf16 vs fp32 agreement (random-weight checkpoint):")
        cos_all, matched, total = [], 0, 0
        for name, im in imgs.items():
            r32 = fp32.extract([im])[0]
            r16 = bf16.extract([im])[0]
            g16 = bf16.extract_given_boxes(im, r32.boxes).features.astype(np.float64)
            f32 = r32.features.astype(np.float64)
            cos = (f32 * g16).sum(1) / np.maximum(np.linalg.norm(f32, axis=1) * np.linalg.norm(g16, axis=1), 1e-30)
            pairs = match_boxes(r32.boxes, r16.boxes, 0.9)
            cos_all.append(cos)
            matched += len(pairs)
            total += len(r32)
            print(f"  {name:10s} fp32 {len(r32)} boxes, bf16 {len(r16)}; matched at IoU>=0.9: {len(pairs)}/{len(r32)};"
                  f" feature cosine median {np.median(cos):.5f} min {cos.min():.5f}")
        c = np.concatenate(cos_all)
        print(f"  all: median cosine {np.median(c):.5f}, min {c.min():.5f}, butd boxes matched {matched}/{total} "
              f"({100.0 * matched / max(total, 1):.1f}%)")

    if args.skip_small:
        return
    print("\nsmall shapes configuration (128x128, random init), seconds per image:")
    small = BottomUpDetector(BottomUpConfig.small()).eval()
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(16)]
    for prec in ("fp32", "bf16"):
        e = RegionExtractor(copy.deepcopy(small), precision=prec)
        e.extract(batch[:2])
        ts = [timed(e.extract, batch)[0] / len(batch) for _ in range(args.runs)]
        print(f"  {prec:5s} {summary(ts)}")


if __name__ == "__main__":
    main()
