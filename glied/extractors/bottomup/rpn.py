"""Region proposal network on res4 (single feature map, stride 16), detectron2 test-time procedure.

Anchors: sizes x aspect ratios (h/w), size-major, centred on the grid points x*16, y*16 (offset 0, no +1);
flattened in (y, x, anchor) order. The checkpoint's ``cell_anchors`` buffer, when present, overrides the
computed cell anchors (the port does the same: the buffer is persistent).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from glied.extractors.bottomup import boxes as box_ops
from glied.extractors.bottomup.config import BottomUpConfig


def cell_anchors(sizes, ratios) -> torch.Tensor:
    """(len(sizes) * len(ratios), 4) anchors centred on 0, a = size_index * len(ratios) + ratio_index."""
    rows = []
    for s in sizes:
        for r in ratios:
            w = math.sqrt(s * s / r)
            h = r * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows, dtype=torch.float32)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A, channel = anchor * 4 + [dx, dy, dw, dh])."""

    def __init__(self, cin: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, 4 * num_anchors, 1)

    def forward(self, x: torch.Tensor):
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)   # (B, A, Hf, Wf), (B, 4A, Hf, Wf)


class RPN(nn.Module):
    """``head(res4)``, ``anchors(Hf, Wf)`` and the test-time ``propose``; see the module docstring."""

    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(cfg.res4_channels, cfg.rpn_hidden, cfg.num_anchors)
        self.register_buffer("cell_anchors", cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios))

    def anchors(self, hf: int, wf: int) -> torch.Tensor:
        """(Hf * Wf * A, 4) anchors in input pixels, (y, x, a) order."""
        s = self.cfg.feature_stride
        dev = self.cell_anchors.device
        shift_x = torch.arange(0, wf * s, step=s, dtype=torch.float32, device=dev)
        shift_y = torch.arange(0, hf * s, step=s, dtype=torch.float32, device=dev)
        sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)                              # (Hf*Wf, 4)
        return (shifts[:, None, :] + self.cell_anchors.float()[None]).reshape(-1, 4)   # (Hf*Wf*A, 4)

    @staticmethod
    def flatten(objectness: torch.Tensor, deltas: torch.Tensor):
        """(B, A, Hf, Wf), (B, 4A, Hf, Wf) -> (B, Hf*Wf*A), (B, Hf*Wf*A, 4) in (y, x, a) order."""
        b, a, hf, wf = objectness.shape
        logits = objectness.permute(0, 2, 3, 1).reshape(b, -1)                    # (B, Hf*Wf*A)
        d = deltas.view(b, a, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)  # (B, Hf*Wf*A, 4)
        return logits, d

    def propose(self, objectness: torch.Tensor, deltas: torch.Tensor, image_hw, pre_nms_topk: int | None = None,
                post_nms_topk: int | None = None) -> list:
        """Test-time proposals per image: rank raw logits, keep pre-NMS top-k, decode, clip to [0, W] x [0, H],
        drop empty boxes, NMS, keep post-NMS top-k. ``image_hw``: one (h, w) or a list of them (one per image).
        ``pre_nms_topk`` / ``post_nms_topk``: None = the config's (training may ask for fewer).
        Returns a list of (boxes (P, 4) input pixels, logits (P,)) sorted by logit, highest first."""
        cfg = self.cfg
        pre_nms_topk = cfg.rpn_pre_nms_topk if pre_nms_topk is None else pre_nms_topk
        post_nms_topk = cfg.rpn_post_nms_topk if post_nms_topk is None else post_nms_topk
        b, _, hf, wf = objectness.shape
        hws = [tuple(image_hw)] * b if not isinstance(image_hw[0], (tuple, list)) else [tuple(t) for t in image_hw]
        logits, d = self.flatten(objectness.float(), deltas.float())
        anchors = self.anchors(hf, wf)
        k = min(pre_nms_topk, logits.shape[1])
        out = []
        for i in range(b):
            top_logits, idx = logits[i].sort(descending=True)
            top_logits, idx = top_logits[:k], idx[:k]
            boxes = box_ops.decode(d[i, idx], anchors[idx], cfg.rpn_bbox_weights, cfg.bbox_scale_clamp)
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(top_logits)
            boxes, top_logits = boxes[valid], top_logits[valid]
            boxes = box_ops.clip(boxes, hws[i])
            keep = box_ops.nonempty(boxes, cfg.rpn_min_size)
            boxes, top_logits = boxes[keep], top_logits[keep]
            keep = nms(boxes, top_logits, cfg.rpn_nms_thresh)[:post_nms_topk]
            out.append((boxes[keep], top_logits[keep]))
        return out
