"""Batched extraction: N images in one forward (backbone and RPN per image, the RoI head over the RoIs of all
images, chunks spanning images) give the regions of N single-image runs, to the fp32 tolerance (small config,
random weights: fast)."""
import numpy as np
import pytest
import torch

from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.extractor import RegionExtractor
from glied.extractors.bottomup.model import BottomUpDetector


@pytest.fixture(scope="module")
def ext():
    torch.manual_seed(0)
    # res5_chunk 7: chunks straddle the images' RoI lists, so the batch really groups RoIs of several images
    cfg = BottomUpConfig.small(min_boxes=2, max_boxes=20, score_thresh=0.0, res5_chunk=7)
    model = BottomUpDetector(cfg)
    with torch.no_grad():   # varied class scores, so that selection has something to do
        model.roi_heads.box_predictor.cls_score.weight.mul_(30)
    return RegionExtractor(model.eval(), fingerprint="sha256:test")


def photos():
    rng = np.random.default_rng(3)
    out = []
    for h, w in ((100, 150), (128, 128), (90, 200), (140, 110)):     # different sizes: no common padding
        yy, xx = np.mgrid[0:h, 0:w]
        im = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        for _ in range(3):      # a few bright rectangles for the RPN to find
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            im[(yy >= y0) & (yy < y0 + h // 3) & (xx >= x0) & (xx < x0 + w // 3)] = rng.integers(80, 255, 3)
        out.append(im)
    return out


@pytest.mark.parametrize("procedure", ["butd", "adapt"])
def test_batch_equals_single_image_runs(ext, procedure):
    ims = photos()
    batch = ext.extract(ims, procedure=procedure)
    single = [ext.extract([im], procedure=procedure)[0] for im in ims]
    assert len(batch) == len(ims)
    for b, s in zip(batch, single):
        assert (b.image_w, b.image_h) == (s.image_w, s.image_h) and len(b) == len(s) > 0
        np.testing.assert_allclose(b.boxes, s.boxes, rtol=0, atol=1e-3)
        np.testing.assert_array_equal(b.obj_ids, s.obj_ids)
        np.testing.assert_array_equal(b.attr_ids, s.attr_ids)
        np.testing.assert_allclose(b.obj_scores, s.obj_scores, rtol=0, atol=1e-5)
        rel = np.linalg.norm(b.features - s.features) / np.linalg.norm(s.features)
        assert rel <= 1e-5, rel


def test_raw_batch_keeps_every_intermediate(ext):
    ims = photos()[:3]
    raws = ext.raw_batch(ims)
    for im, r in zip(ims, raws):
        one = ext.raw(im)
        assert r.info == one.info
        torch.testing.assert_close(r.proposals, one.proposals, rtol=0, atol=0)   # backbone + RPN per image: same
        for a, b in ((r.features, one.features), (r.cls_logits, one.cls_logits), (r.attr_logits, one.attr_logits)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ext.raw_batch([]) == [] and ext.extract([]) == []
