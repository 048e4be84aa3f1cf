"""Configuration of the bottom-up Faster R-CNN (ResNet C4, Visual Genome classes and attributes).

One frozen dataclass holds everything that changes the model's output: the architecture, the input
transform, the RPN test-time settings and the region-selection procedure. It travels inside every
checkpoint (``to_dict``) and rebuilds the model alone (``from_dict``).

Two presets:
- :meth:`BottomUpConfig.r101_vg` — the published model (Anderson et al. 2018) as converted to detectron2 by
  py-bottom-up-attention (``faster_rcnn_from_caffe_attr.pkl``), with the extraction settings of the port's
  scripts (input 600/1000, 300 proposals).
- :meth:`BottomUpConfig.small` — the same code with a light, trainable backbone for the shapes world.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from glied.errors import ConfigError

RESIZERS = ("pil", "cv2")
PROCEDURES = ("butd", "fixed36", "adapt")
NORMS = ("frozen_bn", "bn", "gn")


@dataclass(frozen=True)
class BottomUpConfig:
    """Bottom-up detector configuration.

    Architecture: ResNet stem + stages res2..res4 (backbone, stride 16) and res5 (run per RoI in the RoI head,
    stride 1, dilation 2). ``stage_blocks`` gives the bottleneck-block count of res2, res3, res4, res5
    (ResNet-101: 3, 4, 23, 3); ``base_width`` the bottleneck width of res2 (64 in ResNet), doubling per stage,
    with output channels 4x the bottleneck width; the region feature has ``feature_dim = 32 * base_width``
    channels (2048). Class index ``num_classes`` is background (LAST); attribute index ``num_attributes`` is
    "no attribute" (LAST).
    """

    # backbone
    stage_blocks: tuple = (3, 4, 23, 3)
    base_width: int = 64
    stem_channels: int = 64
    norm: str = "frozen_bn"          # "frozen_bn" (published) | "bn" | "gn" (small, trainable)
    gn_groups: int = 8
    stride_in_1x1: bool = True       # caffe ResNet: the stride-2 of res3/res4 sits in the first 1x1 conv
    caffe_maxpool: bool = True       # stem max-pool 3x3/2 pad 0 ceil_mode (caffe) instead of pad 1
    res5_dilation: int = 2           # res5 inside the RoI head: stride 1, 3x3 convs dilated
    # heads
    num_classes: int = 1600          # foreground classes; logits have num_classes + 1, background LAST
    num_attributes: int = 400        # attribute logits have num_attributes + 1, "no attribute" LAST
    attr_embed_dim: int = 256
    attr_hidden: int = 512
    # RPN
    anchor_sizes: tuple = (64, 128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    feature_stride: int = 16
    rpn_hidden: int = 512
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0
    rpn_bbox_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    # RoI head
    pooler_resolution: int = 14
    roi_bbox_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    bbox_scale_clamp: float = 4.135166556742356   # log(1000 / 16), as detectron2
    # input transform
    pixel_mean: tuple = (102.9801, 115.9465, 122.7717)   # BGR, no std division
    min_size: int = 600
    max_size: int = 1000
    resizer: str = "pil"             # "pil": bilinear on uint8 (the port); "cv2": INTER_LINEAR on float (Caffe)
    # region selection
    procedure: str = "butd"          # "butd" (original Caffe rule) | "fixed36" (attribute demo) | "adapt" (port)
    nms_thresh: float = 0.3
    score_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    # speed (no effect on the maths)
    res5_chunk: int = 16             # RoIs per res5 call: small chunks stay in cache (2x faster than one batch)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"BottomUpConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.resizer not in RESIZERS:
            raise ConfigError(f"BottomUpConfig.resizer must be one of {RESIZERS}, got {self.resizer!r}")
        if self.procedure not in PROCEDURES:
            raise ConfigError(f"BottomUpConfig.procedure must be one of {PROCEDURES}, got {self.procedure!r}")
        if len(self.stage_blocks) != 4 or min(self.stage_blocks) < 1:
            raise ConfigError(f"BottomUpConfig.stage_blocks needs 4 positive block counts, got {self.stage_blocks}")
        if not (1 <= self.min_boxes <= self.max_boxes):
            raise ConfigError(f"BottomUpConfig needs 1 <= min_boxes <= max_boxes, got "
                              f"{self.min_boxes}..{self.max_boxes}")
        if self.res5_chunk < 1:
            raise ConfigError(f"BottomUpConfig.res5_chunk must be >= 1, got {self.res5_chunk}")

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """ResNet depth (101 for (3, 4, 23, 3)): 3 convs per bottleneck + stem conv + the classifier."""
        return 3 * sum(self.stage_blocks) + 2

    @property
    def res4_channels(self) -> int:
        return self.base_width * 4 * 4

    @property
    def feature_dim(self) -> int:
        return self.base_width * 4 * 8

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    # ---- presets -----------------------------------------------------------------------------------
    @classmethod
    def r101_vg(cls, **overrides: Any) -> "BottomUpConfig":
        """The published ResNet-101 C4 Visual Genome model (1600 classes, 400 attributes) with the settings of
        py-bottom-up-attention's extraction scripts (input 600/1000, 300 proposals, PIL resize)."""
        return cls(**overrides)

    @classmethod
    def small(cls, num_classes: int = 8, num_attributes: int = 12, *, stage_blocks: tuple = (1, 1, 1, 1),
              base_width: int = 16, stem_channels: int = 16, norm: str = "bn", min_size: int = 128,
              max_size: int = 128, **overrides: Any) -> "BottomUpConfig":
        """A light, trainable variant of the same model for the shapes world (about 1/16 the width of R101 and one
        block per stage; ordinary BatchNorm; input 128 px; anchors scaled to the small images)."""
        defaults = dict(num_classes=num_classes, num_attributes=num_attributes, stage_blocks=tuple(stage_blocks),
                        base_width=base_width, stem_channels=stem_channels, norm=norm, min_size=min_size,
                        max_size=max_size, attr_embed_dim=32, attr_hidden=64, rpn_hidden=64,
                        anchor_sizes=(16, 32, 64, 128), rpn_pre_nms_topk=1000, rpn_post_nms_topk=100,
                        pooler_resolution=7, min_boxes=1, max_boxes=20, res5_chunk=64)
        defaults.update(overrides)
        return cls(**defaults)

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "BottomUpConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError (naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown BottomUpConfig fields {unknown}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def replace(self, **changes: Any) -> "BottomUpConfig":
        return dataclasses.replace(self, **changes)
