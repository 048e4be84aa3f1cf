"""Whole `glied extract` stage vs the region extractor alone (TARGETS.md: whole stage <= 1.1x the detector).

    python benchmarks/bench_extract.py [--extractor auto|bottomup|bottomup-small|resnet|grid] [--detector W]
                                       [--images 12] [--runs 5] [--batch-size 2] [--workers 2]

"detector alone" = ``extractor.extract`` on images already decoded in memory; "whole stage" =
``glied.pipeline.extract.extract`` from JPEG files on disk into a fresh cache (enumerate, decode + the detector's
resize in --workers DataLoader processes, extract, write + fsync on the writer thread). Runs alternate A/B so
both see the same machine load; the ratio is reported as the median over the runs of each run's
whole / detector time (the target: <= 1.1x), beside the ratio of the medians. The CPU-time line counts this
process only: with --workers > 0 the decoding's CPU time is spent in the worker processes.

Extractors: ``bottomup`` = ``glied.extractors.bottomup.load_region_extractor(--detector)`` (e.g. the published
R101 weights or a trained shapes-world run); ``bottomup-small`` = the same code with the
``BottomUpConfig.small()`` preset and random weights (about the cost of a trained one: the RoI head runs on
every proposal either way); ``resnet`` = a stand-in with a detector-like cost defined here (torchvision
ResNet-18 with random weights: layer1..3 on the image resized to short side 600 / long <= 1000, RoIAlign 7x7
of 16 grid boxes, layer4 per RoI, mean pool -> 512-d); ``grid`` = the tiny test extractor of the test suite
(decode-bound, shows the stage's own overhead). ``auto`` = bottomup with --detector, else bottomup-small.
The script prints which.

Threads wait as the CLI makes them (``glied.cli.set_omp_wait_policy``: ACTIVE on an idle machine, PASSIVE on a busy
one) unless the environment says otherwise (``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_extract.py``);
the header line prints which.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# threads wait as under `glied extract`: the CLI's choice (before torch loads)
from glied.cli import set_omp_wait_policy  # noqa: E402

set_omp_wait_policy()

from glied.datasets.images import load_image  # noqa: E402
from glied.pipeline.extract import extract  # noqa: E402
from glied.records import RegionFeatures  # noqa: E402


class ResNetStandIn:
    """Detector-cost stand-in: ResNet-18 trunk at bottom-up input size + per-RoI layer4 (see module doc)."""

    def __init__(self):
        import torch
        import torchvision

        torch.manual_seed(0)
        m = torchvision.models.resnet18(weights=None).eval()
        self.trunk = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)
        self.head = m.layer4
        self.torch, self.tv = torch, torchvision

    def identity(self) -> dict:
        return {"name": "bench-resnet18-standin", "config": {"min_size": 600, "max_size": 1000, "rois": 16},
                "weights_fingerprint": "seed0", "feature_dim": 512}

    def extract(self, images):
        torch = self.torch
        out = []
        with torch.inference_mode():
            for im in images:
                h, w = im.shape[:2]
                s = min(600 / min(h, w), 1000 / max(h, w))
                x = torch.from_numpy(im).permute(2, 0, 1)[None].float()                     # (1, 3, H, W)
                x = torch.nn.functional.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear")
                f = self.trunk(x - 114.0)                                  # (1, 256, H/16, W/16)
                xs, ys = np.linspace(0, w, 5), np.linspace(0, h, 5)
                boxes = np.array([[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(4) for i in range(4)],
                                 np.float32)
                rois = torch.cat([torch.zeros(16, 1), torch.from_numpy(boxes) * s], 1)     # (16, 5)
                p = self.tv.ops.roi_align(f, rois, (7, 7), spatial_scale=1 / 16, aligned=True)  # (16,256,7,7)
                feats = self.head(p).mean((2, 3)).numpy()                                 # (16, 512)
                out.append(RegionFeatures(boxes=boxes, features=feats, obj_ids=np.zeros(16, np.int64),
                                          obj_scores=np.ones(16, np.float32), attr_ids=np.zeros(16, np.int64),
                                          attr_scores=np.ones(16, np.float32), image_w=w, image_h=h))
        return out


def make_extractor(kind: str, detector: str | None, tmp: str):
    """(description, extractor) for --extractor; see the module docstring."""
    if kind == "auto":
        kind = "bottomup" if detector else "bottomup-small"
    if kind == "bottomup":
        from glied.extractors.bottomup import load_region_extractor

        if not detector:
            sys.exit("--extractor bottomup needs --detector WEIGHTS")
        return f"bottomup {detector}", load_region_extractor(detector, device="cpu", precision="fp32")
    if kind == "bottomup-small":
        import torch

        from glied.extractors.bottomup import load_region_extractor
        from glied.extractors.bottomup.config import BottomUpConfig
        from glied.extractors.bottomup.model import BottomUpDetector
        from glied.extractors.bottomup.weights import save_checkpoint

        torch.manual_seed(0)
        ck = os.path.join(tmp, "small.pt")
        save_checkpoint(ck, BottomUpDetector(BottomUpConfig.small()))
        return ("glied bottom-up detector, BottomUpConfig.small() preset (shapes world size, 128 px input), "
                "random weights", load_region_extractor(ck, device="cpu"))
    if kind == "resnet":
        return "resnet18 stand-in", ResNetStandIn()
    path = os.path.join(ROOT, "tests", "pipeline", "grid_extractor.py")
    spec = importlib.util.spec_from_file_location("grid_extractor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return "grid test extractor", mod.GridRegionExtractor()


def write_photos(folder: str, n: int) -> None:
    """n smooth random 640x480 JPEGs (COCO-sized)."""
    import cv2

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(folder, f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractor", default="auto",
                    choices=["auto", "bottomup", "bottomup-small", "resnet", "grid"])
    ap.add_argument("--detector", default=None)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the whole stage")
    a = ap.parse_args()
    import torch

    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    try:
        name, ext = make_extractor(a.extractor, a.detector, tmp)
        photos = os.path.join(tmp, "photos")
        write_photos(photos, a.images)
        decoded = [load_image(os.path.join(photos, f)) for f in sorted(os.listdir(photos))]
        ext.extract(decoded[:1])                                      # warm-up
        alone, whole, cpu_alone, cpu_whole = [], [], [], []
        for run in range(a.runs):
            t, c = time.perf_counter(), time.process_time()
            for i in range(0, len(decoded), a.batch_size):
                ext.extract(decoded[i:i + a.batch_size])
            alone.append(time.perf_counter() - t)
            cpu_alone.append(time.process_time() - c)
            out = os.path.join(tmp, f"cache{run}")
            t, c = time.perf_counter(), time.process_time()
            s = extract(photos, out, region_extractor=ext, batch_size=a.batch_size, workers=a.workers,
                        progress=False)
            whole.append(time.perf_counter() - t)
            cpu_whole.append(time.process_time() - c)
            assert s.extracted == a.images and s.failed == 0
            shutil.rmtree(out)
        n = a.images
        print(f"extractor: {name}; {n} JPEGs 640x480; batch {a.batch_size}, {a.workers} decoding processes, "
              f"torch {torch.__version__} with {torch.get_num_threads()} threads, OMP_WAIT_POLICY "
              f"{os.environ['OMP_WAIT_POLICY']}; {a.runs} runs, alternating")
        print(f"detector alone : min {n / max(alone):.2f}..{n / min(alone):.2f} images/s, "
              f"median {n / statistics.median(alone):.2f} images/s "
              f"({statistics.median(alone) / n:.3f} s/image)")
        print(f"whole stage    : min {n / max(whole):.2f}..{n / min(whole):.2f} images/s, "
              f"median {n / statistics.median(whole):.2f} images/s "
              f"({statistics.median(whole) / n:.3f} s/image)")
        ratios = sorted(w / d for w, d in zip(whole, alone))
        print(f"whole / detector time: median of the {a.runs} runs' ratios {statistics.median(ratios):.3f}x "
              f"(runs: {', '.join(f'{r:.3f}' for r in ratios)}); ratio of the medians "
              f"{statistics.median(whole) / statistics.median(alone):.3f}x, min/min {min(whole) / min(alone):.3f}x "
              f"(target <= 1.1x); load average {os.getloadavg()[0]:.1f}")
        ca, cw = statistics.median(cpu_alone), statistics.median(cpu_whole)
        print(f"CPU time of this process (all threads; less sensitive to other load): detector "
              f"{ca / n * 1000:.0f} ms/image, whole stage {cw / n * 1000:.0f} ms/image, "
              f"ratio {cw / ca:.3f}x; "
              f"stage overhead {(cw - ca) / n * 1000:.1f} ms/image")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
