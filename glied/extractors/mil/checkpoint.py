"""MIL checkpoints: plain dicts of tensors + JSON-able config, loaded with ``torch.load(weights_only=True)``.

Layout of a checkpoint file::

    {"format": "glied-mil", "version": 1,
     "config": MilConfig.to_dict(), "train_config": MilTrainConfig.to_dict(), "vocab": [word, ...],
     "state_dict": {name: tensor}, "epoch": int (epochs finished), "history": [{...per-epoch floats...}],
     "label_stats": {...}, "optimizer": Adam state dict (``last.pt`` only, for --resume)}

A run folder holds ``last.pt`` (written after every epoch, atomically) and ``model.pt`` (the final model,
no optimizer state), plus ``train_log.json``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from glied.errors import WeightsError

FORMAT = "glied-mil"
VERSION = 1
MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Write ``ckpt`` to ``path`` atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **ckpt}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A run folder -> its ``model.pt``; a file -> itself. Raises WeightsError naming the path and the fix."""
    p = Path(run_or_checkpoint)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        if (p / LAST_FILE).is_file():
            raise WeightsError(f"{p}: training has not finished (only {LAST_FILE}); run "
                               f"`glied train-attributes --out {p} --resume ...` or pass {p / LAST_FILE}")
        raise WeightsError(f"{p}: no {MODEL_FILE} in this folder; train one with `glied train-attributes`")
    if not p.is_file():
        raise WeightsError(f"{p}: MIL run folder or checkpoint not found; train one with "
                           "`glied train-attributes --data PREP --out RUN`")
    return p


def load_checkpoint(run_or_checkpoint: str | Path) -> dict:
    """Load and check a MIL checkpoint without executing code (``weights_only=True``)."""
    p = resolve_checkpoint(run_or_checkpoint)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is a user-fixable weights problem
        raise WeightsError(f"{p}: cannot be read as a glied MIL checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); retrain or pass the right file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsError(f"{p}: not a glied MIL checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else None!r}); "
                           "pass a run folder or model.pt written by `glied train-attributes`")
    if ckpt.get("version") != VERSION:
        raise WeightsError(f"{p}: MIL checkpoint version {ckpt.get('version')} is not {VERSION}; retrain it")
    for key in ("config", "vocab", "state_dict"):
        if key not in ckpt:
            raise WeightsError(f"{p}: MIL checkpoint lacks {key!r}; retrain it")
    ckpt["path"] = str(p)
    return ckpt
