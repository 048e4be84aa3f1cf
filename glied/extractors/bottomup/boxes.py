"""Box coding and geometry in detectron2's continuous convention (width = x2 - x1, no +1), as the port uses.

All boxes are (N, 4) x1, y1, x2, y2. ``encode``/``decode`` are the Faster R-CNN parameterisation with per-axis
weights (RPN (1, 1, 1, 1), RoI head (10, 10, 5, 5)); ``decode`` accepts class-specific deltas (N, 4C).
"""
from __future__ import annotations

import math

import torch

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def encode(src: torch.Tensor, dst: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Regression targets (N, 4) [dx, dy, dw, dh] that turn boxes ``src`` (N, 4) into ``dst`` (N, 4): the
    inverse of :func:`decode`, scaled by ``weights``. Degenerate widths are clamped to 1e-3, so a bad box
    cannot make a NaN training target."""
    wx, wy, ww, wh = weights
    sw, sh = (src[:, 2] - src[:, 0]).clamp(min=1e-3), (src[:, 3] - src[:, 1]).clamp(min=1e-3)
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dw, dh = (dst[:, 2] - dst[:, 0]).clamp(min=1e-3), (dst[:, 3] - dst[:, 1]).clamp(min=1e-3)
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return torch.stack((wx * (dx - sx) / sw, wy * (dy - sy) / sh,
                        ww * torch.log(dw / sw), wh * torch.log(dh / sh)), dim=1)


def decode(deltas: torch.Tensor, boxes: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0),
           scale_clamp: float = DEFAULT_SCALE_CLAMP) -> torch.Tensor:
    """Apply ``deltas`` (N, 4k) to ``boxes`` (N, 4); returns (N, 4k) boxes (k = 1 or the class count)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    x1 = pred_ctr_x - 0.5 * pred_w
    y1 = pred_ctr_y - 0.5 * pred_h
    x2 = pred_ctr_x + 0.5 * pred_w
    y2 = pred_ctr_y + 0.5 * pred_h
    return torch.stack((x1, y1, x2, y2), dim=2).reshape(deltas.shape)   # (N, k, 4) -> (N, 4k)


def clip(boxes: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Clip (N, 4) boxes to [0, W] x [0, H] (continuous convention, like detectron2 ``Boxes.clip``)."""
    h, w = hw
    x1 = boxes[:, 0].clamp(min=0, max=w)
    y1 = boxes[:, 1].clamp(min=0, max=h)
    x2 = boxes[:, 2].clamp(min=0, max=w)
    y2 = boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask (N,) of boxes whose width and height are both > threshold."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def scale(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Multiply x coordinates by ``sx`` and y coordinates by ``sy`` (float32 arithmetic, as Boxes.scale)."""
    out = boxes.clone()
    out[:, 0::2] *= sx
    out[:, 1::2] *= sy
    return out
