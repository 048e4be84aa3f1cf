"""MIL checkpoints (format ``glied-mil``; saved and loaded through :mod:`glied.checkpoint`).

Layout of a checkpoint file::

    {"format": "glied-mil", "version": 1,
     "config": MilConfig.to_dict(), "train_config": MilTrainConfig.to_dict(), "vocab": [word, ...],
     "state_dict": {name: tensor}, "epoch": int (epochs finished), "history": [{...per-epoch floats...}],
     "label_stats": {...}, "optimizer": Adam state dict and "rng" (``last.pt`` only, for --resume)}

A run folder holds ``last.pt`` (written after every epoch, atomically) and ``model.pt`` (the final model,
no optimizer state), plus ``train_log.json``.
"""
from __future__ import annotations

from pathlib import Path

from glied import checkpoint as ck

MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"
MIL = ck.Format("glied-mil", 1, "MIL", (MODEL_FILE,),
                "train one with `glied train-attributes --data PREP --out RUN`", unfinished=LAST_FILE)
FORMAT, VERSION = MIL.name, MIL.version


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Write ``ckpt`` to ``path`` atomically, so a crash never leaves half a file."""
    ck.save(path, ckpt, MIL)


def load_checkpoint(run_or_checkpoint: str | Path) -> dict:
    """A MIL checkpoint from a file or a run folder (its model.pt), loaded without executing code;
    WeightsError naming the path and the fix otherwise."""
    return ck.load(run_or_checkpoint, MIL, required=("config", "vocab", "state_dict"))
