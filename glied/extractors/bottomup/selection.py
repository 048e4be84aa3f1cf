"""Region-selection procedures: which of the detector's proposals become an image's regions.

All three are pure functions of the detector outputs for one image (torch CPU tensors, input-pixel boxes):

- :func:`select_butd` — the original Caffe rule of bottom-up-attention ``tools/generate_tsv.py`` (the published
  10..100 feature files): for every foreground class, NMS (0.3) over the *unregressed proposal* boxes scored by
  that class's probability; each proposal's confidence = its best surviving class probability; keep
  confidence >= 0.2, clamped to [min_boxes, max_boxes] by confidence. Boxes are the proposals.
- :func:`select_fixed36` — the port's attribute demo: detectron2 ``fast_rcnn_inference_single_image`` on the
  class-specific regressed boxes (clipped; (RoI, class) pairs with score > 0.2; per-class NMS; top 36) with NMS
  0.5, 0.6, ... until exactly 36 remain. A RoI can appear twice with two classes.
- :func:`select_adapt` — the port's extraction script (``detectron2_mscoco_proposal_maxnms.py``): each RoI's
  best foreground class and its regressed, clipped box; class-agnostic NMS 0.3, 0.4, ... until >= min_boxes
  remain; top max_boxes. It ignores the score threshold.

Features of a selected region are always those of its proposal RoI (not re-pooled on the regressed box).
Box conventions are detectron2's (continuous, no +1), as the port.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

from glied.extractors.bottomup import boxes as box_ops


@dataclass
class Selection:
    """Selected regions of one image: ``idx`` (N,) proposal indices (features/attributes come from these RoIs),
    ``obj_ids`` (N,) foreground class, ``obj_scores`` (N,) its probability, ``boxes`` (N, 4) input pixels,
    ``nms_thresh`` the NMS threshold finally used, ``max_conf`` (N,) the butd confidence (butd only)."""

    idx: torch.Tensor
    obj_ids: torch.Tensor
    obj_scores: torch.Tensor
    boxes: torch.Tensor
    nms_thresh: float
    max_conf: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.idx.shape[0])


def _empty(nms_thresh: float) -> Selection:
    z = torch.zeros(0, dtype=torch.int64)
    return Selection(z, z.clone(), torch.zeros(0), torch.zeros((0, 4)), float(nms_thresh), torch.zeros(0))


def select_butd(proposals: torch.Tensor, cls_probs: torch.Tensor, *, nms_thresh: float = 0.3,
                score_thresh: float = 0.2, min_boxes: int = 10, max_boxes: int = 100) -> Selection:
    """Original bottom-up rule. proposals (P, 4), cls_probs (P, C+1) softmax with background LAST.

    If fewer than ``min_boxes`` pass the threshold, the ``min_boxes`` most confident are kept (fewer if there are
    fewer proposals); if more than ``max_boxes``, the ``max_boxes`` most confident (both sorted by confidence);
    otherwise the passing ones in proposal order, as generate_tsv.py."""
    p = proposals.shape[0]
    if p == 0:
        return _empty(nms_thresh)
    fg = cls_probs[:, :-1].float()                       # (P, C)
    boxes = proposals.float()
    # Fast exact path: a box's NMS fate in class c depends only on boxes scoring higher in c, so running each
    # class's NMS on its entries >= score_thresh gives max_conf exactly wherever it is >= score_thresh (and
    # below it elsewhere). Only when fewer than min_boxes pass are the low confidences needed: full sweep.
    max_conf = torch.zeros(p, dtype=fg.dtype)
    for c in torch.nonzero((fg >= score_thresh).any(dim=0)).flatten().tolist():
        sub = torch.nonzero(fg[:, c] >= score_thresh).flatten()
        k = sub[nms(boxes[sub], fg[sub, c], nms_thresh)]
        max_conf[k] = torch.maximum(max_conf[k], fg[k, c])
    if int((max_conf >= score_thresh).sum()) < min(min_boxes, p):
        kept = multiclass_nms_keep(boxes, fg, nms_thresh)                 # (P, C)
        max_conf = torch.where(kept, fg, torch.zeros_like(fg)).max(dim=1).values   # (P,)
    keep = torch.nonzero(max_conf >= score_thresh).flatten()
    order = torch.argsort(max_conf, descending=True, stable=True)
    if keep.numel() < min_boxes:
        keep = order[:min_boxes]
    elif keep.numel() > max_boxes:
        keep = order[:max_boxes]
    scores, ids = fg[keep].max(dim=1)
    return Selection(keep, ids, scores, proposals[keep], float(nms_thresh), max_conf[keep])


def iou_above(boxes: torch.Tensor, thresh: float) -> torch.Tensor:
    """(P, P) bool: IoU(i, j) > thresh, computed with the same float32 operations, in the same order, as
    torchvision's CPU ``nms`` kernel (areas without +1, ``inter / (area_i + area_j - inter)``, compared in double),
    so decisions on borderline pairs agree with it bit for bit."""
    x1, y1, x2, y2 = boxes.float().unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    inter = w * h
    ovr = inter / (areas[:, None] + areas[None] - inter)
    return ovr.double() > thresh


def multiclass_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS of the SAME boxes (P, 4) under each of C score columns (P, C) at once: (P, C) bool, True where
    box i survives the NMS of class c. Equal to running ``torchvision.ops.nms(boxes, scores[:, c], thresh)``
    for every c (1600 calls, ~1 s here), in ~50 ms: the IoU matrix is shared and the greedy sweep is vectorised
    over classes (rank r: every class looks at its r-th best box; if not yet suppressed it is kept and
    suppresses its overlaps)."""
    p, c = scores.shape
    # each box's suppression set as a bit set: packbits bytes (big-endian bits), padded to whole uint64 words
    # so the update is a few words per class (numpy: a small op costs ~microseconds, torch ~10x more)
    nbytes = ((p + 63) // 64) * 8
    over8 = np.zeros((p, nbytes), dtype=np.uint8)
    over8[:, : (p + 7) // 8] = np.packbits(iou_above(boxes, thresh).numpy(), axis=1)
    over = over8.view(np.uint64)                                        # (P, W)
    order = torch.argsort(scores.t(), dim=1, descending=True, stable=True).numpy()   # (C, P)
    suppressed = np.zeros((c, nbytes // 8), dtype=np.uint64)            # (C, W) bit sets
    sup8 = suppressed.view(np.uint8)                                    # same memory, byte view
    kept = np.zeros((c, p), dtype=bool)
    rows = np.arange(c)
    for r in range(p):
        i = order[:, r]                                                  # (C,) each class's r-th best box
        alive = ((sup8[rows, i >> 3] >> (7 - (i & 7))) & 1) == 0
        kept[rows, i] = alive
        suppressed[alive] |= over[i[alive]]
    return torch.from_numpy(kept.T.copy())


def _clipped_class_boxes(regressed: torch.Tensor, input_hw) -> torch.Tensor:
    p = regressed.shape[0]
    return box_ops.clip(regressed.reshape(-1, 4), input_hw).view(p, -1, 4)    # (P, C, 4)


def select_fixed36(regressed: torch.Tensor, cls_probs: torch.Tensor, input_hw, *, num: int = 36,
                   score_thresh: float = 0.2, thresholds=None) -> Selection:
    """Attribute-demo rule. regressed (P, 4C) class-specific boxes (input pixels), cls_probs (P, C+1)."""
    thresholds = np.arange(0.5, 1.0, 0.1) if thresholds is None else thresholds
    if regressed.shape[0] == 0:
        return _empty(float(thresholds[-1]))
    scores = cls_probs[:, :-1].float()                   # (P, C)
    boxes = _clipped_class_boxes(regressed.float(), input_hw)
    valid = torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    mask = (scores > score_thresh) & valid
    inds = mask.nonzero()                                # (M, 2) [roi, class]
    b, s = boxes[mask], scores[mask]
    keep, thr = inds.new_zeros(0), float(thresholds[-1])
    for thr in thresholds:
        keep = batched_nms(b, s, inds[:, 1], float(thr))[:num]
        if keep.numel() == num:
            break
    return Selection(inds[keep, 0], inds[keep, 1], s[keep], b[keep], float(thr))


def select_adapt(regressed: torch.Tensor, cls_probs: torch.Tensor, input_hw, *, min_boxes: int = 10,
                 max_boxes: int = 100, thresholds=None) -> Selection:
    """The port's extraction rule. regressed (P, 4C), cls_probs (P, C+1)."""
    thresholds = np.arange(0.3, 1.0, 0.1) if thresholds is None else thresholds
    p = regressed.shape[0]
    if p == 0:
        return _empty(float(thresholds[-1]))
    scores = cls_probs[:, :-1].float()
    boxes = _clipped_class_boxes(regressed.float(), input_hw)
    max_scores, max_classes = scores.max(dim=1)
    max_boxes_ = boxes[torch.arange(p), max_classes]     # (P, 4)
    keep, thr = max_classes.new_zeros(0), float(thresholds[-1])
    for thr in thresholds:
        keep = nms(max_boxes_, max_scores, float(thr))[:max_boxes]
        if keep.numel() >= min_boxes:
            break
    return Selection(keep, max_classes[keep], max_scores[keep], max_boxes_[keep], float(thr))


def to_original(boxes: torch.Tensor, input_hw, raw_hw) -> torch.Tensor:
    """Input-pixel boxes (N, 4) -> original pixels: x * W / w, y * H / h (separately), clipped to the image."""
    out = box_ops.scale(boxes.float(), raw_hw[1] / input_hw[1], raw_hw[0] / input_hw[0])
    return box_ops.clip(out, raw_hw)
