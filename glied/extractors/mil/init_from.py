"""Initialise the MIL trunk from a detector (``glied train-attributes --init-from DETECTOR``).

Fang et al. start their word detector from an ImageNet CNN; here the start is the bottom-up detector's trunk
(stem + res2..res4), so one set of weights serves both extractors. ``DETECTOR`` is either

- the published detectron2-format ``faster_rcnn_from_caffe_attr.pkl`` (or any .pkl in its layout): read through
  the restricted unpickler and applied through the strict detectron2 key map of
  :mod:`glied.extractors.bottomup.weights` to a whole detector whose sizes are read off the file's tensors
  (ResNet-101 for the published file), of which the trunk is kept; or
- a ``glied train-detector`` run folder (or its ``checkpoint.pt``): the trained detector, rebuilt from its own
  config, of which the trunk is kept.

:func:`load_detector_trunk` returns the trunk's config, its state dict and a JSON-able record of the source
(kind, absolute path, sha256 of the file, and for a run its detector name, epoch and classes), which the MIL
checkpoint keeps in its training config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from glied.errors import ConfigError, WeightsError

TRUNK_PREFIX = "backbone."
RES5_PREFIX = "roi_heads.res5."


@dataclass
class DetectorTrunk:
    """``config``: the detector's ``BottomUpConfig.to_dict()``; ``state_dict``: the trunk's tensors, named as in
    :class:`glied.extractors.bottomup.backbone.ResNetC4` (plus ``res5.*``, the RoI head's res5, used with
    ``trunk_res5``); ``source``: where they came from (JSON-able)."""

    config: dict
    state_dict: dict[str, torch.Tensor]
    source: dict


def _config_from_detectron2_state(state: dict) -> "BottomUpConfig":  # noqa: F821
    """The published ResNet-101 C4 config, with the sizes that the file's tensors show (depth per stage, widths,
    class / attribute counts, head widths), so that a smaller model saved in the same layout loads too. Sizes
    that cannot be read off stay at the published values; the strict load then names what does not fit."""
    from glied.extractors.bottomup.config import BottomUpConfig

    sizes: dict = {}
    blocks = []
    for stage in ("backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.res5"):
        pat = re.compile(re.escape(stage) + r"\.(\d+)\.")
        ids = {int(m.group(1)) for k in state if (m := pat.match(k))}
        blocks.append(max(ids) + 1 if ids else None)
    if all(blocks):
        sizes["stage_blocks"] = tuple(blocks)
    shape_of = {  # config field: (detectron2 name, axis)
        "stem_channels": ("backbone.stem.conv1.weight", 0),
        "base_width": ("backbone.res2.0.conv1.weight", 0),
        "rpn_hidden": ("proposal_generator.rpn_head.conv.weight", 0),
        "num_classes": ("roi_heads.box_predictor.cls_score.weight", 0),
        "num_attributes": ("roi_heads.box_predictor.attr_score.weight", 0),
        "attr_embed_dim": ("roi_heads.box_predictor.cls_embedding.weight", 1),
        "attr_hidden": ("roi_heads.box_predictor.fc_attr.weight", 0),
    }
    for name, (key, axis) in shape_of.items():
        shape = getattr(state.get(key), "shape", ())
        if len(shape) > axis:
            sizes[name] = int(shape[axis]) - (1 if name in ("num_classes", "num_attributes") else 0)
    return BottomUpConfig.r101_vg(**sizes)


def _trunk_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The detector's stem + res2..res4 and its RoI head's res5, named as in the MIL trunk."""
    out = {}
    for k, v in model.state_dict().items():
        for prefix in (TRUNK_PREFIX, RES5_PREFIX):
            if k.startswith(prefix):
                out[k[len(prefix):] if prefix == TRUNK_PREFIX else "res5." + k[len(prefix):]] = v.detach().clone()
    return out


def _from_pickle(path: Path) -> DetectorTrunk:
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.weights import load_detectron2_state, read_detectron2_pickle, weights_fingerprint

    state = read_detectron2_pickle(path)
    cfg = _config_from_detectron2_state(state)
    model = BottomUpDetector(cfg)
    load_detectron2_state(model, state, str(path))  # strict: every key consumed, every tensor filled
    return DetectorTrunk(cfg.to_dict(), _trunk_of(model),
                         {"kind": "detectron2-pkl", "path": str(path.resolve()),
                          "sha256": weights_fingerprint(path).removeprefix("sha256:"),
                          "depth": cfg.depth})


def _from_run(path: Path) -> DetectorTrunk:
    from glied.extractors.bottomup.weights import load_checkpoint, model_from_checkpoint
    from glied.fileio import sha256_file

    ckpt = load_checkpoint(path)  # a run folder resolves to its checkpoint.pt
    file = Path(ckpt["path"])
    try:
        model = model_from_checkpoint(ckpt)
    except ConfigError as e:  # a config this glied cannot build
        raise WeightsError(f"{file}: {e}") from None
    extra = ckpt.get("extra") or {}
    return DetectorTrunk(model.cfg.to_dict(), _trunk_of(model),
                         {"kind": "glied-detector", "path": str(file.resolve()), "sha256": sha256_file(file),
                          "name": extra.get("name"), "epoch": extra.get("epoch"),
                          "classes": list(ckpt.get("classes") or [])})


def load_detector_trunk(detector: str | Path) -> DetectorTrunk:
    """The trunk (stem + res2..res4) of a detector: a detectron2-format .pkl, or a glied detector run folder or
    checkpoint file.

    Raises:
        WeightsError: one line naming the path: not found, not a detector file, or tensors that do not fit.
    """
    p = Path(detector)
    if p.suffix == ".pkl" and not p.is_dir():
        return _from_pickle(p)
    return _from_run(p)


def copy_trunk(model: torch.nn.Module, trunk: DetectorTrunk) -> int:
    """Copy ``trunk`` into a ``bottomup`` MilNet's trunk (strict: every trunk tensor filled, same shapes);
    returns the tensor count."""
    own = model.trunk.state_dict()
    missing = sorted(set(own) - set(trunk.state_dict))
    bad = sorted(k for k in own if k in trunk.state_dict and trunk.state_dict[k].shape != own[k].shape)
    if missing or bad:
        raise WeightsError(f"{trunk.source.get('path')}: the detector's trunk does not fit the MIL trunk "
                           f"({len(missing)} missing, e.g. {missing[:3]}; {len(bad)} mis-shaped, e.g. {bad[:3]})")
    model.trunk.load_state_dict({k: trunk.state_dict[k] for k in own}, strict=True)
    return len(own)
