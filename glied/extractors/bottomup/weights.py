"""Loading weights safely and strictly.

- :func:`read_detectron2_pickle` reads ``faster_rcnn_from_caffe_attr.pkl`` (a pickle of
  ``{"model": {detectron2 name: ndarray}, "__author__": ...}``) through a restricted unpickler that admits only
  the globals numpy arrays need (``numpy.core.multiarray._reconstruct`` written by numpy < 2 is mapped to the
  numpy >= 2 location) and refuses everything else with a :class:`WeightsError`: nothing in the file runs.
- :func:`detectron2_key_map` is the explicit map detectron2 name -> glied state-dict name, generated from the
  config; :func:`load_detectron2_state` applies it strictly: every key consumed, every parameter and buffer
  filled, shapes checked; the error names the missing, unexpected and mis-shaped keys.
- glied's own checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`, format ``glied-bottomup``) go
  through :mod:`glied.checkpoint`: plain dicts of tensors + JSON-able config, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from glied import checkpoint as ck
from glied.errors import WeightsError
from glied.fileio import write_json_atomic
from glied.extractors.bottomup.config import BottomUpConfig

WEIGHTS_URL_HINT = ("download faster_rcnn_from_caffe_attr.pkl from the link in the py-bottom-up-attention README "
                    "(github.com/airsplay/py-bottom-up-attention, 'Feature extraction' section)")
ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"


def missing_weights_message(path) -> str:
    return (f"weights file {path} not found: {WEIGHTS_URL_HINT} and pass its path with --weights PATH")


# ---- restricted unpickler --------------------------------------------------------------------------------------
def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:   # numpy < 2
        from numpy.core import multiarray
    return multiarray


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_multiarray().scalar,
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_multiarray().scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,   # bytes in protocol-2 pickles from python 3
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise WeightsError(f"{self.source}: refusing to load: the pickle references {module}.{name}, which a "
                               f"weights file of numpy arrays never needs (it could run code). Use the published "
                               f"faster_rcnn_from_caffe_attr.pkl or a glied checkpoint")
        return factory()

    def persistent_load(self, pid):
        raise WeightsError(f"{self.source}: refusing to load: the pickle uses persistent ids (not a numpy pickle)")


def safe_unpickle(data, source: str = "<bytes>"):
    """Unpickle bytes or a binary file object admitting only numpy arrays, dtypes, dicts and plain values."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _NumpyOnlyUnpickler(f, source).load()
    except WeightsError:
        raise
    except Exception as e:   # truncated / corrupt file
        raise WeightsError(f"{source}: not a readable weights pickle ({type(e).__name__}: {e})") from None


def read_detectron2_pickle(path) -> dict:
    """{detectron2 name: float32 ndarray} from a detectron2-format .pkl (``{"model": {...}, ...}`` or a bare dict)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(missing_weights_message(path))
    with open(path, "rb") as f:
        obj = safe_unpickle(f, str(path))
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise WeightsError(f"{path}: expected a pickle of {{'model': {{name: array}}}} (detectron2 format)")
    return state


# ---- the explicit key map --------------------------------------------------------------------------------------
def _norm_names(cfg: BottomUpConfig) -> tuple:
    if cfg.norm == "frozen_bn":
        return ("weight", "bias", "running_mean", "running_var")
    if cfg.norm == "bn":
        return ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return ("weight", "bias")


def detectron2_key_map(cfg: BottomUpConfig) -> dict:
    """{detectron2 state-dict name: glied state-dict name} for the whole model, built from the architecture.

    detectron2 puts the norm inside the conv (``res4.0.conv1.norm.weight``); glied wraps conv + norm
    (``res4.0.conv1.conv.weight``, ``res4.0.conv1.norm.weight``). RPN, box predictor and attribute head are
    renamed to glied's modules (``proposal_generator.rpn_head`` -> ``rpn.head``, ``box_predictor.fc_attr`` ->
    ``attr_head.fc`` ...)."""
    m = {}
    norm = _norm_names(cfg)

    def convnorm(d2: str, ours: str):
        m[d2 + ".weight"] = ours + ".conv.weight"
        for n in norm:
            m[f"{d2}.norm.{n}"] = f"{ours}.norm.{n}"

    convnorm("backbone.stem.conv1", "backbone.stem.conv1")
    stages = [("backbone.res2", "backbone.res2"), ("backbone.res3", "backbone.res3"),
              ("backbone.res4", "backbone.res4"), ("roi_heads.res5", "roi_heads.res5")]
    for (d2, ours), n in zip(stages, cfg.stage_blocks):
        for b in range(n):
            if b == 0:
                convnorm(f"{d2}.{b}.shortcut", f"{ours}.{b}.shortcut")
            for c in ("conv1", "conv2", "conv3"):
                convnorm(f"{d2}.{b}.{c}", f"{ours}.{b}.{c}")
    m[ANCHOR_KEY] = "rpn.cell_anchors"
    for layer in ("conv", "objectness_logits", "anchor_deltas"):
        for p in ("weight", "bias"):
            m[f"proposal_generator.rpn_head.{layer}.{p}"] = f"rpn.head.{layer}.{p}"
    bp = "roi_heads.box_predictor"
    for d2, ours in (("cls_score", "box_predictor.cls_score"), ("bbox_pred", "box_predictor.bbox_pred"),
                     ("fc_attr", "attr_head.fc"), ("attr_score", "attr_head.score")):
        for p in ("weight", "bias"):
            m[f"{bp}.{d2}.{p}"] = f"roi_heads.{ours}.{p}"
    m[f"{bp}.cls_embedding.weight"] = "roi_heads.attr_head.cls_embedding.weight"
    return m


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_detectron2_state(model: torch.nn.Module, state: dict, source: str = "weights") -> None:
    """Copy a detectron2-named state (name -> array) into ``model`` through :func:`detectron2_key_map`, strictly.

    The anchor buffer is optional (absent: the computed anchors stay); everything else must match one to one.
    Raises WeightsError naming missing, unexpected and mis-shaped keys."""
    kmap = detectron2_key_map(model.cfg)
    own = model.state_dict()
    unmapped = set(own) - set(kmap.values())
    if unmapped or not set(kmap.values()) <= set(own):
        raise WeightsError(f"internal key map out of sync with the model: model-only {_listing(unmapped)}; "
                           f"map-only {_listing(set(kmap.values()) - set(own))}")
    missing = [k for k in kmap if k not in state and k != ANCHOR_KEY]
    unexpected = [k for k in state if k not in kmap]
    misshaped = [f"{k} {tuple(np.shape(state[k]))} (model {tuple(own[kmap[k]].shape)})"
                 for k in kmap if k in state and tuple(np.shape(state[k])) != tuple(own[kmap[k]].shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {_listing(misshaped, 4)}")
        raise WeightsError(f"{source}: checkpoint does not fit the {model.cfg.depth}-layer bottom-up model "
                           f"({'; '.join(parts)}); is it faster_rcnn_from_caffe_attr.pkl?")
    with torch.no_grad():
        for k, ours in kmap.items():
            if k in state:
                t = own[ours]
                t.copy_(torch.as_tensor(np.asarray(state[k])).to(t.dtype))


# ---- glied checkpoints -----------------------------------------------------------------------------------------
# Format "glied-bottomup" (saved and loaded through glied.checkpoint): {format, version, config (BottomUpConfig),
# model (state dict), classes, attributes, extra}; a `glied train-detector` run adds its training state:
# extra {name, category_ids, attribute_types, train_config, epoch, iteration, history, rng} and optimizer.
DETECTOR = ck.Format("glied-bottomup", 1, "bottom-up detector", ("checkpoint.pt",),
                     "train one with `glied train-detector` or pass the published weights (.pkl)")


def save_checkpoint(path, model: torch.nn.Module, *, classes=None, attributes=None, extra: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a detector checkpoint atomically: a plain dict of tensors and JSON-able values (no code)."""
    obj = {"config": model.cfg.to_dict(),
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "classes": list(classes) if classes is not None else None,
           "attributes": list(attributes) if attributes is not None else None, "extra": extra or {}}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    ck.save(path, obj, DETECTOR)


def load_checkpoint(path) -> dict:
    """A detector checkpoint from a file or a run folder (its checkpoint.pt), loaded without executing code;
    WeightsError naming the file when missing, unreadable or not a glied bottom-up checkpoint."""
    return ck.load(path, DETECTOR, required=("config", "model"))


def model_from_checkpoint(ckpt: dict, **changes) -> torch.nn.Module:
    """Rebuild the ``BottomUpDetector`` of a loaded checkpoint (strict state-dict load), in eval mode.
    ``changes``: BottomUpConfig fields that do not change the weights (procedure, min_boxes, ...)."""
    from glied.extractors.bottomup.model import BottomUpDetector

    model = BottomUpDetector(BottomUpConfig.from_dict(ckpt["config"]).replace(**changes))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{ckpt.get('path', 'checkpoint')}: checkpoint does not fit its own model config: "
                           f"{str(e).splitlines()[0]}") from None
    return model.eval()


def checkpoint_vocab(ckpt: dict) -> dict:
    """{"class_names", "category_ids", "attribute_names", "attribute_types"} of a loaded checkpoint."""
    extra = ckpt.get("extra") or {}
    classes = list(ckpt.get("classes") or [])
    attributes = list(ckpt.get("attributes") or [])
    return {"class_names": classes,
            "category_ids": list(extra.get("category_ids") or range(1, len(classes) + 1)),
            "attribute_names": attributes,
            "attribute_types": list(extra.get("attribute_types") or [""] * len(attributes))}


# ---- fingerprint -----------------------------------------------------------------------------------------------
_FP_MEMO: dict = {}


def _fp_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glied" / "weights_sha256.json"


def weights_fingerprint(path) -> str:
    """"sha256:<hex>" of the file. Cached by (absolute path, size, mtime) in memory and in
    ``~/.cache/glied/weights_sha256.json``, so a 262 MB file is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if key in _FP_MEMO:
        return _FP_MEMO[key]
    cf = _fp_cache_file()
    try:
        disk = json.loads(cf.read_text())
    except (OSError, ValueError):
        disk = {}
    if key not in disk:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        disk[key] = "sha256:" + h.hexdigest()
        try:
            cf.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cf, disk)
        except OSError:
            pass
    _FP_MEMO[key] = disk[key]
    return disk[key]


def read_vocab(path) -> list | None:
    """One name per line (objects_vocab.txt / attributes_vocab.txt); None when the file is absent."""
    if path is None or not Path(path).is_file():
        return None
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
