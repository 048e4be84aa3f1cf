"""ResNet C4 backbone of the bottom-up detector (caffe flavour, as converted by py-bottom-up-attention).

Caffe details that change the output (all configurable in :class:`BottomUpConfig`):
- stem: conv 7x7/2 pad 3 -> norm -> ReLU -> max-pool 3x3/2 with **pad 0 and ceil_mode** (caffe rounding);
- ``stride_in_1x1``: the stride 2 of res3/res4 sits in the block's first 1x1 conv (and the 1x1 shortcut);
- FrozenBN: y = (x - mean) / sqrt(var + 1e-5) * weight + bias, all four tensors fixed buffers;
- res5 (built here, used per RoI by the RoI head): stride 1 in block 0, dilation ``res5_dilation`` in every 3x3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glied.extractors.bottomup.config import BottomUpConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers (nothing trains)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def make_norm(cfg: BottomUpConfig, channels: int) -> nn.Module:
    if cfg.norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if cfg.norm == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(cfg.gn_groups, channels), channels)


class ConvNorm(nn.Module):
    """conv (no bias) -> norm. ``conv`` and ``norm`` are the children the detectron2 key map fills."""

    def __init__(self, cfg: BottomUpConfig, cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False)
        self.norm = make_norm(cfg, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with a projection shortcut when the channel count or stride changes."""

    def __init__(self, cfg: BottomUpConfig, cin: int, cout: int, mid: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        s1, s3 = (stride, 1) if cfg.stride_in_1x1 else (1, stride)
        self.shortcut = ConvNorm(cfg, cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else None
        self.conv1 = ConvNorm(cfg, cin, mid, 1, stride=s1)
        self.conv2 = ConvNorm(cfg, mid, mid, 3, stride=s3, dilation=dilation)
        self.conv3 = ConvNorm(cfg, mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


def make_stage(cfg: BottomUpConfig, n: int, cin: int, cout: int, mid: int, stride: int,
               dilation: int = 1) -> nn.Sequential:
    blocks = [Bottleneck(cfg, cin if i == 0 else cout, cout, mid, stride if i == 0 else 1, dilation)
              for i in range(n)]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        self.conv1 = ConvNorm(cfg, 3, cfg.stem_channels, 7, stride=2)
        self.caffe_maxpool = cfg.caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNetC4(nn.Module):
    """Stem + res2..res4. Input (B, 3, H, W) mean-subtracted BGR -> res4 (B, 16 * base_width, ~H/16, ~W/16)."""

    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        w = cfg.base_width
        b2, b3, b4, _ = cfg.stage_blocks
        self.stem = Stem(cfg)
        self.res2 = make_stage(cfg, b2, cfg.stem_channels, 4 * w, w, 1)
        self.res3 = make_stage(cfg, b3, 4 * w, 8 * w, 2 * w, 2)
        self.res4 = make_stage(cfg, b4, 8 * w, 16 * w, 4 * w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


def make_res5(cfg: BottomUpConfig) -> nn.Sequential:
    """res5 as the RoI head runs it: 16w -> 32w channels, stride 1, 3x3 convs dilated by ``res5_dilation``."""
    w = cfg.base_width
    return make_stage(cfg, cfg.stage_blocks[3], 16 * w, 32 * w, 8 * w, 1, cfg.res5_dilation)
