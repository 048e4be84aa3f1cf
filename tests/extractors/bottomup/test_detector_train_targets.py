"""Target assignment, sampling, box coding and the attribute loss of the detector training (no model needed)."""
import math

import pytest
import torch

from glied.extractors.bottomup.training import (
    DetectorTrainConfig, attribute_loss, lr_at, match_anchors, sample_labels, sample_rois)
from glied.extractors.bottomup.boxes import encode as encode_boxes


def test_encode_is_the_inverse_of_the_model_decoder():
    from glied.extractors.bottomup.boxes import decode as decode_boxes

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat([ref, ref + 5 + torch.rand(50, 2, generator=g) * 50], 1)
    tgt = torch.rand(50, 2, generator=g) * 100
    tgt = torch.cat([tgt, tgt + 5 + torch.rand(50, 2, generator=g) * 50], 1)
    for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        d = encode_boxes(ref, tgt, w)
        assert torch.allclose(decode_boxes(d, ref, w), tgt, atol=1e-3)
    # identical boxes encode to zero; a shift of one width encodes to dx = wx
    assert torch.allclose(encode_boxes(ref, ref, (10, 10, 5, 5)), torch.zeros(50, 4), atol=1e-5)
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.allclose(encode_boxes(box, box + torch.tensor([10.0, 0, 10, 0]), (10, 10, 5, 5)),
                          torch.tensor([[10.0, 0, 0, 0]]))


def test_match_anchors_thresholds_and_low_quality_matches():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with box 0 -> positive
        [0.0, 0.0, 10.0, 12.0],    # IoU 0.83 -> positive
        [0.0, 0.0, 10.0, 20.0],    # IoU 0.5 -> ignored
        [100.0, 100.0, 110.0, 110.0],  # IoU 0 -> negative
        [50.0, 50.0, 70.0, 70.0],  # IoU 0.25 with box 1, its best anchor -> positive (low-quality match)
    ])
    labels, matched = match_anchors(anchors, gt, 0.7, 0.3)
    assert labels.tolist() == [1, 1, -1, 0, 1]
    assert matched[[0, 1, 4]].tolist() == [0, 0, 1]


def test_match_anchors_without_boxes_all_negative():
    labels, _ = match_anchors(torch.rand(7, 4) + torch.tensor([0, 0, 1, 1.0]), torch.zeros((0, 4)))
    assert labels.tolist() == [0] * 7


def test_sample_labels_caps_positives_and_fills_with_negatives():
    labels = torch.tensor([1] * 200 + [0] * 1000 + [-1] * 50)
    pos, neg = sample_labels(labels, 256, 0.5, torch.Generator().manual_seed(0))
    assert len(pos) == 128 and len(neg) == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 128
    pos, neg = sample_labels(torch.tensor([1] * 10 + [0] * 1000), 256, 0.5)
    assert len(pos) == 10 and len(neg) == 246
    pos, neg = sample_labels(torch.tensor([1] * 3 + [0] * 5), 256, 0.5)
    assert len(pos) == 3 and len(neg) == 5


def test_sample_rois_adds_ground_truth_and_builds_targets():
    cfg = DetectorTrainConfig(roi_batch_per_image=16, roi_positive_fraction=0.25)
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 100.0, 90.0]])
    classes = torch.tensor([2, 0])
    attrs = torch.tensor([[1, 8], [3, -1]])
    # proposals: none overlaps the boxes enough -> only the added ground truth is foreground
    proposals = torch.tensor([[0.0, 100.0, 20.0, 120.0]] * 30)
    s = sample_rois(proposals, gt, classes, attrs, num_classes=5, cfg=cfg, generator=torch.Generator().manual_seed(0))
    nfg = int(s["num_fg"])
    assert nfg == 2 and len(s["rois"]) == 16
    assert sorted(s["classes"][:2].tolist()) == [0, 2]
    assert (s["classes"][2:] == 5).all()  # background is the last index
    assert torch.allclose(s["deltas"][:2], torch.zeros(2, 4), atol=1e-5)  # gt RoIs need no regression
    assert (s["deltas"][2:] == 0).all()
    for k in range(2):
        j = 0 if s["classes"][k] == 2 else 1
        assert s["attributes"][k].tolist() == attrs[j].tolist()
    assert (s["attributes"][2:] == -1).all()


def test_sample_rois_on_image_without_boxes_is_all_background():
    cfg = DetectorTrainConfig(roi_batch_per_image=8)
    s = sample_rois(torch.tensor([[0.0, 0, 10, 10]] * 20), torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long),
                    torch.zeros((0, 1), dtype=torch.long), num_classes=3, cfg=cfg)
    assert len(s["rois"]) == 8 and (s["classes"] == 3).all() and int(s["num_fg"]) == 0


def test_attribute_loss_is_mean_ce_over_every_label_and_none_for_empty_rows():
    logits = torch.zeros(2, 5, requires_grad=True)  # A = 4, "none" = 4
    loss = attribute_loss(logits, torch.tensor([[0, 2], [-1, -1]]))
    assert loss.item() == pytest.approx(math.log(5))
    loss.backward()
    # row 0 pushes up labels 0 and 2, row 1 pushes up "none"
    g = logits.grad
    assert g[0, 0] < 0 and g[0, 2] < 0 and g[0, 1] > 0 and g[1, 4] < 0 and g[1, 0] > 0
    # the optimum for two labels is half the mass on each
    good = torch.log(torch.tensor([[0.5, 1e-6, 0.5, 1e-6, 1e-6]]))
    assert attribute_loss(good, torch.tensor([[0, 2]])).item() == pytest.approx(math.log(2), abs=1e-4)
    assert attribute_loss(torch.zeros(0, 5), torch.zeros((0, 2), dtype=torch.long)).item() == 0.0


def test_lr_schedule_warms_up_then_decays():
    cfg = DetectorTrainConfig(lr=1e-2, warmup_iters=10)
    lrs = [lr_at(i, 100, cfg) for i in range(101)]
    assert lrs[0] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-2, rel=1e-3)
    assert lrs[100] == pytest.approx(5e-4)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:11]))


def test_train_config_round_trip_and_unknown_keys():
    cfg = DetectorTrainConfig(epochs=3, lr=0.5)
    assert DetectorTrainConfig.from_dict(cfg.to_dict()) == cfg
    from glied.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown"):
        DetectorTrainConfig.from_dict({"epochs": 1, "bogus": 2})


def test_training_proposal_counts_are_validated():
    from glied.errors import ConfigError
    DetectorTrainConfig(rpn_train_pre_nms_topk=300, rpn_train_post_nms_topk=50).validate()
    for bad in ({"rpn_train_pre_nms_topk": 0}, {"rpn_train_post_nms_topk": -1}):
        with pytest.raises(ConfigError, match="rpn_train"):
            DetectorTrainConfig(**bad).validate()
