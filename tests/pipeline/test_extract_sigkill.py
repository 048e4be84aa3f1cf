"""Crash safety: a real `python -m glied extract` subprocess is SIGKILLed mid-run, resumed, and every entry
must equal a clean run's: none missing, none corrupt."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glied.datasets.cache import FeatureCache
from glied.datasets.cache_store import INDEX_NAME
from glied.pipeline.data import make_shapes_world
from tests.cache_checks import assert_same_cache

ROOT = Path(__file__).resolve().parents[2]
FACTORY = f"{Path(__file__).with_name('grid_extractor.py')}:make_extractor"


def _cmd(images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "glied", "extract", str(images), "--out", str(out), "--extractor-module",
            FACTORY, "--device", "cpu", "--batch-size", "2", "--workers", "2", "--commit-seconds", "0.3",
            "--quiet"]


def _env(delay: float) -> dict:
    env = dict(os.environ, GRID_EXTRACTOR_DELAY=str(delay), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _committed(out: Path) -> int:
    try:
        return open(out / INDEX_NAME, "rb").read().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_midway(images: Path, out: Path, n_total: int, rng: random.Random) -> int:
    """Start an extraction, wait until some (not all) entries are committed, SIGKILL it at a random moment."""
    p = subprocess.Popen(_cmd(images, out), env=_env(0.06), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        start = _committed(out)
        while _committed(out) == start and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))          # somewhere between two commits, mid-write likely
        assert p.poll() is None, f"extraction finished before it could be killed: {p.stderr.read()[-500:]}"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    n = len(FeatureCache.open(out))
    assert start < n < n_total
    return n


def _run(images: Path, out: Path) -> None:
    r = subprocess.run(_cmd(images, out), env=_env(0.0), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _clean_in_process(images: Path, out: Path) -> FeatureCache:
    """The reference run, in this process with the same factory and thread count as the subprocesses."""
    import importlib.util

    import torch

    from glied.pipeline.extract import extract

    spec = importlib.util.spec_from_file_location("grid_extractor_k",
                                                  Path(__file__).with_name("grid_extractor.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        extract(str(images), str(out), region_extractor=mod.make_extractor(), progress=False, workers=0)
    finally:
        torch.set_num_threads(threads)
    return FeatureCache.open(out)


def _world(tmp_path: Path, n: int) -> Path:
    make_shapes_world(tmp_path / "w", n, seed=5, size=64, workers=1)
    return tmp_path / "w" / "images"


def test_sigkill_then_resume_equals_clean_run(tmp_path):
    images = _world(tmp_path, 40)
    out = tmp_path / "killed"
    _kill_midway(images, out, 40, random.Random(0))
    _run(images, out)                        # resume: repairs the torn tail, extracts the rest
    assert_same_cache(_clean_in_process(images, tmp_path / "clean"), FeatureCache.open(out))


@pytest.mark.slow
def test_repeated_sigkills_at_random_moments(tmp_path):
    images = _world(tmp_path, 120)
    out = tmp_path / "killed"
    rng = random.Random(1)
    counts = [_kill_midway(images, out, 120, rng) for _ in range(3)]
    assert counts == sorted(counts)          # committed work is never lost
    _run(images, out)
    _run(images, tmp_path / "clean")
    assert_same_cache(FeatureCache.open(tmp_path / "clean"), FeatureCache.open(out))
