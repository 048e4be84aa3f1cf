"""The region extractor used by ``glied extract`` and ``glied caption``: weights -> RegionFeatures per image.

    ext = load_region_extractor("faster_rcnn_from_caffe_attr.pkl", precision="bf16", procedure="butd")
    regions = ext.extract([bgr_uint8_image, ...])            # list[RegionFeatures], boxes in original pixels
    given = ext.extract_given_boxes(image, boxes_xyxy)        # RegionFeatures for exactly those boxes

``weights`` is either the published detectron2-format pickle (loaded through a restricted unpickler and a strict
key map; vocabularies ``objects_vocab.txt`` / ``attributes_vocab.txt`` beside it, optional) or a glied
checkpoint (``save_checkpoint``; config and vocabularies inside).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glied import checkpoint as ck
from glied.errors import ConfigError, InputError, WeightsError
from glied.extractors.bottomup import selection as sel
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.precision import torch_dtype
from glied.extractors.bottomup.model import BottomUpDetector, RawOutputs, prepare_input
from glied.extractors.bottomup.weights import (DETECTOR, load_checkpoint, load_detectron2_state,
                                               missing_weights_message, model_from_checkpoint,
                                               read_detectron2_pickle, read_vocab, weights_fingerprint)
from glied.records import RegionFeatures

PRECISIONS = ("fp32", "bf16", "fp16")
# fp32 on CPU: "exact" = the port's rounding everywhere (NCHW, FrozenBN as separate ops; bit-identical outputs);
# "fast" = backbone and RPN exact, res5 with FrozenBN folded and channels-last; "gemm" = res5 as GemmRes5
FP32_MODES = ("exact", "fast", "gemm")
FP32_DEFAULT = "exact"      # the faster modes measured within a few % of it (docs/extraction_speed.md)


@dataclass
class GivenBoxOutputs:
    """Outputs for user-given boxes: ``regions`` (RegionFeatures, boxes exactly as given), ``cls_probs`` (K, C+1)
    softmax over all classes, background LAST, ``attr_probs`` (K, A) the port's attribute softmax over the A real
    attributes, ``attr_cond_class`` (K,) the class index the attribute head was conditioned on."""

    regions: RegionFeatures
    cls_probs: np.ndarray
    attr_probs: np.ndarray
    attr_cond_class: np.ndarray


class RegionExtractor:
    """A loaded bottom-up detector plus its selection procedure and precision. Thread-compatible, not
    thread-safe. Build with :func:`load_region_extractor`. It takes ownership of ``model``: FrozenBN layers are
    folded into the convs, and the conv stacks cast to the precision's dtype, in place."""

    def __init__(self, model: BottomUpDetector, *, precision: str = "fp32", fingerprint: str = "",
                 classes=None, attributes=None, name: str = "bottomup", channels_last: bool | None = None,
                 fuse_frozen_bn: bool | None = None, fp32_mode: str | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model.eval()
        self.cfg = model.cfg
        self.precision = precision
        self.fingerprint = fingerprint
        self.classes = classes                 # Visual Genome object class names (None: ids only)
        self.box_attributes = attributes       # Visual Genome box attribute names (None: ids only)
        self.name = name
        self.device = next(model.parameters()).device
        fp32_mode = fp32_mode or (FP32_DEFAULT if self.device.type == "cpu" and self.cfg.norm != "gn" else "exact")
        if fp32_mode not in FP32_MODES:
            raise ConfigError(f"fp32_mode must be one of {FP32_MODES}, got {fp32_mode!r}")
        self.fp32_mode = fp32_mode if precision == "fp32" else None
        if channels_last is None:
            # fp32 keeps NCHW in backbone and RPN: the port's summation order, so borderline decisions (e.g. the
            # IoU of sliver proposals clipped at the border) match the port. bf16/fp16: on.
            channels_last = precision != "fp32"
        self.channels_last = channels_last
        if fuse_frozen_bn is None:
            # fp32 keeps FrozenBN as separate ops in backbone and RPN: the port's exact rounding (bit-identical
            # proposals); folding shifts ~1e-7 and can flip the IoU of sliver proposals at the border.
            fuse_frozen_bn = precision != "fp32"
        # fp32 "fast" / "gemm": res5 (nine tenths of the FLOPs; per RoI, after the proposals are fixed) folded and
        # channels-last, or as GEMMs; its outputs then differ from the port's by float32 rounding only.
        res5_fast = self.fp32_mode in ("fast", "gemm")
        dtype = torch_dtype(precision)
        # the extractor owns the model: BN folding and the dtype/memory-format changes happen in place
        self.model.optimise_for_inference(dtype=dtype, channels_last=channels_last, fuse_frozen_bn=fuse_frozen_bn,
                                          res5_channels_last=True if res5_fast else None,
                                          res5_fuse_frozen_bn=True if res5_fast else None,
                                          res5_gemm=self.fp32_mode == "gemm")

    # ---- identity --------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """{name, config, weights_fingerprint, feature_dim}: everything that determines the features."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k != "res5_chunk"}   # speed-only, same maths
        return {"name": self.name, "config": dict(cfg, precision=self.precision),
                "weights_fingerprint": self.fingerprint, "feature_dim": self.cfg.feature_dim}

    # ---- running ---------------------------------------------------------------------------------------------
    def raw(self, image: np.ndarray, name: str = "image") -> RawOutputs:
        """All detector outputs for one BGR uint8 image (see :class:`RawOutputs`)."""
        with torch.inference_mode():
            return self.model.run_image(image, name)

    def raw_batch(self, images: list, names: list | None = None) -> list:
        """:meth:`raw` of several images in one forward (backbone and RPN per image, the RoI head over the RoIs of
        all of them; see ``BottomUpDetector.run_batch``)."""
        names = names or [f"image {i}" for i in range(len(images))]
        with torch.inference_mode():
            xs, infos = zip(*(self.model.transform(im, nm) for im, nm in zip(images, names))) if images else ((), ())
            return self.model.run_batch(list(xs), list(infos))

    def select(self, out: RawOutputs, procedure: str | None = None) -> sel.Selection:
        """Apply a region-selection procedure ("butd" | "fixed36" | "adapt"; default from the config)."""
        cfg = self.cfg
        procedure = procedure or cfg.procedure
        probs = out.cls_probs
        if procedure == "butd":
            return sel.select_butd(out.proposals, probs, nms_thresh=cfg.nms_thresh, score_thresh=cfg.score_thresh,
                                   min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes)
        reg = out.regressed_boxes(cfg.roi_bbox_weights, cfg.bbox_scale_clamp)
        if procedure == "fixed36":
            return sel.select_fixed36(reg, probs, out.info.input_hw, score_thresh=cfg.score_thresh)
        if procedure == "adapt":
            return sel.select_adapt(reg, probs, out.info.input_hw, min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes)
        raise ConfigError(f"unknown region-selection procedure {procedure!r} (butd | fixed36 | adapt)")

    def regions(self, out: RawOutputs, s: sel.Selection) -> RegionFeatures:
        """RegionFeatures from raw outputs and a selection (boxes back in original pixels, clipped)."""
        attr_scores, attr_ids = out.attr_probs[s.idx].max(dim=1) if len(s) else (torch.zeros(0),
                                                                                torch.zeros(0, dtype=torch.int64))
        h, w = out.info.raw_hw
        return RegionFeatures(
            boxes=sel.to_original(s.boxes, out.info.input_hw, out.info.raw_hw).numpy().astype(np.float32),
            features=out.features[s.idx].numpy().astype(np.float32),
            obj_ids=s.obj_ids.numpy().astype(np.int64), obj_scores=s.obj_scores.numpy().astype(np.float32),
            attr_ids=attr_ids.numpy().astype(np.int64), attr_scores=attr_scores.numpy().astype(np.float32),
            image_w=int(w), image_h=int(h))

    def extract(self, images: list, names: list | None = None, procedure: str | None = None) -> list:
        """BGR uint8 images (H, W, 3) at their original sizes -> list[RegionFeatures] (boxes in original pixels),
        all in one batched forward (:meth:`raw_batch`). ``names`` (optional) label the images in error messages."""
        return [self.regions(out, self.select(out, procedure)) for out in self.raw_batch(images, names)]

    def input_preparer(self):
        """A picklable function ``(image BGR uint8 (H, W, 3), name) -> prepared`` that resizes an image to the
        network input on the CPU (DataLoader worker processes run it; InputError for an image the network
        cannot take). Hand a batch of its results to :meth:`extract_prepared`."""
        return functools.partial(prepare_input, self.cfg)

    def extract_prepared(self, prepared: list, procedure: str | None = None) -> list:
        """:meth:`extract` of images already run through :meth:`input_preparer` (their tensors may be in pinned
        memory: they reach the device with non-blocking copies). Equal to :meth:`extract` of the images."""
        with torch.inference_mode():
            xs = [self.model.transform.from_prepared(t) for t, _ in prepared]
            outs = self.model.run_batch(xs, [info for _, info in prepared])
        return [self.regions(out, self.select(out, procedure)) for out in outs]

    def predict_given_boxes(self, image: np.ndarray, boxes, name: str = "image") -> GivenBoxOutputs:
        """Features, class and attribute probabilities for exactly the given boxes (K, 4) x1, y1, x2, y2 in original
        pixels: no proposals, no regression, no selection. The boxes are scaled to the network input (x and y
        separately, float32) and RoI-pooled; the attribute head is conditioned on the argmax over all C+1 class
        logits, background included (as the port); obj_ids/obj_scores are the best foreground class."""
        b = np.asarray(boxes, dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != 4:
            raise InputError(f"{name}: boxes must be a (K, 4) list of x1, y1, x2, y2, got shape {b.shape}")
        if not isinstance(image, np.ndarray) or image.ndim != 3:
            raise InputError(f"{name}: expected a BGR uint8 array (H, W, 3)")
        h0, w0 = image.shape[:2]
        for k, (x1, y1, x2, y2) in enumerate(b.tolist()):
            if not all(np.isfinite([x1, y1, x2, y2])) or x1 < 0 or y1 < 0 or x2 > w0 or y2 > h0:
                raise InputError(f"{name}: box {k} [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the {w0}x{h0} image")
            if x2 <= x1 or y2 <= y1:
                raise InputError(f"{name}: box {k} [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has zero area (need x2 > x1, "
                                 f"y2 > y1)")
        with torch.inference_mode():
            x, info = self.model.transform(image, name)
            h, w = info.input_hw
            sx, sy = np.float32(w / w0), np.float32(h / h0)
            bin_ = torch.from_numpy(b * np.array([sx, sy, sx, sy], dtype=np.float32))   # (K, 4) input pixels
            res4 = self.model.backbone(self.model._prep(x))
            feats, cls_logits, _, attr_logits = self.model.box_outputs(res4, bin_.to(res4.device))
        cls_probs = torch.softmax(cls_logits.float().cpu(), dim=1)
        attr_probs = torch.softmax(attr_logits.float().cpu()[:, :-1], dim=1)
        obj_scores, obj_ids = cls_probs[:, :-1].max(dim=1)
        attr_scores, attr_ids = attr_probs.max(dim=1)
        regions = RegionFeatures(boxes=b.copy(), features=feats.float().cpu().numpy(), obj_ids=obj_ids.numpy(),
                                 obj_scores=obj_scores.numpy(), attr_ids=attr_ids.numpy(),
                                 attr_scores=attr_scores.numpy(), image_w=int(w0), image_h=int(h0))
        return GivenBoxOutputs(regions, cls_probs.numpy(), attr_probs.numpy(),
                               cls_logits.float().argmax(dim=1).cpu().numpy())

    def extract_given_boxes(self, image: np.ndarray, boxes, name: str = "image") -> RegionFeatures:
        """RegionFeatures for exactly the given boxes (see :meth:`predict_given_boxes`)."""
        return self.predict_given_boxes(image, boxes, name).regions


def load_region_extractor(weights, *, device: str = "cpu", precision: str = "fp32", procedure: str = "butd",
                          resizer: str | None = None, config: BottomUpConfig | None = None,
                          classes_file=None, attributes_file=None, **overrides) -> RegionExtractor:
    """Load the bottom-up region extractor.

    Args:
        weights: the published ``faster_rcnn_from_caffe_attr.pkl`` (detectron2 format; architecture
            ``BottomUpConfig.r101_vg()`` unless ``config`` is given) or a glied detector checkpoint (.pt, or
            the `glied train-detector` run folder holding it).
        device: "cpu" or a torch device string ("cuda", "cuda:1").
        precision: "fp32" | "bf16" | "fp16" (res5 cast to that dtype; backbone and RPN stay fp32) | "auto"
            (:func:`glied.extractors.precision.resolve_precision`: bf16 where the hardware has it natively).
        procedure: region selection "butd" (original Caffe rule, 10..100, default) | "fixed36" | "adapt".
        resizer: "pil" (the port) | "cv2" (original Caffe); default from the config ("pil").
        classes_file / attributes_file: vocabularies (one name per line); default ``objects_vocab.txt`` /
            ``attributes_vocab.txt`` beside a .pkl; missing -> ``classes``/``attributes`` are None (ids only).
        overrides: other BottomUpConfig fields (min_boxes, max_boxes, score_thresh, res5_chunk, ...).
    Raises WeightsError (missing/unsafe/mismatched weights), ConfigError (bad options).
    """
    path = Path(weights)
    if path.is_dir():  # a `glied train-detector` run folder
        path = ck.resolve(path, DETECTOR)
    if not path.is_file():
        raise WeightsError(missing_weights_message(path))
    if precision == "auto":
        from glied.extractors.precision import resolve_precision
        precision = resolve_precision("auto", device).precision
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    changes = dict(overrides, procedure=procedure)
    if resizer is not None:
        changes["resizer"] = resizer
    if path.suffix == ".pkl":
        cfg = (config or BottomUpConfig.r101_vg()).replace(**changes)
        model = BottomUpDetector(cfg)
        load_detectron2_state(model, read_detectron2_pickle(path), str(path))
        classes = read_vocab(classes_file or path.with_name("objects_vocab.txt"))
        attributes = read_vocab(attributes_file or path.with_name("attributes_vocab.txt"))
        name = "bottomup-r101-c4-vg" if cfg.stage_blocks == (3, 4, 23, 3) else "bottomup"
    else:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state, **changes)
        cfg = model.cfg
        classes = read_vocab(classes_file) if classes_file else state.get("classes")
        attributes = read_vocab(attributes_file) if attributes_file else state.get("attributes")
        name = "bottomup-" + state.get("extra", {}).get("name", "small")
    for what, vocab, n in (("classes", classes, cfg.num_classes), ("attributes", attributes, cfg.num_attributes)):
        if vocab is not None and len(vocab) != n:
            raise WeightsError(f"{path}: the {what} vocabulary has {len(vocab)} names, the model {n}")
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device {device!r} is not usable here: {e}") from None
    return RegionExtractor(model, precision=precision, fingerprint=weights_fingerprint(path), classes=classes,
                           attributes=attributes, name=name)
