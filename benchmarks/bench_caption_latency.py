"""Per-stage latency of `glied caption` for one photo: decode, detector, attribute words, decoder.

    python benchmarks/bench_caption_latency.py [BUNDLE] [PHOTO] [--runs 7] [--beam 3]

Defaults: the bundle and a held-out photo of `glied demo` (run `make demo` first). Prints min and median over
the runs (after one warm-up) of each stage and of the whole call.
"""
import argparse
import statistics
import time
from pathlib import Path

from glied.pipeline.caption import Captioner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default="glied-demo/bundle/model")
    ap.add_argument("photo", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    photo = args.photo or str(sorted(Path("glied-demo/world/images").glob("*.jpg"))[-1])
    cap = Captioner.from_bundle(args.bundle, device=args.device, beam_size=args.beam)
    cap.caption_files([photo])  # warm-up
    rows = {k: [] for k in ("decode", "detector", "attributes", "decoder", "total")}
    for _ in range(args.runs):
        cap.timings = {k: 0.0 for k in cap.timings}
        t0 = time.perf_counter()
        res = cap.caption_files([photo])
        rows["total"].append(time.perf_counter() - t0)
        for k in ("decode", "detector", "attributes", "decoder"):
            rows[k].append(cap.timings[k])
    print(f"photo {photo}: {res[0].caption!r}  (beam {args.beam}, {args.device})")
    for k, v in rows.items():
        print(f"  {k:<11} min {1000 * min(v):8.1f} ms   median {1000 * statistics.median(v):8.1f} ms")


if __name__ == "__main__":
    main()
