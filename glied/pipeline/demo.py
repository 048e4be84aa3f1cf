"""`glied demo`: the whole pipeline on the embedded synthetic shapes world, every stage cached.

Stages (each in its own folder under ``out``, skipped on a re-run when its settings are unchanged):
world (make the shapes world) -> prep (vocabulary and encoded captions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from glied.pipeline.data import make_shapes_world, prepare_captions
from glied.pipeline.stages import StageRunner


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo; defaults fit 20 minutes on 2 CPU cores."""

    images: int = 3000
    seed: int = 0
    size: int = 128
    max_length: int = 24
    count_threshold: int = 5


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; returns {stage: result} and prints per-stage times."""
    runner = StageRunner(Path(out), log)
    world = runner.run("world", {"images": cfg.images, "seed": cfg.seed, "size": cfg.size},
                       lambda d: make_shapes_world(d, cfg.images, seed=cfg.seed, size=cfg.size))
    runner.run("prep", {"max_length": cfg.max_length, "count_threshold": cfg.count_threshold},
               lambda d: prepare_captions(Path(world["out"]) / "captions.json", d,
                                          cfg.count_threshold, cfg.max_length)["counts"],
               after=("world",))
    log("")
    log("per-stage time (s):")
    for name, sec, cached in runner.timings():
        log(f"  {name:<12} {sec:8.1f}{'  (cached)' if cached else ''}")
    return {name: r.result for name, r in runner.results.items()} | {"config": asdict(cfg)}
