#!/usr/bin/env python3
"""Batched extraction: images/s of the bottom-up extractor for several batch sizes, on CUDA when present.

    python benchmarks/bench_batch.py [--detector faster_rcnn_from_caffe_attr.pkl | --small] [--device auto]
                                     [--precision auto] [--batch-sizes 1,4,8,16] [--images 32] [--runs 3]
                                     [--photos DIR] [--workers 4]

For each batch size: "detector" = ``RegionExtractor.extract`` on batches of images already decoded in memory
(backbone and RPN per image, the RoI head over the RoIs of the whole batch); "whole stage" =
``glied.pipeline.extract.extract`` from JPEG files on disk (640x480, or the first --images files of --photos DIR,
e.g. a shapes world's images/; decoded and resized in --workers DataLoader processes a few batches ahead,
pinned memory on CUDA) into a fresh feature cache with that batch size. Batch sizes are interleaved run by
run so a shared machine's load affects them alike; min and median images/s are printed, and the ratio to batch size 1.

Without --detector the R101-C4 model gets the random reference checkpoint (same layout and cost as the
published one, generated in a temp dir); --small uses the ``BottomUpConfig.small()`` preset instead.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_extract import write_photos  # noqa: E402

from glied.datasets.images import find_images, load_image  # noqa: E402
from glied.pipeline.extract import choose_precision, extract, resolve_device  # noqa: E402


def load(args, tmp):
    import torch

    from glied.extractors.bottomup import load_region_extractor

    if args.small:
        from glied.extractors.bottomup.config import BottomUpConfig
        from glied.extractors.bottomup.model import BottomUpDetector
        from glied.extractors.bottomup.weights import save_checkpoint

        torch.manual_seed(0)
        weights = os.path.join(tmp, "small.pt")
        save_checkpoint(weights, BottomUpDetector(BottomUpConfig.small()))
        what = "BottomUpConfig.small() (128 px), random weights"
    elif args.detector:
        weights, what = args.detector, f"detector {args.detector}"
    else:
        from scripts.bottomup_parity.harness import write_random_checkpoint

        weights = os.path.join(tmp, "random.pkl")
        write_random_checkpoint(weights)
        what = "R101-C4, random reference checkpoint (published layout)"
    dev = resolve_device(args.device)
    choice = choose_precision(args.precision, dev)
    ext = load_region_extractor(weights, device=dev, precision=choice.precision)
    return ext, f"{what}; device {dev}; {choice.describe()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=None)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="decoding processes of the whole stage")
    ap.add_argument("--photos", default=None, help="use the first --images images of this folder")
    ap.add_argument("--no-stage", action="store_true", help="Only the detector on decoded images.")
    args = ap.parse_args()
    import torch

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_batch_")
    try:
        ext, what = load(args, tmp)
        if args.photos:
            files = find_images(args.photos)[:args.images]
            photos = os.path.join(tmp, "photos.txt")         # a list INPUT: exactly these files
            with open(photos, "w") as f:
                f.write("".join(os.path.abspath(p) + "\n" for p in files))
            source = f"{len(files)} images of {args.photos}"
        else:
            photos = os.path.join(tmp, "photos")
            write_photos(photos, args.images)
            files = [os.path.join(photos, f) for f in sorted(os.listdir(photos))]
            source = f"{len(files)} JPEGs 640x480"
        decoded = [load_image(p) for p in files]
        sync = torch.cuda.synchronize if ext.device.type == "cuda" else (lambda: None)
        ext.extract(decoded[:max(sizes)])                         # warm-up (allocator, kernels, oneDNN caches)
        det = {b: [] for b in sizes}
        stage = {b: [] for b in sizes}
        n = len(decoded)
        for run in range(args.runs):
            for b in sizes:
                sync()
                t = time.perf_counter()
                for i in range(0, n, b):
                    ext.extract(decoded[i:i + b])
                sync()
                det[b].append(n / (time.perf_counter() - t))
                if not args.no_stage:
                    out = os.path.join(tmp, f"cache_{b}_{run}")
                    t = time.perf_counter()
                    s = extract(photos, out, region_extractor=ext, batch_size=b, workers=args.workers,
                                progress=False)
                    stage[b].append(n / (time.perf_counter() - t))
                    assert s.extracted == n and s.failed == 0, s
                    shutil.rmtree(out)
            print(f"  run {run + 1}: " + ", ".join(f"batch {b} {det[b][-1]:.2f}"
                                                   + (f"/{stage[b][-1]:.2f}" if stage[b] else "")
                                                   for b in sizes) + " images/s (detector/stage)", flush=True)
        print(f"{what}; {source}; {args.workers} decoding processes; torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads; "
              f"load {os.getloadavg()[0]:.1f}")
        base = statistics.median(det[sizes[0]])
        for b in sizes:
            line = (f"  batch {b:3d}: detector min {min(det[b]):7.2f} median {statistics.median(det[b]):7.2f} "
                    f"images/s ({statistics.median(det[b]) / base:.2f}x batch {sizes[0]})")
            if stage[b]:
                line += (f"; whole stage min {min(stage[b]):7.2f} median {statistics.median(stage[b]):7.2f} images/s "
                         f"(stage / detector time {statistics.median(det[b]) / statistics.median(stage[b]):.2f}x)")
            print(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
