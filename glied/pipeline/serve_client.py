"""Client-side tools for `glied serve`, shared by its tests, its benchmark and the screenshot script: run the
server in a child process, put load on it, open it in headless Chromium.

    with ServerProcess("model/", ["--max-batch", "8"]) as url:          # binds 127.0.0.1, a free port
        report = run_load(url, [("a.jpg", data)], requests=200, concurrency=8)
    print(report.summary())

Only loopback addresses are used: the server is started with ``--host 127.0.0.1``.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from glied.errors import GliedError

_URL = re.compile(r"glied serve: (http://127\.0\.0\.1:\d+/)")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class ServerProcess:
    """``python -m glied serve --model BUNDLE --host 127.0.0.1 --port 0 ARGS`` as a context manager that
    yields the server's URL once it listens, and stops the process on exit. Its output is kept in
    ``self.output`` (for error messages)."""

    def __init__(self, bundle: str | os.PathLike, args: Sequence[str] = (), *, timeout: float = 180.0,
                 env: Optional[dict] = None):
        self.cmd = [sys.executable, "-m", "glied", "serve", "--model", str(bundle), "--host", "127.0.0.1",
                    "--port", "0", "--device", "cpu", *args]
        self.timeout, self.env = timeout, env
        self.proc: Optional[subprocess.Popen] = None
        self.output: list[str] = []
        self.url: Optional[str] = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(self.env or {})})
        found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                m = _URL.search(line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(self.timeout) or self.url is None:
            self.__exit__(None, None, None)
            raise GliedError(f"glied serve did not start within {self.timeout:.0f} s: "
                             + " | ".join(self.output[-5:]))
        return self.url

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class LoadReport:
    """Latencies (seconds) of every request, failures, wall time and the server's batching counters."""

    latencies: list[float]
    failed: int
    wall_s: float
    photos: int
    concurrency: int
    errors: list[str] = field(default_factory=list)
    batching: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.photos / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def as_dict(self) -> dict:
        return {"requests": len(self.latencies) + self.failed, "failed": self.failed,
                "concurrency": self.concurrency, "p50_ms": round(self.percentile(50) * 1000, 1),
                "p95_ms": round(self.percentile(95) * 1000, 1),
                "max_ms": round(max(self.latencies, default=0) * 1000, 1),
                "images_per_s": round(self.images_per_s, 2), "wall_s": round(self.wall_s, 2),
                "mean_batch": self.batching.get("mean_batch"), "largest_batch": self.batching.get("largest_batch")}

    def summary(self) -> str:
        d = self.as_dict()
        return (f"{d['requests']} requests, {d['concurrency']} concurrent: p50 {d['p50_ms']} ms, p95 {d['p95_ms']} ms, "
                f"{d['images_per_s']} images/s, {d['failed']} failed, mean batch {d['mean_batch']}")


def run_load(url: str, photos: Sequence[tuple[str, bytes]], *, requests: int = 200, concurrency: int = 8,
             beam: Optional[int] = None, timeout: float = 120.0) -> LoadReport:
    """POST ``requests`` single-photo /caption requests (cycling through ``photos``), ``concurrency`` at a time.
    A request fails unless it answers 200 with a caption."""
    import httpx

    if not url.startswith("http://127.0.0.1:"):
        raise GliedError(f"{url}: the load test only talks to 127.0.0.1")

    async def main() -> LoadReport:
        latencies: list[float] = []
        errors: list[str] = []
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            async def one(i: int) -> None:
                name, data = photos[i % len(photos)]
                form = {"beam": str(beam)} if beam else {}
                async with sem:
                    t0 = time.perf_counter()
                    try:
                        r = await client.post("/caption", files=[("image", (name, data, "image/jpeg"))], data=form)
                        ok = r.status_code == 200 and isinstance(r.json()["results"][0].get("caption"), str)
                        why = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                    except Exception as e:  # noqa: BLE001 - counted as a failed request
                        ok, why = False, f"{type(e).__name__}: {e}"
                    dt = time.perf_counter() - t0
                if ok:
                    latencies.append(dt)
                else:
                    errors.append(why)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(requests)))
            wall = time.perf_counter() - t0
            batching = (await client.get("/health")).json().get("batching", {})
        return LoadReport(latencies, len(errors), wall, len(latencies), concurrency, errors[:5], batching)

    return asyncio.run(main())


def headless_chromium(profile_dir: str | os.PathLike, *, size: tuple[int, int] = (1200, 900),
                      chromium: str = "/usr/bin/chromium", driver: str = "/usr/bin/chromedriver"):
    """A selenium driver of Debian's Chromium (``chromium`` + ``chromium-driver`` packages), headless, with a
    fresh profile in ``profile_dir`` and nothing that calls out to the network on its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)
