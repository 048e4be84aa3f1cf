"""Time the MIL word detector per image (TARGETS.md: <= 15% of the region detector's time per image).

Usage:
    python benchmarks/bench_mil.py [--run RUN] [--images DIR] [--config small resnet101 ...]
        [--detector-weights W] [--repeats 5] [--batch 1 8]

For each MIL config (a trained RUN, or fresh random weights of a preset: the time does not depend on the
weights) it prints min and median seconds per image over ``--repeats`` runs, for each batch size. With
``--detector-weights`` it also times ``glied.extractors.bottomup.load_region_extractor`` on the same images
and prints the MIL/detector ratio. Images: the first ones of DIR, or random 128x128 (small) / 480x640 images.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def load_images(folder: str | None, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    if folder:
        from glied.extractors.mil.data import read_image

        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        return [read_image(p) for p in files]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def time_per_image(fn, images: list[np.ndarray], batch: int, repeats: int) -> list[float]:
    fn(images[:batch])  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            fn(images[s:s + batch])
        out.append((time.perf_counter() - t0) / len(images))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="trained MIL run folder or checkpoint (overrides --config)")
    ap.add_argument("--config", nargs="+", default=["small", "resnet101"])
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--images", help="folder of images to time on")
    ap.add_argument("--n", type=int, default=16, help="images per timed run")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--detector-weights", help="region detector weights, to print the MIL/detector ratio")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from glied.extractors.mil.config import MilConfig
    from glied.extractors.mil.inference import AttributeExtractor, load_attribute_extractor
    from glied.extractors.mil.model import MilNet

    extractors = {}
    if a.run:
        extractors[str(a.run)] = load_attribute_extractor(a.run)
    else:
        for name in a.config:
            net = MilNet(MilConfig.preset(name, a.vocab_size)).to(memory_format=torch.channels_last)
            extractors[name] = AttributeExtractor(net, [f"w{i}" for i in range(a.vocab_size)])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    mil_times = {}
    for name, ext in extractors.items():
        shape = (128, 128) if ext.cfg.input_size <= 160 else (480, 640)
        images = load_images(a.images, a.n, shape)
        for b in a.batch:
            ts = time_per_image(ext.predict, images, b, a.repeats)
            mil_times[(name, b)] = min(ts)
            print(f"MIL {name:<10} input {ext.cfg.input_size} batch {b:>2}: min {1000 * min(ts):8.2f} ms/image, "
                  f"median {1000 * statistics.median(ts):8.2f} ms/image ({a.repeats} runs x {len(images)} images)")
    if a.detector_weights:
        from glied.extractors.bottomup import load_region_extractor

        det = load_region_extractor(a.detector_weights, device="cpu")
        images = load_images(a.images, a.n, (128, 128))
        ts = time_per_image(det.extract, images, 1, a.repeats)
        print(f"detector batch 1: min {1000 * min(ts):8.2f} ms/image, median {1000 * statistics.median(ts):8.2f}")
        for (name, b), t in mil_times.items():
            print(f"ratio MIL {name} (batch {b}) / detector: {t / min(ts):.3f} (target <= 0.15)")
    else:
        print("anchor (TARGETS.md): the reference bottom-up port takes about 13 s/image here in fp32; the floor "
              "of the R101-C4 detector is about 5.8 s/image. Pass --detector-weights for a measured ratio.")


if __name__ == "__main__":
    main()
