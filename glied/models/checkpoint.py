"""Decoder checkpoints: plain dicts of tensors and JSON-able values, loadable with ``weights_only=True``.

Keys: format, version, config (GliedConfig.to_dict()), vocab (itow), feature_identity (extractor + attribute
identity of the feature cache it was trained on), model (state dict), and, for training checkpoints,
train_config, optimizer, rng, progress {xe_done, scst_done, step}, best_cider, history (list of metric rows).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from glied.errors import InputError, WeightsError
from glied.models.glied import GliedConfig, GliedDecoder

FORMAT = "glied-decoder"
VERSION = 1


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory means its best.pt (else last.pt); a file is itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise InputError(f"{p}: no best.pt or last.pt in this run directory; train first with `glied train`")
    if not p.is_file():
        raise InputError(f"{p}: checkpoint not found; pass a run directory or a .pt file written by "
                         "`glied train`")
    return p


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Atomic torch.save (write to a temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load without executing code; raises WeightsError naming the file if it is not a decoder checkpoint."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, unsafe content
        raise WeightsError(f"{p}: cannot load as a glied decoder checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120]}); re-train or pass another file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WeightsError(f"{p}: not a glied decoder checkpoint (format {fmt!r}); "
                           "pass a file written by `glied train`")
    if ckpt.get("version") != VERSION:
        raise WeightsError(f"{p}: decoder checkpoint version {ckpt.get('version')} is not {VERSION}")
    ckpt["path"] = str(p)
    return ckpt


def build_model(ckpt: dict[str, Any]) -> GliedDecoder:
    """Rebuild the decoder from a checkpoint alone (config + weights), in eval mode on CPU."""
    model = GliedDecoder(GliedConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_decoder(path: str | os.PathLike) -> tuple[GliedDecoder, list[str], dict]:
    """(model, vocab itow, feature identity) from a checkpoint file or run directory."""
    ckpt = load_checkpoint(path)
    return build_model(ckpt), list(ckpt["vocab"]), ckpt["feature_identity"]
