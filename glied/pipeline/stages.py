"""Cached pipeline stages: run a step once, record that it finished, skip it next time.

A stage writes its outputs into its own folder and, last, a ``stage.json`` with its key (a hash of its
settings and of the keys of the stages it reads) and its result. A later run whose key matches skips the
stage and returns the stored result; a changed setting, or a changed upstream stage, reruns it. A stage that
was interrupted has no ``stage.json`` and reruns from scratch (its own code may resume inside the folder).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glied.fileio import write_atomic


def stage_key(settings: dict, upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    key: str
    result: dict
    seconds: float
    cached: bool


@dataclass
class StageRunner:
    """Runs named stages under ``root``; ``log`` receives one line per stage."""

    root: Path
    log: Callable[[str], None] = print
    results: dict[str, StageResult] = field(default_factory=dict)

    def run(self, name: str, settings: dict, fn: Callable[[Path], dict], after: tuple[str, ...] = ()) -> dict:
        """Run ``fn(stage_dir) -> result`` unless a finished run with the same key exists; returns the result."""
        key = stage_key(settings, [self.results[a].key for a in after])
        folder = self.root / name
        marker = folder / "stage.json"
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())
            except ValueError:
                done = {}
            if done.get("key") == key:
                self.results[name] = StageResult(name, key, done["result"], done.get("seconds", 0.0), True)
                self.log(f"[{name}] cached ({done.get('seconds', 0.0):.1f} s when it ran)")
                return done["result"]
            marker.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running ...")
        t0 = time.perf_counter()
        result = fn(folder)
        seconds = time.perf_counter() - t0
        text = json.dumps({"key": key, "settings": settings, "result": result, "seconds": seconds},
                          indent=1, default=str)
        write_atomic(marker, lambda tmp: Path(tmp).write_text(text))
        self.results[name] = StageResult(name, key, result, seconds, False)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return result

    def timings(self) -> list[tuple[str, float, bool]]:
        return [(r.name, r.seconds, r.cached) for r in self.results.values()]
