"""Region-selection procedures (butd / fixed36 / adapt) as pure functions, and the box geometry they use."""
import numpy as np
import pytest
import torch
from torchvision.ops import nms

from glied.extractors.bottomup import boxes as box_ops
from glied.extractors.bottomup.selection import (multiclass_nms_keep, select_adapt, select_butd, select_fixed36,
                                                 to_original)


def probs_with(p, c, entries):
    """(P, C+1) probabilities: background gets the rest; entries {(i, c): prob}."""
    x = torch.zeros(p, c + 1)
    for (i, k), v in entries.items():
        x[i, k] = v
    x[:, -1] = 1 - x[:, :-1].sum(1)
    return x


def grid_boxes(n, size=10.0, step=20.0):
    """n disjoint boxes in a row."""
    x = torch.arange(n, dtype=torch.float32) * step
    return torch.stack([x, torch.zeros(n), x + size, torch.full((n,), size)], dim=1)


def test_butd_per_class_nms_on_proposals_and_threshold():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [100, 0, 110, 10]], dtype=torch.float32)
    # box 1 overlaps box 0 (IoU 10/11 > 0.3): in class 0 it is suppressed; in class 1 it is the best -> kept there
    probs = probs_with(4, 3, {(0, 0): 0.9, (1, 0): 0.8, (1, 1): 0.3, (2, 2): 0.5, (3, 2): 0.1})
    s = select_butd(boxes, probs, min_boxes=1, max_boxes=10)
    assert s.idx.tolist() == [0, 1, 2]                       # box 3 max_conf 0.1 < 0.2; passing ones in index order
    assert torch.allclose(s.max_conf, torch.tensor([0.9, 0.3, 0.5]))
    assert s.obj_ids.tolist() == [0, 0, 2]                   # object = argmax foreground prob (not the NMS winner)
    assert torch.allclose(s.obj_scores, torch.tensor([0.9, 0.8, 0.5]))
    assert torch.equal(s.boxes, boxes[:3])                   # unregressed proposals


def test_butd_bounds_min_and_max_sorted_by_confidence():
    n = 150
    boxes = grid_boxes(n)
    conf = torch.linspace(0.05, 0.95, n)
    probs = probs_with(n, 2, {(i, 0): float(conf[i]) for i in range(n)})
    s = select_butd(boxes, probs, min_boxes=10, max_boxes=100)
    assert len(s) == 100 and s.idx.tolist() == list(range(n - 1, n - 101, -1))
    low = probs_with(n, 2, {(i, 0): 0.01 * float(conf[i]) for i in range(n)})
    s = select_butd(boxes, low, min_boxes=10, max_boxes=100)
    assert len(s) == 10 and s.idx.tolist() == list(range(n - 1, n - 11, -1))
    s = select_butd(boxes[:4], low[:4], min_boxes=10, max_boxes=100)     # fewer proposals than min_boxes
    assert len(s) == 4


def test_butd_zero_proposals():
    s = select_butd(torch.zeros((0, 4)), torch.zeros((0, 5)))
    assert len(s) == 0 and s.boxes.shape == (0, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_nms_equals_torchvision_per_class(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(150, 2, generator=g) * 60
    b = torch.cat([xy, xy + torch.rand(150, 2, generator=g) * 40 + 1], 1)
    b = torch.round(b * 2) / 2                                  # exact geometric ties, borderline IoUs
    sc = torch.rand(150, 30, generator=g)
    keep = multiclass_nms_keep(b, sc, 0.3)
    for c in range(30):
        ref = torch.zeros(150, dtype=torch.bool)
        ref[nms(b, sc[:, c], 0.3)] = True
        assert torch.equal(keep[:, c], ref), c


def test_butd_fast_path_equals_full_sweep():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(200, 2, generator=g) * 300
    b = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 100 + 5], 1)
    logits = torch.randn(200, 51, generator=g) * 3
    probs = torch.softmax(logits, 1)
    s = select_butd(b, probs, min_boxes=10, max_boxes=100)
    kept = multiclass_nms_keep(b, probs[:, :-1], 0.3)
    full = torch.where(kept, probs[:, :-1], torch.zeros(())).max(1).values
    expect = torch.nonzero(full >= 0.2).flatten()
    if len(expect) > 100:
        expect = torch.argsort(full, descending=True, stable=True)[:100]
    assert 10 <= len(expect) and s.idx.tolist() == expect.tolist()
    assert torch.equal(s.max_conf, full[expect])


def test_fixed36_counts_and_duplicate_rois():
    n, c = 60, 4
    boxes = grid_boxes(n)
    reg = boxes.repeat(1, c)                                     # (P, 4C) class boxes = proposals
    probs = probs_with(n, c, {**{(i, 0): 0.5 for i in range(n)}, **{(i, 1): 0.3 for i in range(n)}})
    s = select_fixed36(reg, probs, (20, 2000))
    assert len(s) == 36 and s.nms_thresh == 0.5
    assert (s.obj_scores > 0.2).all()
    # with only 30 (RoI, class) pairs above 0.2 (15 RoIs x 2 classes) the loop ends at 0.9 with 30
    s = select_fixed36(reg[:15], probs[:15], (20, 2000))
    assert len(s) == 30 and abs(s.nms_thresh - 0.9) < 1e-9
    assert sorted(s.idx.tolist()) == sorted(list(range(15)) * 2)   # a RoI appears once per class


def test_adapt_raises_threshold_until_min_boxes_and_ignores_score():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 14], [0, 0, 10, 16]], dtype=torch.float32)
    probs = probs_with(4, 2, {(0, 0): 0.1, (1, 0): 0.09, (2, 1): 0.08, (3, 1): 0.07})
    reg = boxes.repeat(1, 2)
    s = select_adapt(reg, probs, (100, 100), min_boxes=4, max_boxes=10)
    # IoUs of the nested boxes: 10/12, 12/14, 14/16 ... all suppressed until threshold 0.9 (> 0.875)
    assert len(s) == 4 and abs(s.nms_thresh - 0.9) < 1e-9
    assert s.obj_ids.tolist() == [0, 0, 1, 1]
    s = select_adapt(reg, probs, (100, 100), min_boxes=1, max_boxes=10)
    assert len(s) == 1 and abs(s.nms_thresh - 0.3) < 1e-9


def test_regressed_boxes_are_clipped_to_input():
    boxes = torch.tensor([[90.0, 90.0, 99.0, 99.0]])
    deltas = torch.tensor([[0.0, 0.0, 5.0, 5.0]])            # grow the box far beyond the 100x100 input
    reg = box_ops.decode(deltas, boxes, (10, 10, 5, 5))
    s = select_adapt(reg, probs_with(1, 1, {(0, 0): 0.9}), (100, 100), min_boxes=1)
    assert s.boxes.min() >= 0 and s.boxes.max() <= 100


def test_to_original_scales_x_and_y_separately_and_clips():
    b = torch.tensor([[10.0, 20.0, 610.0, 410.0]])
    out = to_original(b, input_hw=(400, 600), raw_hw=(200, 300))     # input is 2x the original
    assert torch.allclose(out, torch.tensor([[5.0, 10.0, 300.0, 200.0]]))
    out = to_original(torch.tensor([[0.0, 0.0, 600.0, 400.0]]), input_hw=(400, 600), raw_hw=(100, 301))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 301.0, 100.0]]))


def test_encode_decode_roundtrip():
    g = torch.Generator().manual_seed(0)
    src = torch.tensor([[10.0, 10.0, 50.0, 80.0], [0.0, 5.0, 3.0, 9.0]])
    dst = src + torch.rand(2, 4, generator=g) * 5
    for w in ((1, 1, 1, 1), (10, 10, 5, 5)):
        np.testing.assert_allclose(box_ops.decode(box_ops.encode(src, dst, w), src, w), dst, rtol=1e-5, atol=1e-4)
