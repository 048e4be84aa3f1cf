"""Parity of glied's bottom-up detector with the reference detectron2 port (py-bottom-up-attention @ 85ec9b7).

A deterministic random checkpoint in the exact layout of faster_rcnn_from_caffe_attr.pkl is generated (once per
session, 262 MB in a tmp dir), loaded through glied's restricted unpickler and strict key map, and run on the
port's stored resized input; every stage is compared with the port's outputs (tests/data/parity/bottomup/).
The extractor runs in its default fp32 mode ("exact": the port's rounding); the faster fp32 modes ("fast",
"gemm": res5 differs by float32 rounding) are checked on chelsea under -m slow. Tolerances (fp32): features
normwise rel. err <= 1e-4, class/attribute probabilities <= 1e-4 abs, proposals and butd / fixed36 / adapt
detections all matched one-to-one at IoU >= 0.99 with equal classes and attributes. chelsea runs by default
(~10-15 s on 2 cores); astronaut and coffee under -m slow.
"""
import json

import numpy as np
import pytest
import torch

from glied.extractors.bottomup import load_region_extractor
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.model import BottomUpDetector, ImageTransform
from scripts.bottomup_parity.harness import (CKPT_MD5, REF_DIR, compare, glied_fields, load_reference,
                                                      write_random_checkpoint)
from glied.extractors.bottomup.weights import detectron2_key_map, load_detectron2_state, read_detectron2_pickle

TOL = 1e-4
IMAGES = [pytest.param("chelsea"),
          pytest.param("astronaut", marks=pytest.mark.slow),
          pytest.param("coffee", marks=pytest.mark.slow)]


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bottomup_parity") / "faster_rcnn_random_attr.pkl"
    md5 = write_random_checkpoint(path)
    assert md5 == CKPT_MD5, "the vendored generator no longer writes the reference checkpoint"
    return path


@pytest.fixture(scope="session")
def extractor(random_ckpt):
    return load_region_extractor(random_ckpt, device="cpu", precision="fp32")


_RESULTS = {}


@pytest.fixture
def result(request, extractor):
    """(reference fields, glied fields, comparison) for one image, computed once per session."""
    name = request.param
    if name not in _RESULTS:
        ref = load_reference(name)
        mine = glied_fields(extractor, ref)
        _RESULTS[name] = (ref, mine, compare(ref, mine, iou=0.99))
    return _RESULTS[name]


def test_checkpoint_layout_goes_through_strict_map(random_ckpt):
    state = read_detectron2_pickle(random_ckpt)
    model = BottomUpDetector(BottomUpConfig.r101_vg())
    load_detectron2_state(model, state, str(random_ckpt))
    kmap = detectron2_key_map(model.cfg)
    assert len(state) == 536 and set(state) == set(kmap)
    assert sum(v.size for v in state.values()) == 65_545_214
    own = model.state_dict()
    for d2, ours in kmap.items():      # every tensor landed where the map says, bit for bit
        assert np.array_equal(own[ours].cpu().numpy(), state[d2]), d2


@pytest.mark.parametrize("result", IMAGES, indirect=True)
def test_backbone_and_rpn_maps(result):
    ref, mine, cmp = result
    f = cmp["fields"]
    assert list(mine["res4_shape"]) == list(ref["res4_shape"])
    for k in ("res4_chmean", "res4_chstd", "res4_spatial_mean", "rpn_objectness_map"):
        assert f[k]["norm_rel"] <= TOL, (k, f[k])


@pytest.mark.parametrize("result", IMAGES, indirect=True)
def test_rpn_proposals(result):
    ref, mine, cmp = result
    d = cmp["detections"]["rpn"]
    assert d["n_ref"] == d["n_mine"] == d["matched"] == 300, d
    assert cmp["fields"]["rpn_objectness"]["norm_rel"] <= TOL


@pytest.mark.parametrize("result", IMAGES, indirect=True)
def test_per_proposal_outputs(result):
    ref, mine, cmp = result
    f = cmp["fields"]
    for k in ("prop_feat_first8", "prop_feat_mean", "prop_feat_l2"):
        assert f[k]["norm_rel"] <= TOL, (k, f[k])
    for k in ("prop_fg_maxprob", "prop_bg_prob", "prop_top5_prob", "prop_attr_maxprob"):
        assert f[k]["max_abs"] <= TOL, (k, f[k])
    for k in ("prop_fg_argmax", "prop_cls_argmax_incl_bg", "prop_attr_argmax"):
        assert f[k]["n_diff"] == 0, (k, f[k])
    assert f["prop_box_of_fg_argmax"]["norm_rel"] <= TOL


@pytest.mark.parametrize("result", IMAGES, indirect=True)
def test_given_box_features_and_probabilities(result):
    ref, mine, cmp = result
    f = cmp["fields"]
    assert f["given_features"]["norm_rel"] <= TOL, f["given_features"]
    assert f["given_cls_probs"]["max_abs"] <= TOL, f["given_cls_probs"]
    assert f["given_attr_probs400_port"]["max_abs"] <= TOL, f["given_attr_probs400_port"]
    for k in ("given_obj_ids", "given_attr_ids", "given_attr_cond_class"):
        assert f[k]["n_diff"] == 0, (k, f[k])


@pytest.mark.parametrize("result", IMAGES, indirect=True)
@pytest.mark.parametrize("proc", ["butd", "fixed36", "adapt"])
def test_detections_match(result, proc):
    ref, mine, cmp = result
    d = cmp["detections"][proc]
    n = d["n_ref"]
    assert d["n_mine"] == n and d["matched"] == n, d
    assert d["obj_ids_agree"] == n and d["attr_ids_agree"] == n, d
    assert d["obj_scores_max_abs"] <= TOL and d["attr_scores_max_abs"] <= TOL, d
    assert cmp["fields"][f"{proc}_proposal_idx"]["n_diff"] == 0
    # detection features are those of the proposal RoIs: their norms and means match the port's per proposal
    idx = ref[f"{proc}_proposal_idx"]
    feats = mine[f"{proc}_features"].astype(np.float64)
    assert np.abs(np.linalg.norm(feats, axis=1) - ref["prop_feat_l2"][idx]).max() <= TOL * ref["prop_feat_l2"].max()
    assert np.abs(feats.mean(axis=1) - ref["prop_feat_mean"][idx]).max() <= TOL * np.abs(ref["prop_feat_mean"]).max()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "gemm"])
def test_faster_fp32_modes_stay_inside_the_tolerance(random_ckpt, mode):
    """fp32_mode "fast" (res5 folded, channels-last) and "gemm" (res5 as GEMMs): backbone and RPN keep the port's
    rounding (proposals equal), the RoI head differs by float32 rounding, inside the fp32 tolerances."""
    from glied.extractors.bottomup.extractor import RegionExtractor

    state = read_detectron2_pickle(random_ckpt)
    model = BottomUpDetector(BottomUpConfig.r101_vg())
    load_detectron2_state(model, state, str(random_ckpt))
    ref = load_reference("chelsea")
    cmp = compare(ref, glied_fields(RegionExtractor(model, fp32_mode=mode), ref), iou=0.99)
    f = cmp["fields"]
    assert f["rpn_objectness"]["norm_rel"] == 0 and cmp["detections"]["rpn"]["matched"] == 300
    for k in ("prop_feat_first8", "prop_feat_l2", "given_features"):
        assert f[k]["norm_rel"] <= TOL, (k, f[k])
    for k in ("prop_fg_maxprob", "given_cls_probs", "given_attr_probs400_port"):
        assert f[k]["max_abs"] <= TOL, (k, f[k])
    for proc in ("butd", "fixed36", "adapt"):
        d = cmp["detections"][proc]
        assert d["n_mine"] == d["n_ref"] == d["matched"] == d["obj_ids_agree"] == d["attr_ids_agree"], d


def test_given_boxes_scaled_like_the_port():
    ref = dict(np.load(REF_DIR / "chelsea.npz"))
    boxes = np.array(json.loads((REF_DIR / "boxes.json").read_text())["boxes"]["chelsea"], dtype=np.float32)
    np.testing.assert_array_equal(boxes, ref["given_boxes"])
    (h, w), (h0, w0) = ref["input_hw"], ref["raw_hw"]
    sx, sy = np.float32(w / w0), np.float32(h / h0)
    np.testing.assert_array_equal(boxes * np.array([sx, sy, sx, sy], np.float32), ref["given_boxes_input"])


@pytest.mark.parametrize("name", ["chelsea", "astronaut", "coffee"])
def test_pil_resize_reproduces_port_input(name):
    skd = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(getattr(skd, name)()[:, :, ::-1])       # RGB -> BGR, as the port was fed
    ref = load_reference(name)
    t = ImageTransform(BottomUpConfig.r101_vg(resizer="pil"))
    x, info = t(img)
    assert info.input_hw == tuple(int(v) for v in ref["input_hw"])
    got = (x[0] + t.pixel_mean[0]).permute(1, 2, 0).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, ref["input_bgr_u8"])
    # cv2 (the original Caffe resize, no antialiasing) is a different, explicit choice
    x2, info2 = ImageTransform(BottomUpConfig.r101_vg(resizer="cv2"))(img)
    assert info2.input_hw == info.input_hw and not torch.equal(x2, x)
