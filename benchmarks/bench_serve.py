"""Load on `glied serve` over loopback: latency percentiles and images/s, batching on vs off.

    nice -n 10 python benchmarks/bench_serve.py [BUNDLE] [PHOTOS_DIR] [--requests 200] [--concurrency 8]
                                                [--repeats 5] [--window-ms 10] [--max-batch 8]

Defaults: the bundle and world of `glied demo` (run `make demo` first). Starts one server with batching on
(``--max-batch 8 --batch-window-ms 10``) and one with it off (``--max-batch 1``) on 127.0.0.1, then runs the
same load against each in turn, ``--repeats`` times alternating (after a warm-up of 16 requests), and prints
each run, then min and median of p50, p95 and images/s for both and the ratio of the medians. Failed requests
are counted; any failure exits non-zero.
"""
import argparse
import json
import os
import statistics
from pathlib import Path

from glied.pipeline.serve_client import ServerProcess, run_load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default="glied-demo/bundle/model")
    ap.add_argument("photos", nargs="?", default="glied-demo/world/images")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--beam", type=int, default=None)
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the runs to this JSON file.")
    args = ap.parse_args()
    files = sorted(Path(args.photos).glob("*.jpg"))[:32]
    photos = [(f.name, f.read_bytes()) for f in files]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.photos}")
    settings = {"on": ["--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms)],
                "off": ["--max-batch", "1", "--batch-window-ms", "0"]}
    runs = {k: [] for k in settings}
    print(f"load: {uptime()}")
    with ServerProcess(args.bundle, settings["on"]) as url_on, ServerProcess(args.bundle, settings["off"]) as url_off:
        urls = {"on": url_on, "off": url_off}
        for name, url in urls.items():
            run_load(url, photos, requests=16, concurrency=args.concurrency, beam=args.beam)  # warm-up
        for rep in range(args.repeats):
            for name, url in urls.items():
                rep_ = run_load(url, photos, requests=args.requests, concurrency=args.concurrency, beam=args.beam)
                runs[name].append(rep_.as_dict())
                print(f"batching {name:3s} run {rep + 1}: {rep_.summary()}", flush=True)
                if rep_.failed:
                    print("  failures:", rep_.errors)
    print(f"load: {uptime()}")
    med = {}
    for name, rows in runs.items():
        stats = {k: (min(r[k] for r in rows), statistics.median(r[k] for r in rows))
                 for k in ("p50_ms", "p95_ms", "images_per_s")}
        med[name] = {k: v[1] for k, v in stats.items()}
        print(f"batching {name:3s}: " + ", ".join(f"{k} min {v[0]} median {v[1]}" for k, v in stats.items())
              + f", failed {sum(r['failed'] for r in rows)}")
    print(f"on/off images/s (median): {med['on']['images_per_s'] / med['off']['images_per_s']:.2f}x; "
          f"p50 off/on: {med['off']['p50_ms'] / med['on']['p50_ms']:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    if any(r["failed"] for rows in runs.values() for r in rows):
        raise SystemExit(1)


def uptime() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
