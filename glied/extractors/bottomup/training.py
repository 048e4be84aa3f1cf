"""Training losses of the bottom-up Faster R-CNN (Ren et al. 2015; Anderson et al. 2018) on torchvision ops.

Everything here reads the model through its training interface (``BottomUpDetector.rpn_outputs``,
``propose``, ``region_outputs``, ``attribute_logits``); ``BottomUpDetector.losses`` is the entry point.

RPN: anchors with IoU >= 0.7 to a ground-truth box (and, for every box, the anchors of highest IoU with it)
are positive, IoU < 0.3 negative, the rest ignored; 256 anchors per image are sampled, at most half positive.
Losses: binary cross-entropy on objectness and smooth-L1 (beta 1/9, as Caffe's sigma 3) on the deltas of the
positives (box weights 1), both normalised by the number of sampled anchors.

RoI head: proposals (gradient stopped) plus the ground-truth boxes; a proposal with IoU >= 0.5 is foreground
of its best box's class, below 0.5 background (class index C, last); ``roi_batch`` RoIs per image with at most
``roi_positive_fraction`` foreground. Losses: cross-entropy over C+1 classes; class-specific smooth-L1
(beta 1) on box deltas encoded with weights (10, 10, 5, 5), summed over foreground and divided by the number
of sampled RoIs; attribute loss on foreground RoIs only.

Attribute loss (the bottom-up Caffe recipe): the attribute head is conditioned on the GROUND-TRUTH class of
the RoI's box, and its A+1-way softmax ("none" last) is trained with cross-entropy against EACH label of the
box (the mean of -log p(label) over all (RoI, label) pairs); a box without attributes has the target "none".
With one colour and one size per box the optimum puts about half the mass on each, so evaluation reads the
arg-max within each attribute type (see evaluation.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from glied.errors import ConfigError
from glied.extractors.bottomup import boxes as box_ops


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Optimisation and target-assignment settings of ``glied train-detector``."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    grad_clip: float = 10.0
    hflip_prob: float = 0.5
    seed: int = 0
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_smooth_l1_beta: float = 1.0 / 9.0
    # proposals fed to the RoI head in training: RPN pre- and post-NMS top-k (None: the model's test-time
    # rpn_pre_nms_topk / rpn_post_nms_topk); NMS over the pre-NMS boxes is a large part of a CPU step
    rpn_train_pre_nms_topk: int | None = None
    rpn_train_post_nms_topk: int | None = None
    roi_fg_iou: float = 0.5
    roi_batch_per_image: int = 32       # detectron2: 512, Caffe bottom-up: 128; few objects per shapes image
    roi_positive_fraction: float = 0.5  # detectron2/Caffe: 0.25; shape classes need the foreground examples
    roi_smooth_l1_beta: float = 1.0
    attr_loss_weight: float = 1.0
    # "fp32", "bf16" (forward under CPU bf16 autocast; weights, optimiser and losses stay float32) or "auto":
    # bf16 only where the CPU does bf16 arithmetic natively (glied.extractors.precision), else fp32
    precision: str = "fp32"
    log_every: int = 20

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"--epochs and --batch-size must be at least 1 "
                              f"(got {self.epochs}, {self.batch_size})")
        for name in ("rpn_train_pre_nms_topk", "rpn_train_post_nms_topk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 or unset (got {value})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16 (got {self.precision!r})")
        if not 0 <= self.hflip_prob <= 1:
            raise ConfigError(f"hflip_prob must be in [0, 1] (got {self.hflip_prob})")


# --------------------------------------------------------------------------------------- target assignment

def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, fg_iou: float = 0.7,
                  bg_iou: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN labels of ``anchors`` (N, 4) against ``gt_boxes`` (G, 4).

    Returns ``labels`` (N,) int64: 1 positive (IoU >= fg_iou, or the best anchor(s) of some box), 0 negative
    (IoU < bg_iou), -1 ignored; and ``matched`` (N,) index of each anchor's best box (0 when G == 0).
    """
    n = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    iou = box_iou(gt_boxes, anchors)  # (G, N)
    best_iou, matched = iou.max(0)
    labels = torch.full((n,), -1, dtype=torch.int64)
    labels[best_iou < bg_iou] = 0
    labels[best_iou >= fg_iou] = 1
    # low-quality matches: each box keeps the anchors of its highest IoU, however low (ties included)
    best_per_gt = iou.max(1, keepdim=True).values  # (G, 1)
    g_idx, a_idx = torch.nonzero((iou == best_per_gt) & (best_per_gt > 0), as_tuple=True)
    labels[a_idx] = 1
    matched[a_idx] = g_idx
    return labels, matched


def sample_labels(labels: torch.Tensor, batch: int, positive_fraction: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of sampled positives and negatives: at most ``batch * positive_fraction`` positives, negatives
    fill the rest of ``batch``. ``labels`` (N,): 1 positive, 0 negative, anything else ignored."""
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(batch * positive_fraction))
    n_neg = min(neg.numel(), batch - n_pos)
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]]
    return pos, neg


def sample_rois(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
                gt_attributes: torch.Tensor, num_classes: int, cfg: DetectorTrainConfig,
                generator: torch.Generator | None = None,
                weights=(10.0, 10.0, 5.0, 5.0)) -> dict[str, torch.Tensor]:
    """Sample the RoIs of one image and their targets.

    Args:
        proposals: (P, 4) RPN boxes in input pixels (no gradient). gt_boxes (G, 4), gt_classes (G,) in 0..C-1,
        gt_attributes (G, L) 0-based attribute ids, -1 padded; ``weights``: the model's RoI box coding.
    Returns:
        {"rois" (K, 4), "classes" (K,) with background = num_classes, "deltas" (K, 4) regression targets
         (zeros for background), "attributes" (K, L) labels of the matched box (-1 for background)},
         foreground first.
    """
    proposals = torch.cat([proposals.detach(), gt_boxes], 0)
    if gt_boxes.numel() == 0:
        labels = torch.zeros(proposals.shape[0], dtype=torch.int64)
        matched = torch.zeros(proposals.shape[0], dtype=torch.int64)
    else:
        best_iou, matched = box_iou(gt_boxes, proposals).max(0)
        labels = (best_iou >= cfg.roi_fg_iou).long()  # 1 fg, 0 bg
    fg, bg = sample_labels(labels, cfg.roi_batch_per_image, cfg.roi_positive_fraction, generator)
    keep = torch.cat([fg, bg])
    rois = proposals[keep]
    classes = torch.full((keep.numel(),), num_classes, dtype=torch.int64)
    deltas = torch.zeros((keep.numel(), 4))
    width = gt_attributes.shape[1] if gt_attributes.dim() == 2 else 1
    attributes = torch.full((keep.numel(), width), -1, dtype=torch.int64)
    if fg.numel():
        m = matched[fg]
        classes[: fg.numel()] = gt_classes[m]
        deltas[: fg.numel()] = box_ops.encode(proposals[fg], gt_boxes[m], weights)
        attributes[: fg.numel()] = gt_attributes[m]
    return {"rois": rois, "classes": classes, "deltas": deltas, "attributes": attributes,
            "num_fg": torch.tensor(fg.numel())}


# -------------------------------------------------------------------------------------------------- losses

def attribute_loss(attr_logits: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(attr_logits)[label] over every (RoI, label) pair.

    ``attr_logits`` (F, A+1), "none" last; ``attributes`` (F, L) 0-based ids, -1 padded; a row without labels
    is trained towards "none" (index A).
    """
    if attr_logits.shape[0] == 0:
        return attr_logits.sum() * 0.0
    none = attr_logits.shape[1] - 1
    targets = attributes.clone()
    empty = (targets < 0).all(1)
    targets[empty, 0] = none
    logp = F.log_softmax(attr_logits, dim=1)  # (F, A+1)
    valid = targets >= 0  # (F, L)
    picked = logp.gather(1, targets.clamp(min=0))  # (F, L)
    return -(picked * valid).sum() / valid.sum()


def detector_losses(model: torch.nn.Module, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                    targets: list[dict[str, torch.Tensor]], cfg: DetectorTrainConfig,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The five training losses of a batch.

    Args:
        model: a ``BottomUpDetector`` in train mode.
        images: (B, 3, H, W) transformed (mean-subtracted, resized, zero-padded) batch.
        image_sizes: (h, w) of each image inside the padded batch.
        targets: per image {"boxes" (G, 4) in input pixels, "classes" (G,), "attributes" (G, L)}.
    Returns:
        {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "attr"}: scalar tensors (their sum is the loss).
    """
    # res4 (B, C4, Hf, Wf), objectness (B, A, Hf, Wf), deltas (B, 4A, Hf, Wf), anchors (Hf*Wf*A, 4) (y, x, a) order
    res4, objectness, rpn_deltas, anchors = model.rpn_outputs(images)
    b, a, hf, wf = objectness.shape
    obj_flat = objectness.permute(0, 2, 3, 1).reshape(b, -1)  # (B, Hf*Wf*A)
    del_flat = rpn_deltas.view(b, a, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)  # (B, Hf*Wf*A, 4)

    # RPN
    cls_terms, box_terms, n_sampled = [], [], 0
    for i, t in enumerate(targets):
        labels, matched = match_anchors(anchors, t["boxes"], cfg.rpn_fg_iou, cfg.rpn_bg_iou)
        pos, neg = sample_labels(labels, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction, generator)
        idx = torch.cat([pos, neg])
        n_sampled += idx.numel()
        cls_terms.append(F.binary_cross_entropy_with_logits(
            obj_flat[i, idx], labels[idx].to(obj_flat.dtype), reduction="sum"))
        if pos.numel():
            reg = box_ops.encode(anchors[pos], t["boxes"][matched[pos]], model.cfg.rpn_bbox_weights)
            box_terms.append(F.smooth_l1_loss(del_flat[i, pos], reg, beta=cfg.rpn_smooth_l1_beta,
                                              reduction="sum"))
    norm = max(n_sampled, 1)
    rpn_cls = torch.stack(cls_terms).sum() / norm
    rpn_box = (torch.stack(box_terms).sum() if box_terms else del_flat.sum() * 0.0) / norm

    # RoI head
    with torch.no_grad():
        proposals = model.propose(objectness.detach(), rpn_deltas.detach(), image_sizes,
                                  cfg.rpn_train_pre_nms_topk, cfg.rpn_train_post_nms_topk)  # (P, 4) per image
    num_classes = model.cfg.num_classes
    samples = [sample_rois(p, t["boxes"], t["classes"], t["attributes"], num_classes, cfg, generator,
                           model.cfg.roi_bbox_weights) for p, t in zip(proposals, targets)]
    rois = torch.cat([torch.cat([torch.full((len(s["rois"]), 1), float(i)), s["rois"]], 1)
                      for i, s in enumerate(samples)])  # (K, 5) batch index, x1, y1, x2, y2
    classes = torch.cat([s["classes"] for s in samples])  # (K,)
    reg_targets = torch.cat([s["deltas"] for s in samples])  # (K, 4)
    width = max(s["attributes"].shape[1] for s in samples)
    attributes = torch.cat([F.pad(s["attributes"], (0, width - s["attributes"].shape[1]), value=-1)
                            for s in samples])  # (K, L)
    feats, cls_logits, box_deltas = model.region_outputs(res4, rois)  # (K, D), (K, C+1), (K, 4C)
    roi_cls = F.cross_entropy(cls_logits, classes)
    fg = torch.nonzero(classes < num_classes).flatten()
    if fg.numel():
        pred = box_deltas.view(-1, num_classes, 4)[fg, classes[fg]]  # (F, 4)
        roi_box = F.smooth_l1_loss(pred, reg_targets[fg], beta=cfg.roi_smooth_l1_beta,
                                   reduction="sum") / classes.numel()
        attr_logits = model.attribute_logits(feats[fg], classes[fg])  # (F, A+1), ground-truth class
        attr = attribute_loss(attr_logits, attributes[fg])
    else:
        roi_box = box_deltas.sum() * 0.0
        attr = feats.sum() * 0.0
    return {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "roi_cls": roi_cls, "roi_box": roi_box,
            "attr": cfg.attr_loss_weight * attr}


def lr_at(it: int, total: int, cfg: DetectorTrainConfig) -> float:
    """Linear warm-up over ``warmup_iters`` then cosine decay to 5% of ``lr`` at ``total`` iterations."""
    if it < cfg.warmup_iters:
        return cfg.lr * (0.1 + 0.9 * it / max(cfg.warmup_iters, 1))
    t = min(1.0, (it - cfg.warmup_iters) / max(total - cfg.warmup_iters, 1))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
