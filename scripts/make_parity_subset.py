#!/usr/bin/env python3
"""Copy the small subset of the bottom-up parity reference that glied's tests need into the repository.

    python scripts/make_parity_subset.py /path/to/parity/bottomup/ref tests/data/parity/bottomup

The full reference files (outputs of py-bottom-up-attention @ 85ec9b7 on a random checkpoint, 3-4 MB each)
hold more than the tests compare. This keeps, per image: the port's resized input as a lossless PNG
(``<name>_input.png``) plus an npz of the compared fields (detection features are left out: they are the
proposal features, which the tests check through ``prop_feat_first8``, ``prop_feat_mean/l2`` and the given-box
features).
"""
import hashlib
import sys
from pathlib import Path

import cv2
import numpy as np

KEEP = ["raw_hw", "input_hw", "scale_xy", "res4_shape", "res4_chmean", "res4_chstd", "res4_spatial_mean",
        "rpn_objectness_map", "rpn_proposals", "rpn_objectness",
        "prop_fg_maxprob", "prop_fg_argmax", "prop_bg_prob", "prop_cls_argmax_incl_bg", "prop_top5_prob",
        "prop_top5_cls", "prop_feat_mean", "prop_feat_l2", "prop_attr_maxprob", "prop_attr_argmax",
        "prop_box_of_fg_argmax", "prop_feat_first8",
        "given_boxes", "given_boxes_input", "given_features", "given_cls_probs", "given_attr_cond_class",
        "given_attr_logits", "given_attr_probs400_port", "given_obj_ids", "given_obj_scores", "given_attr_ids",
        "given_attr_scores"]
for p in ("fixed36", "adapt", "butd"):
    KEEP += [f"{p}_{f}" for f in ("boxes", "obj_ids", "obj_scores", "attr_ids", "attr_scores", "proposal_idx")]
KEEP += ["fixed36_nms_thresh", "adapt_nms_thresh", "butd_max_conf"]


def main(src, dst):
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).glob("*.npz")):
        r = np.load(f)
        img = r["input_bgr_u8"]
        ok, png = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok
        (dst / f"{f.stem}_input.png").write_bytes(png.tobytes())
        fields = {k: r[k] for k in KEEP}
        fields["input_sha256"] = np.frombuffer(hashlib.sha256(img.tobytes()).digest(), dtype=np.uint8)
        np.savez_compressed(dst / f"{f.stem}.npz", **fields)
        print(f.stem, (dst / f"{f.stem}.npz").stat().st_size, len(png))


if __name__ == "__main__":
    main(*sys.argv[1:3])
