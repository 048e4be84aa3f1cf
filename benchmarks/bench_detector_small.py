"""Throughput of the small bottom-up detector on this CPU: training steps and evaluation-style inference.

Run by hand (never by pytest):
    python benchmarks/bench_detector_small.py --threads 1 --repeats 5 [--input-size 256] [--base-width 8]
        [--rois 16 --pre-nms 300 --precision auto]   # the demo's training settings

Prints min and median seconds per batch and images/s for (a) one training step (forward + all five losses +
backward, batch of 8 shapes-world images, 32 RoIs per image, channels-last as ``train_detector`` runs it) and (b) ``evaluation.detect`` on the same batch.
The shapes images are rendered in a temporary directory, so the script needs nothing else.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=None, help="default: train-detector's (256)")
    ap.add_argument("--base-width", type=int, default=None, help="default: train-detector's (8)")
    ap.add_argument("--rois", type=int, default=32, help="sampled RoIs per image in training")
    ap.add_argument("--pre-nms", type=int, default=None, help="training-time RPN pre-NMS top-k (default: model's)")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"], help="training step precision")
    args = ap.parse_args()

    import torch

    from glied.datasets.shapes import ShapesConfig, make_shapes
    from glied.extractors.bottomup.config import BottomUpConfig
    from glied.extractors.bottomup.data import DetectionDataset, make_batch, read_image
    from glied.extractors.bottomup.evaluation import detect
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.training import DetectorTrainConfig, detector_losses
    from glied.pipeline.detector import SHAPES_SMALL

    if args.threads:
        torch.set_num_threads(args.threads)
    over = dict(SHAPES_SMALL)  # the configuration `glied train-detector` trains
    if args.input_size:
        over.update(min_size=args.input_size, max_size=args.input_size)
    if args.base_width:
        over["base_width"] = args.base_width
    with tempfile.TemporaryDirectory() as tmp:
        make_shapes(tmp, ShapesConfig(n_images=args.batch_size, seed=0), workers=1)
        data = DetectionDataset.load(Path(tmp) / "instances.json", Path(tmp) / "images")
        cfg = BottomUpConfig.small(data.num_classes, data.num_attributes, **over)
        torch.manual_seed(0)
        model = BottomUpDetector(cfg)
        tcfg = DetectorTrainConfig(roi_batch_per_image=args.rois, rpn_train_pre_nms_topk=args.pre_nms)
        from glied.extractors.precision import resolve_precision
        bf16 = resolve_precision(args.precision, "cpu").precision == "bf16"
        imgs = [read_image(r) for r in data.records]

        def train_step():
            model.train()
            batch, sizes, targets = make_batch(data.records, model.transform, [False] * len(data.records))
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = detector_losses(model, batch, sizes, targets, tcfg, torch.Generator().manual_seed(0))
            sum(losses.values()).backward()

        def infer():
            detect(model, imgs)

        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"small preset: input {cfg.min_size}, base_width {cfg.base_width}, "
              f"feature_dim {cfg.feature_dim}, "
              f"params {n_params:.2f}M, threads {torch.get_num_threads()}, RoIs {args.rois}, "
              f"pre-NMS {args.pre_nms or cfg.rpn_pre_nms_topk}, {'bf16' if bf16 else 'fp32'}")
        for name, fn in (("train step", train_step), ("detect", infer)):
            channels_last = name == "train step"   # train_detector's layout; inference keeps the model's own
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            model.roi_heads.channels_last = channels_last
            fn()  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(f"{name:>10}: batch {len(imgs)}  min {min(times):.3f} s  median {med:.3f} s  "
                  f"-> {len(imgs) / med:.1f} images/s (median)")


if __name__ == "__main__":
    main()
