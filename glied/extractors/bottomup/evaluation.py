"""Evaluation of a trained bottom-up detector: box mAP@0.5 (pycocotools COCOeval) and attribute accuracy.

Detections for evaluation come from :func:`detect`: detection-style post-processing of the RoI head, as
torchvision/detectron2 inference does it (class-specific regressed boxes decoded with weights (10, 10, 5, 5)
and clipped, softmax scores above ``score_thresh`` 0.05, per-class NMS at IoU 0.5, at most 100 per image), not
the feature-extraction selection (which keeps unregressed proposals). The attribute head of each detection is
conditioned on the detection's class; its probabilities are a softmax over the A real attributes ("none"
dropped before the softmax, as the detectron2 port does).

Attribute accuracy: ground-truth boxes and detections of an image are matched one to one, greedily by
descending detection score (each detection takes the unmatched ground-truth box of highest IoU >= 0.5, any
class). For each matched box and each attribute type (colour, size), the prediction is the arg-max of the
detection's attribute probabilities over that type's attributes; it is right when it is one of the box's
labels. ``attr_acc`` is the mean over (matched box, type) pairs; ``attr_top1_acc`` checks the arg-max over all
attributes against the box's labels (the test for a json without attribute types).
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from glied.extractors.bottomup.data import DetectionDataset, read_image


def coco_box_map(coco_gt: dict, results: list[dict]) -> dict[str, float]:
    """COCO box AP of ``results`` against the ground-truth json ``coco_gt``.

    Args:
        coco_gt: COCO detection dict (images, annotations, categories); only its images are evaluated.
        results: COCO results, one dict per detection {image_id, category_id, bbox [x, y, w, h], score} in
            original pixels.
    Returns:
        {"map50": AP@0.5, "map": AP@[0.5:0.95], "map75": AP@0.75, "ar100": AR@100}; 0.0 without detections.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"map50": 0.0, "map": 0.0, "map75": 0.0, "ar100": 0.0}
    gt = {k: coco_gt[k] for k in ("images", "annotations", "categories")}
    gt["annotations"] = [dict(a, area=a.get("area", a["bbox"][2] * a["bbox"][3]), iscrowd=a.get("iscrowd", 0))
                         for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "bbox")
        ev.params.imgIds = sorted(int(im["id"]) for im in gt["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [max(float(v), 0.0) for v in ev.stats]  # -1 means "no ground truth of that kind"
    return {"map": s[0], "map50": s[1], "map75": s[2], "ar100": s[8]}


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (N, M) of boxes a (N, 4) and b (M, 4), x1y1x2y2 continuous convention."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_greedy(gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray,
                 iou_thresh: float = 0.5) -> np.ndarray:
    """Index of the detection matched to each ground-truth box (-1 when none), greedy by score."""
    match = np.full(len(gt_boxes), -1, dtype=np.int64)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return match
    iou = box_iou_np(det_boxes, gt_boxes)  # (D, G)
    for d in np.argsort(-det_scores, kind="stable"):
        cand = np.where((match < 0) & (iou[d] >= iou_thresh))[0]
        if len(cand):
            match[cand[np.argmax(iou[d, cand])]] = d
    return match


def attribute_accuracy(dataset: DetectionDataset, detections: dict[int, dict],
                       iou_thresh: float = 0.5) -> dict[str, float]:
    """Attribute accuracy on ground-truth boxes matched by a detection (see the module docstring).

    Args:
        dataset: ground truth (records with 0-based attribute ids, -1 padded; attribute types).
        detections: image_id -> {"boxes" (D, 4) original pixels, "scores" (D,), "attr_probs" (D, A)}.
    Returns:
        {"attr_acc", "attr_top1_acc", "attr_<type>_acc" per type, "matched_boxes", "gt_boxes",
         "box_recall"}; accuracies are NaN when no box with attributes was matched.
    """
    groups = dataset.attribute_groups()
    right = {t: 0 for t in groups}
    total = {t: 0 for t in groups}
    top1_right = top1_total = matched = n_gt = 0
    for rec in dataset.records:
        n_gt += len(rec.boxes)
        det = detections.get(rec.image_id)
        if det is None or len(rec.boxes) == 0:
            continue
        m = match_greedy(rec.boxes, np.asarray(det["boxes"]), np.asarray(det["scores"]), iou_thresh)
        for g, d in enumerate(m):
            if d < 0:
                continue
            matched += 1
            labels = {int(v) for v in rec.attributes[g] if v >= 0}
            if not labels:
                continue
            probs = np.asarray(det["attr_probs"][d])
            top1_total += 1
            top1_right += int(int(np.argmax(probs)) in labels)
            for t, ids in groups.items():
                if labels & set(ids):
                    total[t] += 1
                    right[t] += int(ids[int(np.argmax(probs[ids]))] in labels)
    out: dict[str, float] = {
        "attr_top1_acc": top1_right / top1_total if top1_total else float("nan"),
        "matched_boxes": matched, "gt_boxes": n_gt, "box_recall": matched / n_gt if n_gt else float("nan"),
    }
    for t in groups:
        out[f"attr_{t}_acc"] = right[t] / total[t] if total[t] else float("nan")
    n_pairs = sum(total.values())
    out["attr_acc"] = sum(right.values()) / n_pairs if n_pairs else out["attr_top1_acc"]
    return out


def to_coco_results(image_id: int, det: dict, category_ids: list[int]) -> list[dict]:
    """COCO results entries (bbox x, y, w, h in original pixels) for one image's detections."""
    out = []
    rows = zip(np.asarray(det["boxes"]), np.asarray(det["scores"]), np.asarray(det["classes"]))
    for box, score, cls in rows:
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"image_id": int(image_id), "category_id": int(category_ids[int(cls)]),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5)})
    return out


def detect(model, images: list[np.ndarray], *, score_thresh: float = 0.05, nms_thresh: float = 0.5,
           max_dets: int = 100) -> list[dict]:
    """Detections of a batch of BGR uint8 images (H, W, 3), boxes in original pixels.

    Returns per image {"boxes" (D, 4) float32, "scores" (D,), "classes" (D,) int64 in 0..C-1,
    "attr_probs" (D, A) float32}, best score first.
    """
    import torch
    from torchvision.ops import batched_nms

    from glied.extractors.bottomup import boxes as box_ops

    model.eval()
    with torch.inference_mode():
        xs, scales, sizes = [], [], []
        for img in images:
            x, info = model.transform(img)  # (1, 3, h, w)
            xs.append(x[0])
            scales.append(tuple(float(v) for v in info.scale_xy))
            sizes.append((int(x.shape[2]), int(x.shape[3])))
        hp = -(-max(h for h, _ in sizes) // 16) * 16
        wp = -(-max(w for _, w in sizes) // 16) * 16
        batch = xs[0].new_zeros((len(xs), 3, hp, wp))  # (B, 3, Hp, Wp)
        for k, x in enumerate(xs):
            batch[k, :, : x.shape[1], : x.shape[2]] = x
        res4, objectness, deltas, _ = model.rpn_outputs(batch)  # (B, C4, Hf, Wf), (B, A, Hf, Wf), (B, 4A, Hf, Wf)
        proposals = model.propose(objectness, deltas, sizes)  # list of (P, 4)
        rois = torch.cat([torch.cat([torch.full((len(p), 1), float(i)), p], 1)
                          for i, p in enumerate(proposals)])  # (K, 5) batch index, x1, y1, x2, y2
        feats, cls_logits, box_deltas = model.region_outputs(res4, rois)  # (K, D), (K, C+1), (K, 4C)
        probs = torch.softmax(cls_logits, dim=1)
        num_classes = probs.shape[1] - 1
        out, start = [], 0
        for i, p in enumerate(proposals):
            sl = slice(start, start + len(p))
            start += len(p)
            n = len(p)
            boxes = box_ops.decode(box_deltas[sl], p, model.cfg.roi_bbox_weights,
                                   model.cfg.bbox_scale_clamp)  # (P, 4C)
            boxes = box_ops.clip(boxes.reshape(n * num_classes, 4), sizes[i])
            boxes = boxes.view(n, num_classes, 4)  # (P, C, 4)
            scores = probs[sl, :num_classes]  # (P, C)
            prop_idx, cls = torch.nonzero(scores > score_thresh, as_tuple=True)
            b, s = boxes[prop_idx, cls], scores[prop_idx, cls]
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            prop_idx, cls, b, s = prop_idx[ok], cls[ok], b[ok], s[ok]
            keep = batched_nms(b, s, cls, nms_thresh)[:max_dets]
            prop_idx, cls, b, s = prop_idx[keep], cls[keep], b[keep], s[keep]
            attr_logits = model.attribute_logits(feats[sl][prop_idx], cls)  # (D, A+1), D may be 0
            attr_probs = torch.softmax(attr_logits[:, :-1], dim=1)
            sx, sy = scales[i]
            b = b / b.new_tensor([sx, sy, sx, sy])
            out.append({"boxes": b.float().numpy(), "scores": s.float().numpy(), "classes": cls.numpy(),
                        "attr_probs": attr_probs.float().numpy()})
    return out


def evaluate_detector(model, dataset: DetectionDataset, *, batch_size: int = 8, score_thresh: float = 0.05,
                      nms_thresh: float = 0.5, progress=None) -> dict:
    """Box mAP (COCOeval) and attribute accuracy of ``model`` on every image of ``dataset``.

    Returns a flat dict of metrics (see :func:`coco_box_map`, :func:`attribute_accuracy`) plus "images".
    """
    results, dets = [], {}
    for start in range(0, len(dataset), batch_size):
        recs = dataset.records[start: start + batch_size]
        for rec, det in zip(recs, detect(model, [read_image(r) for r in recs], score_thresh=score_thresh,
                                         nms_thresh=nms_thresh)):
            dets[rec.image_id] = det
            results.extend(to_coco_results(rec.image_id, det, dataset.category_ids))
        if progress is not None:
            progress(min(start + batch_size, len(dataset)), len(dataset))
    metrics = {"images": len(dataset)}
    metrics.update(coco_box_map(dataset.coco, results))
    metrics.update(attribute_accuracy(dataset, dets))
    return metrics
