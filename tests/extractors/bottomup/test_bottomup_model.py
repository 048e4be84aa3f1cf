"""The bottom-up detector's module contract, the extractor API and degenerate inputs (small config, random
weights: fast)."""
import copy

import numpy as np
import pytest
import torch

from glied.errors import ConfigError, InputError
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.extractor import RegionExtractor
from glied.extractors.bottomup.model import BottomUpDetector, resized_hw
from glied.records import RegionFeatures


@pytest.fixture(scope="module")
def ext():
    torch.manual_seed(0)
    cfg = BottomUpConfig.small(min_boxes=2, max_boxes=20, score_thresh=0.0)
    model = BottomUpDetector(cfg)
    with torch.no_grad():   # make the heads' outputs varied enough that selection has something to do
        model.roi_heads.box_predictor.cls_score.weight.mul_(30)
    return RegionExtractor(model.eval(), fingerprint="sha256:test")


def test_module_contract_shapes(ext):
    m, cfg = ext.model, ext.cfg
    x, info = m.transform(np.zeros((100, 150, 3), np.uint8))
    # small preset: short side 100 -> 128 makes the long side 192 > max 128, so both scale by 128/150
    assert x.shape == (1, 3, 85, 128) and info.input_hw == (85, 128) and info.raw_hw == (100, 150)
    with torch.no_grad():
        res4 = m.backbone(x)
        assert res4.shape[:2] == (1, cfg.res4_channels)
        obj, dlt = m.rpn.head(res4)
        hf, wf = res4.shape[2:]
        assert obj.shape == (1, cfg.num_anchors, hf, wf) and dlt.shape == (1, 4 * cfg.num_anchors, hf, wf)
        anchors = m.rpn.anchors(hf, wf)
        assert anchors.shape == (hf * wf * cfg.num_anchors, 4)
        # (y, x, a) order: the second grid point (x=1) starts after the A anchors of x=0, shifted by the stride
        assert torch.allclose(anchors[cfg.num_anchors] - anchors[0], torch.tensor([16.0, 0, 16, 0]))
        props = m.rpn.propose(obj, dlt, info.input_hw)
        assert len(props) == 1 and props[0][0].shape[1] == 4
        rois = torch.tensor([[0, 0, 0, 64, 64], [0, 10, 20, 30, 90]], dtype=torch.float32)
        pooled = m.roi_heads.pool(res4, rois)
        r = cfg.pooler_resolution
        assert pooled.shape == (2, cfg.res4_channels, r, r)
        assert m.roi_heads.res5(pooled).shape == (2, cfg.feature_dim, r, r)
        feat = m.roi_heads.res5(pooled).mean(dim=(2, 3))
        cls_logits, deltas = m.roi_heads.box_predictor(feat)
        assert cls_logits.shape == (2, cfg.num_classes + 1) and deltas.shape == (2, 4 * cfg.num_classes)
        attr = m.roi_heads.attr_head(feat, torch.tensor([0, cfg.num_classes]))   # background may condition
        assert attr.shape == (2, cfg.num_attributes + 1)


def test_r101_preset_sizes():
    cfg = BottomUpConfig.r101_vg()
    assert cfg.depth == 101 and cfg.feature_dim == 2048 and cfg.res4_channels == 1024 and cfg.num_anchors == 12
    assert BottomUpConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="procedure"):
        BottomUpConfig.r101_vg(procedure="best")
    with pytest.raises(ConfigError, match="unknown BottomUpConfig fields"):
        BottomUpConfig.from_dict({"colour": 1})


def test_resize_rule_matches_detectron2():
    assert resized_hw(300, 451, 600, 1000) == (600, 902)
    assert resized_hw(400, 600, 600, 1000) == (600, 900)
    assert resized_hw(100, 1000, 600, 1000) == (100, 1000)      # long side capped
    assert resized_hw(1, 1, 600, 1000) == (600, 600)


def test_small_preset_is_trainable():
    m = BottomUpDetector(BottomUpConfig.small())
    assert isinstance(m.backbone.res2[0].conv1.norm, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in m.parameters())
    gn = BottomUpDetector(BottomUpConfig.small(norm="gn"))
    assert isinstance(gn.backbone.stem.conv1.norm, torch.nn.GroupNorm)


def _check_record(r, h, w, cfg):
    assert isinstance(r, RegionFeatures) and r.image_h == h and r.image_w == w
    n = len(r)
    assert r.features.shape == (n, cfg.feature_dim) and r.features.dtype == np.float32
    assert r.boxes.dtype == np.float32 and r.obj_ids.dtype == np.int64 and r.attr_ids.dtype == np.int64
    assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= w).all() and (r.boxes[:, 3] <= h).all()
    assert (r.obj_ids < cfg.num_classes).all() and (r.attr_ids < cfg.num_attributes).all()


@pytest.mark.parametrize("procedure", ["butd", "fixed36", "adapt"])
def test_extract_records_in_original_pixels(ext, procedure):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (90, 140, 3), dtype=np.uint8), rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)]
    out = ext.extract(imgs, procedure=procedure)
    assert len(out) == 2
    for r, im in zip(out, imgs):
        _check_record(r, im.shape[0], im.shape[1], ext.cfg)
    assert len(out[0]) >= 1


@pytest.mark.parametrize("shape,colour", [((1, 1, 3), 0), ((3, 2, 3), 255), ((128, 128, 3), 127)])
def test_degenerate_images(ext, shape, colour):
    img = np.full(shape, colour, np.uint8)
    (r,) = ext.extract([img])
    _check_record(r, shape[0], shape[1], ext.cfg)


def test_zero_proposals(ext, monkeypatch):
    img = np.zeros((64, 64, 3), np.uint8)
    monkeypatch.setattr(ext.model.rpn, "propose", lambda o, d, hw: [(torch.zeros((0, 4)), torch.zeros(0))])
    for proc in ("butd", "fixed36", "adapt"):
        (r,) = ext.extract([img], procedure=proc)
        assert len(r) == 0 and r.features.shape == (0, ext.cfg.feature_dim)


def test_bad_images_are_input_errors(ext):
    with pytest.raises(InputError, match="photo.jpg: expected a BGR uint8"):
        ext.extract([np.zeros((10, 10), np.uint8)], names=["photo.jpg"])
    with pytest.raises(InputError, match="too elongated"):
        ext.extract([np.zeros((1, 2000, 3), np.uint8)])


def test_given_boxes(ext):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (100, 160, 3), dtype=np.uint8)
    boxes = [[0, 0, 160, 100], [10.5, 20, 50, 60]]
    g = ext.predict_given_boxes(img, boxes, "im.jpg")
    r = g.regions
    assert np.array_equal(r.boxes, np.array(boxes, np.float32)) and r.features.shape == (2, ext.cfg.feature_dim)
    assert g.cls_probs.shape == (2, ext.cfg.num_classes + 1) and np.allclose(g.cls_probs.sum(1), 1, atol=1e-5)
    assert g.attr_probs.shape == (2, ext.cfg.num_attributes) and np.allclose(g.attr_probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(r.obj_ids, g.cls_probs[:, :-1].argmax(1))
    # the same boxes through extract_given_boxes, and features independent of the other boxes in the call
    one = ext.extract_given_boxes(img, boxes[1:], "im.jpg")
    np.testing.assert_allclose(one.features[0], r.features[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"im.jpg: box 1 \[10, 20, 170, 60\] lies outside the 160x100 image"):
        ext.extract_given_boxes(img, [[0, 0, 5, 5], [10, 20, 170, 60]], "im.jpg")
    with pytest.raises(InputError, match=r"im.jpg: box 0 \[10, 20, 10, 60\] has zero area"):
        ext.extract_given_boxes(img, [[10, 20, 10, 60]], "im.jpg")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_and_agrees(ext, precision):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    boxes = [[0, 0, 128, 128], [20, 20, 90, 100], [5, 60, 60, 120]]
    ref = ext.extract_given_boxes(img, boxes).features
    low = RegionExtractor(copy.deepcopy(ext.model), precision=precision)
    got = low.extract_given_boxes(img, boxes).features
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99, cos
    assert low.identity()["config"]["precision"] == precision
    with pytest.raises(ConfigError):
        RegionExtractor(copy.deepcopy(ext.model), precision="int8")
