"""Decoder checkpoints (format ``glied-decoder``; saved and loaded through :mod:`glied.checkpoint`).

Keys: format, version, config (GliedConfig.to_dict()), vocab (itow), feature_identity (extractor + attribute
identity of the feature cache it was trained on, see :mod:`glied.datasets.identity`), model (state dict),
and, for training checkpoints, train_config, optimizer, rng, progress {xe_done, scst_done, step},
best_cider, history (list of metric rows). A run folder holds best.pt, last.pt and xe.pt.
"""
from __future__ import annotations

import os
from typing import Any

from glied import checkpoint as ck
from glied.models.glied import GliedConfig, GliedDecoder

DECODER = ck.Format("glied-decoder", 1, "decoder", ("best.pt", "last.pt"), "train one with `glied train`")
FORMAT, VERSION = DECODER.name, DECODER.version


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write a decoder checkpoint atomically (format and version are set here)."""
    ck.save(path, obj, DECODER)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A decoder checkpoint from a file or a run folder (best.pt, else last.pt), loaded without executing
    code; WeightsError naming the file otherwise."""
    return ck.load(path, DECODER, required=("config", "vocab", "feature_identity", "model"))


def build_model(ckpt: dict[str, Any]) -> GliedDecoder:
    """Rebuild the decoder from a checkpoint alone (config + weights), in eval mode on CPU."""
    model = GliedDecoder(GliedConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
