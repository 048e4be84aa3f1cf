"""Time `make_shapes` for 10,000 images (target: under a minute on 2 cores). Run: python benchmarks/bench_shapes.py"""
import statistics
import sys
import tempfile
import time

from glied.datasets.shapes import ShapesConfig, make_shapes


def main(n: int = 10_000, repeats: int = 3) -> None:
    times = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            make_shapes(d, ShapesConfig(n_images=n, seed=r))
            times.append(time.perf_counter() - t0)
    print(f"make_shapes {n} images: min {min(times):.1f} s, median {statistics.median(times):.1f} s "
          f"over {repeats} runs (target < 60 s on 2 cores)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
