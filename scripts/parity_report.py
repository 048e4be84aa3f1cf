#!/usr/bin/env python3
"""Measure glied's bottom-up detector against the reference port, stage by stage, and write docs/parity.md.

    python scripts/parity_report.py [--out docs/parity.md] [--precisions fp32 bf16] [--bench-log LOG]

Generates the random reference checkpoint in a temp dir, loads it through glied's strict key map, runs every image
of tests/data/parity/bottomup/ on the port's stored resized input, and tabulates the errors per stage and the
detection agreement. ``--bench-log`` appends the output of benchmarks/bench_bottomup.py verbatim.
"""
import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glied.extractors.bottomup import load_region_extractor  # noqa: E402
from scripts.bottomup_parity.harness import (IMAGES, compare, glied_fields, load_reference,  # noqa: E402
                                                      write_random_checkpoint)

FLOAT_ROWS = [
    ("backbone: res4 per-channel mean", "res4_chmean", "norm_rel"),
    ("backbone: res4 per-channel std", "res4_chstd", "norm_rel"),
    ("backbone: res4 spatial mean map", "res4_spatial_mean", "norm_rel"),
    ("RPN: objectness logit map", "rpn_objectness_map", "norm_rel"),
    ("RPN: proposal boxes (300)", "rpn_proposals", "norm_rel"),
    ("RPN: proposal logits", "rpn_objectness", "norm_rel"),
    ("RoI head: features of top-8 proposals", "prop_feat_first8", "norm_rel"),
    ("RoI head: per-proposal feature L2 (300)", "prop_feat_l2", "norm_rel"),
    ("RoI head: max fg class prob (300)", "prop_fg_maxprob", "max_abs"),
    ("RoI head: max attribute prob (300)", "prop_attr_maxprob", "max_abs"),
    ("RoI head: regressed box of argmax class", "prop_box_of_fg_argmax", "norm_rel"),
    ("given boxes: features (20 x 2048)", "given_features", "norm_rel"),
    ("given boxes: class probs (20 x 1601)", "given_cls_probs", "max_abs"),
    ("given boxes: attribute probs (20 x 400)", "given_attr_probs400_port", "max_abs"),
]
INT_ROWS = [("per-proposal fg argmax", "prop_fg_argmax"), ("per-proposal argmax incl. bg", "prop_cls_argmax_incl_bg"),
            ("per-proposal attribute argmax", "prop_attr_argmax"), ("given-box object ids", "given_obj_ids"),
            ("given-box attribute ids", "given_attr_ids"), ("attribute-head conditioning class", "given_attr_cond_class")]


def feature_cosines(ref, mine):
    """Cosine between reference and glied features, per row (given boxes and the top-8 proposals)."""
    import numpy as np
    out = {}
    for k in ("given_features", "prop_feat_first8"):
        a, b = np.asarray(ref[k], np.float64), np.asarray(mine[k], np.float64)
        c = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        out[k] = {"median": float(np.median(c)), "min": float(c.min())}
    return out


def fmt(v):
    return "%.1e" % v if v != 0 else "0"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "parity.md"))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--images", nargs="+", default=list(IMAGES))
    ap.add_argument("--bench-log", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--update", action="store_true", help="measure --precisions, keep other saved ones")
    ap.add_argument("--reuse", action="store_true", help="rebuild the page from the saved measurements (.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_path = Path(args.out).with_suffix(".json")

    results, secs = {}, {}
    if args.reuse:
        saved = json.loads(data_path.read_text())
        results = {tuple(k.split("|")): v for k, v in saved["results"].items()}
        secs = {tuple(k.split("|")): v for k, v in saved["secs"].items()}
        args.precisions, args.images = saved["precisions"], saved["images"]
    else:
        results, secs = measure(args)
        if args.update and data_path.is_file():      # keep the saved measurements of other precisions
            saved = json.loads(data_path.read_text())
            old_r = {tuple(k.split("|")): v for k, v in saved["results"].items()}
            old_s = {tuple(k.split("|")): v for k, v in saved["secs"].items()}
            results, secs = {**old_r, **results}, {**old_s, **secs}
            args.precisions = saved["precisions"] + [p for p in args.precisions if p not in saved["precisions"]]
        data_path.parent.mkdir(parents=True, exist_ok=True)
        data_path.write_text(json.dumps({"precisions": args.precisions, "images": args.images,
                                         "results": {"|".join(k): v for k, v in results.items()},
                                         "secs": {"|".join(k): v for k, v in secs.items()}}, indent=1))
    write_page(args, results, secs)


def measure(args):
    results, secs = {}, {}
    with tempfile.TemporaryDirectory() as td:
        ck = Path(td) / "random.pkl"
        write_random_checkpoint(ck)
        for prec in args.precisions:
            ext = load_region_extractor(ck, precision=prec)
            for name in args.images:
                ref = load_reference(name)
                t = time.perf_counter()
                mine = glied_fields(ext, ref)
                secs[prec, name] = time.perf_counter() - t
                results[prec, name] = compare(ref, mine, iou=0.99)
                results[prec, name, "iou0.9"] = compare(ref, mine, iou=0.9)["detections"]
                results[prec, name, "feat_cos"] = feature_cosines(ref, mine)
                print(f"{prec} {name}: {secs[prec, name]:.1f} s", flush=True)
            del ext
    return results, secs


def write_page(args, results, secs):
    L = []
    w = L.append
    w("# Parity of glied's bottom-up detector with the reference port\n")
    w(f"Generated by `python scripts/parity_report.py` on {datetime.date.today().isoformat()} "
      f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads). "
      "Numbers below are measured, not copied.\n")
    w("## What is compared\n")
    w("The reference is the detectron2 port **py-bottom-up-attention** (commit 85ec9b7), run on CPU with a "
      "deterministic random checkpoint that has exactly the key names, shapes and container layout of "
      "`faster_rcnn_from_caffe_attr.pkl` (536 entries, 65,545,214 values), on three scikit-image photos "
      "(astronaut 512x512, coffee 400x600, chelsea 300x451). glied regenerates the checkpoint "
      "(`scripts/bottomup_parity/make_random_ckpt.py`, md5-checked), loads it through its restricted "
      "unpickler and strict key map (every key consumed, every parameter and buffer filled), and runs its own "
      "modules on the port's stored resized input, so the network and the resize are tested separately. "
      "The tests (`tests/extractors/bottomup/test_bottomup_parity.py`) assert, in fp32: features normwise relative error "
      "<= 1e-4, class and attribute probabilities <= 1e-4, and RPN proposals and butd / fixed36 / adapt "
      "detections all matched one to one at IoU >= 0.99 with the same classes and attributes.\n")
    w("Normwise relative error = ||a - b|| / ||a||; max abs = largest absolute difference; glied runs with its "
      "default inference settings: fp32 = NCHW, FrozenBN as separate ops (the port's rounding), res5 in chunks "
      "of 16 RoIs; bf16 = res5 in bf16 with FrozenBN folded and channels-last, backbone and RPN fp32.\n")
    for prec in args.precisions:
        w(f"## {prec}: error per stage (reference vs glied)\n")
        w("| stage | metric | " + " | ".join(args.images) + " |")
        w("|---|---|" + "---|" * len(args.images))
        for label, key, metric in FLOAT_ROWS:
            vals = [results[prec, n]["fields"][key][metric] for n in args.images]
            w(f"| {label} | {metric.replace('_', ' ')} | " + " | ".join(fmt(v) for v in vals) + " |")
        for key in ("given_features", "prop_feat_first8"):
            vals = [results[prec, n, "feat_cos"][key] for n in args.images]
            w(f"| {key}: cosine median / min | cosine | " + " | ".join(
                "%.6f / %.6f" % (v["median"], v["min"]) for v in vals) + " |")
        for label, key in INT_ROWS:
            vals = [results[prec, n]["fields"][key] for n in args.images]
            w(f"| {label} | differing | " + " | ".join(f"{v['n_diff']}/{v['n']}" for v in vals) + " |")
        w("")
        w(f"### {prec}: detections (one-to-one matching at IoU >= 0.99; in brackets at IoU >= 0.9)\n")
        w("| procedure | image | reference boxes | glied boxes | matched | same class | same attribute "
          "| max box diff (px) | max score diff |")
        w("|---|---|---|---|---|---|---|---|---|")
        for proc in ("rpn", "butd", "fixed36", "adapt"):
            for n in args.images:
                d = results[prec, n]["detections"][proc]
                d9 = results[prec, n, "iou0.9"][proc]
                cls = f"{d.get('obj_ids_agree', '-')}" if proc != "rpn" else "-"
                att = f"{d.get('attr_ids_agree', '-')}" if proc != "rpn" else "-"
                sc = d.get("obj_scores_max_abs", d.get("objectness_max_abs", float("nan")))
                w(f"| {proc} | {n} | {d['n_ref']} | {d['n_mine']} | {d['matched']} ({d9['matched']}) | {cls} | "
                  f"{att} | {fmt(d.get('box_max_abs', float('nan')))} | {fmt(sc)} |")
        w("")
        w("Time for the full comparison per image (backbone, RPN, 300 RoIs, 20 given boxes, three selections), "
          f"{prec}: " + ", ".join(f"{n} {secs[prec, n]:.1f} s" for n in args.images) +
          " (shared, busy machine: indicative only; see the benchmark below).\n")
    w("## What each feature set corresponds to\n")
    w("- `butd` (default; `--procedure butd`, 10..100 regions): the original Caffe rule of bottom-up-attention "
      "`tools/generate_tsv.py`, i.e. the published `*_resnet101_faster_rcnn_genome.tsv` features: per-class NMS "
      "0.3 over the unregressed proposal boxes, each proposal's best surviving class probability, keep >= 0.2, "
      "clamp to [10, 100] by that confidence; boxes are the proposals. Computed here on the port's network "
      "outputs (the port itself does not ship this rule).\n"
      "- `fixed36`: the port's attribute demo (detectron2 `fast_rcnn_inference_single_image` on class-specific "
      "regressed boxes, score > 0.2, per-class NMS from 0.5 up until exactly 36); a RoI may appear twice with two "
      "classes. Close in spirit to the 36-box release, which came from a different Caffe snapshot.\n"
      "- `adapt`: the port's own extraction rule (`demo/detectron2_mscoco_proposal_maxnms.py`): best class and "
      "its regressed box per RoI, class-agnostic NMS from 0.3 up until >= 10 remain, top 100; no score "
      "threshold.\n"
      "In all three, features (and attributes) are those of the proposal RoIs, never re-pooled on regressed "
      "boxes.\n")
    w("## Semantics that matter\n")
    w("- Background is class 1600 (last); the attribute head is conditioned on the argmax of all 1601 class "
      "logits, background included (also for given boxes); attribute scores are the port's softmax over the 400 "
      "real attributes (\"no attribute\" logit dropped before the softmax).\n"
      "- Given boxes (`extract_given_boxes`): exactly the boxes given, scaled to the input separately in x and y "
      "(float32), RoI-pooled, no regression, no selection.\n"
      "- Resizer: `resizer=\"pil\"` (default) is the port's PIL bilinear resize on uint8 (antialiased when "
      "shrinking), tested to reproduce the port's input bit for bit on the three photos; `resizer=\"cv2\"` is the "
      "original Caffe code's OpenCV INTER_LINEAR resize (no antialiasing). The two give different pixels, so "
      "features from one are not bit-comparable to features from the other; choose the one matching the "
      "features you compare against.\n"
      "- Box conventions are the port's: RoIPool uses Caffe's +1 inside, decoding / clipping ([0, W]) / NMS / IoU "
      "are continuous (no +1). The original Caffe code used +1 throughout, so butd boxes can differ from the "
      "published TSV files by sub-pixel amounts.\n")
    if args.bench_log:
        w("## Speed and reduced precision (benchmarks/bench_bottomup.py)\n")
        w("Output of `python benchmarks/bench_bottomup.py`, verbatim:\n")
        w("```")
        w(Path(args.bench_log).read_text().rstrip())
        w("```\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
