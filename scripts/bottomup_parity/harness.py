"""Parity harness: run glied's detector stage by stage and compare with the reference port's outputs.

The reference (``tests/data/parity/bottomup/``) holds outputs of py-bottom-up-attention (commit 85ec9b7) on a
deterministic random checkpoint in the layout of ``faster_rcnn_from_caffe_attr.pkl`` (written by
``make_random_ckpt.py``, vendored from the project's parity material). :func:`glied_fields` computes the same
named fields with glied's modules on the port's resized input; :func:`compare` measures the differences
(normwise relative errors, max abs errors, argmax agreement, one-to-one IoU box matching).
Used by tests/extractors/bottomup/test_bottomup_parity.py, scripts/parity_report.py and
benchmarks/bench_bottomup.py, with the repository root on ``sys.path`` (test-support code: not installed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from glied.extractors.bottomup.model import ImageInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
REF_DIR = REPO_ROOT / "tests" / "data" / "parity" / "bottomup"
IMAGES = ("chelsea", "astronaut", "coffee")
CKPT_MD5 = "909fc37430f4038711215f09cc300cee"


def write_random_checkpoint(path) -> str:
    """Write the reference random checkpoint (262 MB) to ``path``; returns its md5 (must be CKPT_MD5)."""
    from scripts.bottomup_parity import make_random_ckpt as mk
    from glied.fileio import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            mk._Numpy1Pickler(f, protocol=3).dump({"model": mk.build(), "__author__": "glied-random-reference"})
    path = Path(path)
    write_atomic(path, write)
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_reference(name: str, ref_dir=REF_DIR) -> dict:
    """Reference fields of one image, plus ``input_bgr_u8`` decoded from the lossless PNG (hash-checked)."""
    import cv2
    ref_dir = Path(ref_dir)
    r = dict(np.load(ref_dir / f"{name}.npz"))
    img = cv2.imdecode(np.fromfile(ref_dir / f"{name}_input.png", dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if hashlib.sha256(img.tobytes()).digest() != r.pop("input_sha256").tobytes():
        raise ValueError(f"{ref_dir / name}_input.png does not decode to the port's input (hash mismatch)")
    r["input_bgr_u8"] = img
    return r


def glied_fields(extractor, ref: dict, procedures=("butd", "fixed36", "adapt")) -> dict:
    """The reference's fields computed by glied on the port's resized input ``ref['input_bgr_u8']``."""
    model, cfg = extractor.model, extractor.cfg
    (hh, ww), (h0, w0) = (int(v) for v in ref["input_hw"]), (int(v) for v in ref["raw_hw"])
    info = ImageInfo((h0, w0), (hh, ww), (ww / w0, hh / h0))
    out = {}
    with torch.inference_mode():
        x = model.transform.from_resized(ref["input_bgr_u8"])
        res4 = model.backbone(model._prep(x))                 # compute dtype (bf16 in bf16 mode)
        obj, dlt = model.rpn.head(res4)
        obj, res4 = obj.float(), res4.float()
        props, logits = model.rpn.propose(obj, dlt, (hh, ww))[0]
        feats, cls_logits, deltas, attr_logits = model.box_outputs(res4, props.float())
        gb = torch.from_numpy(np.asarray(ref["given_boxes_input"], dtype=np.float32))
        g_feats, g_cls, _, g_attr = model.box_outputs(res4, gb)
    out["res4_shape"] = np.array(res4.shape)
    out["res4_chmean"] = res4.mean(dim=(0, 2, 3)).numpy()
    out["res4_chstd"] = res4[0].flatten(1).std(dim=1).numpy()
    out["res4_spatial_mean"] = res4[0].mean(dim=0).numpy()
    out["rpn_objectness_map"] = obj[0].float().numpy()
    out["rpn_proposals"], out["rpn_objectness"] = props.float().numpy(), logits.float().numpy()
    from glied.extractors.bottomup.model import RawOutputs
    raw = RawOutputs(info, props.float(), logits.float(), feats.float(), cls_logits, deltas, attr_logits)
    probs, aprobs = raw.cls_probs, raw.attr_probs
    fg_max, fg_arg = probs[:, :-1].max(dim=1)
    out.update(prop_fg_maxprob=fg_max.numpy(), prop_fg_argmax=fg_arg.numpy(), prop_bg_prob=probs[:, -1].numpy(),
               prop_cls_argmax_incl_bg=probs.argmax(dim=1).numpy())
    t5 = probs.topk(5, dim=1)
    out.update(prop_top5_prob=t5.values.numpy(), prop_top5_cls=t5.indices.numpy())
    f = raw.features
    out.update(prop_feat_mean=f.mean(dim=1).numpy(), prop_feat_l2=f.norm(dim=1).numpy(),
               prop_feat_first8=f[:8].numpy())
    am, aa = aprobs.max(dim=1)
    out.update(prop_attr_maxprob=am.numpy(), prop_attr_argmax=aa.numpy())
    reg = raw.regressed_boxes(cfg.roi_bbox_weights, cfg.bbox_scale_clamp)
    p = reg.shape[0]
    out["prop_box_of_fg_argmax"] = reg.view(p, -1, 4)[torch.arange(p), fg_arg].numpy()
    # given boxes
    gp = torch.softmax(g_cls.float(), dim=1)
    gap = torch.softmax(g_attr.float()[:, :-1], dim=1)
    out.update(given_features=g_feats.float().numpy(), given_cls_probs=gp.numpy(),
               given_attr_cond_class=g_cls.float().argmax(dim=1).numpy(), given_attr_logits=g_attr.float().numpy(),
               given_attr_probs400_port=gap.numpy())
    s, i = gp[:, :-1].max(dim=1)
    out.update(given_obj_ids=i.numpy(), given_obj_scores=s.numpy())
    s, i = gap.max(dim=1)
    out.update(given_attr_ids=i.numpy(), given_attr_scores=s.numpy())
    # detections
    for proc in procedures:
        s = extractor.select(raw, proc)
        rf = extractor.regions(raw, s)
        out.update({f"{proc}_boxes": rf.boxes, f"{proc}_obj_ids": rf.obj_ids, f"{proc}_obj_scores": rf.obj_scores,
                    f"{proc}_attr_ids": rf.attr_ids, f"{proc}_attr_scores": rf.attr_scores,
                    f"{proc}_proposal_idx": s.idx.numpy(), f"{proc}_features": rf.features})
        if proc != "butd":
            out[f"{proc}_nms_thresh"] = np.array([s.nms_thresh])
        else:
            out["butd_max_conf"] = s.max_conf.numpy()
    return out


def norm_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = np.linalg.norm(a)
    return float(np.linalg.norm(a - b) / na) if na > 0 else float(np.abs(b).max(initial=0.0))


def match_boxes(a, b, thr: float) -> list:
    """One-to-one greedy pairs (i, j) with IoU(a_i, b_j) >= thr, highest IoU first (continuous IoU, no +1)."""
    a, b = torch.as_tensor(np.asarray(a, np.float64)), torch.as_tensor(np.asarray(b, np.float64))
    if len(a) == 0 or len(b) == 0:
        return []
    m = box_iou(a, b).numpy()
    cand = np.argwhere(m >= thr)
    order = np.argsort(-m[cand[:, 0], cand[:, 1]], kind="stable")
    used_a, used_b, pairs = set(), set(), []
    for i, j in cand[order]:
        if i not in used_a and j not in used_b:
            used_a.add(int(i)), used_b.add(int(j)), pairs.append((int(i), int(j)))
    return sorted(pairs)


def compare(ref: dict, mine: dict, iou: float = 0.99) -> dict:
    """Stage-wise differences. Float fields: norm_rel and max_abs; int fields: n_diff; detection groups: matched
    counts with class / attribute agreement and score / feature differences on matched pairs."""
    res = {"fields": {}, "detections": {}}
    for k in sorted(set(ref) & set(mine)):
        a, b = np.asarray(ref[k]), np.asarray(mine[k])
        if a.shape != b.shape:
            res["fields"][k] = {"shape_mismatch": [list(a.shape), list(b.shape)]}
        elif np.issubdtype(a.dtype, np.floating):
            res["fields"][k] = {"norm_rel": norm_rel(a, b),
                                "max_abs": float(np.abs(a.astype(np.float64) - b).max(initial=0.0))}
        else:
            res["fields"][k] = {"n_diff": int((a != b).sum()), "n": int(a.size)}
    for proc in ("rpn", "butd", "fixed36", "adapt"):
        kb = "rpn_proposals" if proc == "rpn" else f"{proc}_boxes"
        if kb not in ref or kb not in mine:
            continue
        pairs = match_boxes(ref[kb], mine[kb], iou)
        d = {"n_ref": len(ref[kb]), "n_mine": len(mine[kb]), "matched": len(pairs)}
        if pairs:
            ia, ib = np.array(pairs).T
            d["box_max_abs"] = float(np.abs(ref[kb][ia].astype(np.float64) - mine[kb][ib]).max())
            if proc != "rpn":
                for f in ("obj_ids", "attr_ids"):
                    d[f + "_agree"] = int((ref[f"{proc}_{f}"][ia] == mine[f"{proc}_{f}"][ib]).sum())
                for f in ("obj_scores", "attr_scores"):
                    d[f + "_max_abs"] = float(np.abs(ref[f"{proc}_{f}"][ia].astype(np.float64)
                                                     - mine[f"{proc}_{f}"][ib]).max())
            else:
                d["objectness_max_abs"] = float(np.abs(ref["rpn_objectness"][ia].astype(np.float64)
                                                       - mine["rpn_objectness"][ib]).max())
        res["detections"][proc] = d
    return res

