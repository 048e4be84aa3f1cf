"""The bottom-up Faster R-CNN (Anderson et al. 2018), GeneralizedRCNN-style:

    x, info   = model.transform(image_bgr_u8)            # resize + mean subtraction, (1, 3, h, w)
    res4      = model.backbone(x)                        # (1, C4, h/16, w/16)
    obj, dlt  = model.rpn.head(res4)                     # (1, A, Hf, Wf), (1, 4A, Hf, Wf)
    proposals = model.rpn.propose(obj, dlt, info.input_hw)
    feats     = model.roi_heads.features(res4, rois)     # RoIPool 14x14 -> res5 -> mean: (K, 2048)
    logits... = model.roi_heads.predict(feats)           # classes (bg last), deltas, attributes

``BottomUpDetector.run_image`` does all of it for one image and returns every intermediate (``RawOutputs``);
the region-selection procedures (:mod:`.selection`) and the extractor (:mod:`.extractor`) build on it.
Training losses live in ``training.py`` (written against this module).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from glied.errors import InputError
from glied.extractors.bottomup import boxes as box_ops
from glied.extractors.bottomup.backbone import ResNetC4
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.roi_heads import RoIHeads
from glied.extractors.bottomup.rpn import RPN


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple:
    """detectron2 ``ResizeShortestEdge`` size rule: shorter side -> min_size, longer capped at max_size,
    each side rounded as int(x + 0.5)."""
    s = min_size * 1.0 / min(h, w)
    newh, neww = (min_size, s * w) if h < w else (s * h, min_size)
    if max(newh, neww) > max_size:
        s = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def resize_bgr(image: np.ndarray, hw: tuple, resizer: str, keep_uint8: bool = False) -> np.ndarray:
    """Resize a BGR uint8 (H, W, 3) image to ``hw``. "pil": PIL bilinear on uint8 (antialiased when shrinking,
    as the detectron2 port); "cv2": OpenCV INTER_LINEAR (as the original Caffe code; no antialiasing).
    Returns float32 (h, w, 3); with ``keep_uint8``, uint8 where the result is whole numbers (no resize, "pil")
    -- the same values in a quarter of the bytes."""
    h, w = hw
    if (h, w) == image.shape[:2]:
        return image if keep_uint8 else image.astype(np.float32)
    if resizer == "pil":
        from PIL import Image
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR),
                          dtype=np.uint8 if keep_uint8 else np.float32)
    import cv2
    return cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass
class ImageInfo:
    raw_hw: tuple       # original (H, W)
    input_hw: tuple     # resized (h, w) the network sees
    scale_xy: tuple     # (w / W, h / H): original pixels -> input pixels


class ImageTransform(nn.Module):
    """BGR uint8 (H, W, 3) numpy -> (1, 3, h, w) float32 minus the BGR pixel mean, plus an :class:`ImageInfo`."""

    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: np.ndarray, name: str = "image"):
        arr, info = resize_input(self.cfg, image, name)
        return self.from_resized(arr), info

    def from_resized(self, arr: np.ndarray) -> torch.Tensor:
        """An already-resized (h, w, 3) BGR array (uint8 or float) -> (1, 3, h, w) mean-subtracted tensor."""
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]   # (1, 3, h, w)
        return (x.to(self.pixel_mean.device) - self.pixel_mean).contiguous()

    def from_prepared(self, t: torch.Tensor) -> torch.Tensor:
        """:func:`prepare_input`'s (h, w, 3) tensor (uint8 or float32, pinned or not) -> (1, 3, h, w) minus the
        mean on the model's device, equal to :meth:`from_resized` of the same array. The copy is non-blocking:
        from pinned memory it overlaps the GPU's work on the batch before."""
        x = t.to(self.pixel_mean.device, non_blocking=True).permute(2, 0, 1)[None].float()   # (1, 3, h, w)
        return (x - self.pixel_mean).contiguous()


def resize_input(cfg: BottomUpConfig, image: np.ndarray, name: str = "image", keep_uint8: bool = False):
    """BGR uint8 (H, W, 3) -> (the network input (h, w, 3) before the mean, :class:`ImageInfo`); InputError for
    an image the network cannot take. uint8 with ``keep_uint8`` where lossless (see :func:`resize_bgr`)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise InputError(f"{name}: expected a BGR uint8 array (H, W, 3), got {desc}")
    h0, w0 = image.shape[:2]
    if h0 < 1 or w0 < 1:
        raise InputError(f"{name}: empty image ({h0}x{w0})")
    h, w = resized_hw(h0, w0, cfg.min_size, cfg.max_size)
    if min(h, w) < 2 * cfg.feature_stride:
        raise InputError(f"{name}: {w0}x{h0} is too elongated: resized to {w}x{h}, its short side is under "
                         f"{2 * cfg.feature_stride} px (crop or pad the image)")
    arr = resize_bgr(np.ascontiguousarray(image), (h, w), cfg.resizer, keep_uint8=keep_uint8)
    return arr, ImageInfo((h0, w0), (h, w), (w / w0, h / h0))


def prepare_input(cfg: BottomUpConfig, image: np.ndarray, name: str = "image"):
    """The CPU half of :class:`ImageTransform`, for DataLoader worker processes: BGR uint8 (H, W, 3) ->
    (tensor (h, w, 3), uint8 when lossless else float32, :class:`ImageInfo`); finish with
    :meth:`ImageTransform.from_prepared`. InputError as :func:`resize_input`."""
    arr, info = resize_input(cfg, image, name, keep_uint8=True)
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()), info      # (h, w, 3)


@dataclass
class RawOutputs:
    """Everything the detector computes for one image (torch tensors on CPU, float32).

    proposals (P, 4) input pixels sorted by objectness; objectness (P,) raw logits; features (P, D);
    cls_logits (P, C+1); box_deltas (P, 4C); attr_logits (P, A+1); plus the image geometry.
    """

    info: ImageInfo
    proposals: torch.Tensor
    objectness: torch.Tensor
    features: torch.Tensor
    cls_logits: torch.Tensor
    box_deltas: torch.Tensor
    attr_logits: torch.Tensor

    @property
    def cls_probs(self) -> torch.Tensor:
        """(P, C+1) softmax over all logits, background last."""
        return torch.softmax(self.cls_logits, dim=1)

    @property
    def attr_probs(self) -> torch.Tensor:
        """(P, A) the port's attribute probabilities: softmax over the first A logits ("none" dropped first)."""
        return torch.softmax(self.attr_logits[:, :-1], dim=1)

    def regressed_boxes(self, weights, scale_clamp) -> torch.Tensor:
        """(P, 4C) class-specific regressed boxes in input pixels (unclipped)."""
        return box_ops.decode(self.box_deltas, self.proposals, weights, scale_clamp)


class BottomUpDetector(nn.Module):
    """The bottom-up detector; see the module docstring for the composition. Build with a
    :class:`BottomUpConfig` (``BottomUpConfig.r101_vg()`` for the published model)."""

    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        self.cfg = cfg
        self.transform = ImageTransform(cfg)
        self.backbone = ResNetC4(cfg)
        self.rpn = RPN(cfg)
        self.roi_heads = RoIHeads(cfg)
        self.compute_dtype = torch.float32      # input dtype and memory format (optimise_for_inference)
        self.channels_last = False

    def replace_cfg(self, **changes) -> "BottomUpDetector":
        """Change settings that do not touch the architecture (thresholds, selection, res5_chunk, resizer)."""
        arch = {"stage_blocks", "base_width", "stem_channels", "norm", "gn_groups", "stride_in_1x1", "caffe_maxpool",
                "res5_dilation", "num_classes", "num_attributes", "attr_embed_dim", "attr_hidden", "rpn_hidden",
                "anchor_sizes", "anchor_ratios", "pooler_resolution", "feature_stride"}
        if arch & set(changes):
            raise ValueError(f"replace_cfg cannot change the architecture: {sorted(arch & set(changes))}")
        cfg = self.cfg.replace(**changes)
        for m in (self, self.transform, self.rpn, self.roi_heads):
            m.cfg = cfg
        return self

    def optimise_for_inference(self, *, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                               fuse_frozen_bn: bool = True, res5_channels_last: bool | None = None,
                               res5_fuse_frozen_bn: bool | None = None,
                               res5_gemm: bool = False) -> "BottomUpDetector":
        """In place, for inference only: fold every FrozenBN into its conv (weight * s, bias b - mean * s with
        s = w / sqrt(var + eps), computed in float64), cast res5 to ``dtype`` (backbone and RPN stay float32)
        (the box predictor and attribute head stay float32 on float32 features), and use channels-last memory.
        ``res5_channels_last`` / ``res5_fuse_frozen_bn`` set those two for res5 alone (None: as the rest), so
        res5 (nine tenths of the FLOPs) can take the fast layout while backbone and RPN keep the port's exact
        rounding. ``res5_gemm`` (float32 only): run res5 as
        :class:`~glied.extractors.bottomup.res5_gemm.GemmRes5` (1x1 convolutions as one GEMM over all RoIs of a
        chunk, FrozenBN folded there). The state dict no longer has the detectron2 layout afterwards."""
        from glied.extractors.bottomup.backbone import ConvNorm, FrozenBatchNorm2d
        from glied.extractors.bottomup.res5_gemm import GemmRes5

        if res5_gemm and dtype != torch.float32:
            raise ValueError("res5_gemm is the float32 path; reduced precision casts the convolutions instead")
        res5_channels_last = channels_last if res5_channels_last is None else res5_channels_last
        res5_fuse_frozen_bn = fuse_frozen_bn if res5_fuse_frozen_bn is None else res5_fuse_frozen_bn
        parts = ([self.backbone, self.rpn] if fuse_frozen_bn else []) + ([self.roi_heads] if res5_fuse_frozen_bn
                                                                        else [])
        with torch.no_grad():
            for mod in (m for part in parts for m in part.modules()):
                if isinstance(mod, ConvNorm) and isinstance(mod.norm, FrozenBatchNorm2d):
                    n, conv = mod.norm, mod.conv
                    scale = n.weight.double() / torch.sqrt(n.running_var.double() + n.eps)
                    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
                    bias = (n.bias.double() - n.running_mean.double() * scale).to(conv.weight.dtype)
                    conv.bias = nn.Parameter(bias, requires_grad=False)
                    mod.norm = nn.Identity()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # Only res5 (9/10 of the FLOPs) runs in reduced precision; backbone and RPN stay float32, so the
        # proposals are those of fp32 (bf16 there moves borderline proposals and hence the selected boxes).
        for part in (self.backbone, self.rpn.head):
            part.to(dtype=torch.float32, memory_format=fmt)
        self.roi_heads.res5.to(dtype=dtype, memory_format=torch.channels_last if res5_channels_last
                               else torch.contiguous_format)
        self.roi_heads.res5_gemm = GemmRes5(self.roi_heads.res5) if res5_gemm else None
        self.compute_dtype = torch.float32
        self.channels_last = channels_last
        self.roi_heads.compute_dtype = dtype
        self.roi_heads.channels_last = res5_channels_last
        return self

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return x.to(device=p.device, dtype=self.compute_dtype).contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def proposals_for(self, x: torch.Tensor, input_hw: tuple):
        """x (1, 3, h, w) -> res4, (proposal boxes (P, 4), objectness logits (P,))."""
        res4 = self.backbone(self._prep(x))
        obj, dlt = self.rpn.head(res4)
        props, logits = self.rpn.propose(obj, dlt, input_hw)[0]
        return res4, props.float(), logits.float()

    def box_outputs(self, res4: torch.Tensor, boxes: torch.Tensor):
        """Features and head outputs for boxes (K, 4) in input pixels of one image (batch index 0)."""
        return self.box_outputs_many([res4], [boxes])[0]

    def box_outputs_many(self, res4s: list, boxes: list) -> list:
        """:meth:`box_outputs` of several images, their RoIs through the RoI head together:
        res4s[i] (1, C4, Hf_i, Wf_i), boxes[i] (K_i, 4) -> [(features, cls_logits, deltas, attr_logits)]."""
        rois = [torch.cat([b.new_zeros((b.shape[0], 1)), b], dim=1) for b in boxes]   # (K_i, 5)
        feats = self.roi_heads.features_many(res4s, rois)
        if not feats:
            return []
        if len(feats) == 1:
            heads = [self.roi_heads.predict(feats[0])]
        else:       # the small heads once over all RoIs, split back per image
            sizes = [int(f.shape[0]) for f in feats]
            heads = list(zip(*(t.split(sizes) for t in self.roi_heads.predict(torch.cat(feats, dim=0)))))
        return [(f.float(), *h) for f, h in zip(feats, heads)]

    def run_resized(self, x: torch.Tensor, info: ImageInfo) -> RawOutputs:
        """All intermediate outputs for one already-transformed image x (1, 3, h, w)."""
        return self.run_batch([x], [info])[0]

    def run_batch(self, xs: list, infos: list) -> list:
        """All intermediate outputs for several transformed images xs[i] (1, 3, h_i, w_i). Backbone and RPN run
        per image (the sizes differ, and padding to a common size would change the outputs at the borders);
        the RoI head runs over the proposals of all images at once. Equal to :meth:`run_resized` per image up
        to float rounding."""
        res4s, props, logits = [], [], []
        for x, info in zip(xs, infos):
            r, p, lg = self.proposals_for(x, info.input_hw)
            res4s.append(r), props.append(p), logits.append(lg)
        heads = self.box_outputs_many(res4s, [p.to(r.device) for p, r in zip(props, res4s)])
        return [RawOutputs(info, p.cpu(), lg.cpu(), f.cpu(), c.cpu(), d.cpu(), a.cpu())
                for info, p, lg, (f, c, d, a) in zip(infos, props, logits, heads)]

    def run_image(self, image: np.ndarray, name: str = "image") -> RawOutputs:
        """One BGR uint8 image at its original size -> :class:`RawOutputs`."""
        x, info = self.transform(image, name)
        return self.run_resized(x, info)

    # ---- training interface (used by training.detector_losses; nothing outside reaches into submodules) ----
    def losses(self, images: torch.Tensor, image_sizes: list, targets: list, train_cfg,
               generator: torch.Generator | None = None) -> dict:
        """The training losses of a batch (train mode): {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "attr"},
        scalar tensors whose sum is the loss. ``images`` (B, 3, H, W) transformed and zero-padded,
        ``image_sizes`` (h, w) of each image inside the batch, ``targets`` per image {"boxes" (G, 4) in input
        pixels, "classes" (G,), "attributes" (G, L)}, ``train_cfg`` a ``training.DetectorTrainConfig``.
        See :func:`glied.extractors.bottomup.training.detector_losses` for the recipe."""
        from glied.extractors.bottomup.training import detector_losses

        return detector_losses(self, images, image_sizes, targets, train_cfg, generator)

    def rpn_outputs(self, images: torch.Tensor):
        """(B, 3, H, W) -> res4 (B, C4, Hf, Wf), objectness (B, A, Hf, Wf), deltas (B, 4A, Hf, Wf), anchors
        (Hf*Wf*A, 4) in (y, x, a) order."""
        res4 = self.backbone(images)
        objectness, deltas = self.rpn.head(res4)
        anchors = self.rpn.anchors(*objectness.shape[-2:]).to(images.dtype)
        return res4, objectness, deltas, anchors

    def propose(self, objectness: torch.Tensor, deltas: torch.Tensor, image_sizes: list,
                pre_nms_topk: int | None = None, post_nms_topk: int | None = None) -> list:
        """Per image, proposal boxes (P, 4) in input pixels (the RPN's post-NMS top-N); the top-k counts
        default to the config's (test-time) values."""
        return [p[0] if isinstance(p, tuple) else p
                for p in self.rpn.propose(objectness, deltas, image_sizes, pre_nms_topk, post_nms_topk)]

    def region_outputs(self, res4: torch.Tensor, rois: torch.Tensor):
        """rois (K, 5) [batch index, x1, y1, x2, y2] -> features (K, D), class logits (K, C+1), box deltas
        (K, 4C): RoI pool -> res5 -> mean -> box predictor, as at test time."""
        feats = self.roi_heads.features(res4, rois)
        cls_logits, box_deltas = self.roi_heads.box_predictor(feats)
        return feats, cls_logits, box_deltas

    def attribute_logits(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(K, D) features and the class index each is conditioned on (K,) -> attribute logits (K, A+1)."""
        return self.roi_heads.attr_head(feats, classes)
