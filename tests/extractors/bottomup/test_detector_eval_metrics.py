"""COCOeval wrapper, greedy matching and attribute accuracy on hand-made detections."""
import json

import cv2
import numpy as np
import pytest

from glied.extractors.bottomup.data import DetectionDataset
from glied.extractors.bottomup.evaluation import attribute_accuracy, coco_box_map, match_greedy, to_coco_results


@pytest.fixture
def data(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    boxes = {1: [[10, 10, 40, 40], [60, 60, 90, 100]], 2: [[5, 50, 50, 95]]}
    attrs = {1: [[0, 2], [1, 3]], 2: [[1, 2]]}
    classes = {1: [1, 2], 2: [2]}
    k = 0
    for iid in (1, 2):
        cv2.imwrite(str(img_dir / f"{iid}.png"), np.zeros((100, 100, 3), np.uint8))
        images.append({"id": iid, "file_name": f"{iid}.png", "width": 100, "height": 100})
        for b, a, c in zip(boxes[iid], attrs[iid], classes[iid]):
            k += 1
            anns.append({"id": k, "image_id": iid, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0, "attribute_ids": a})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "attributes": [{"id": 0, "name": "red", "type": "colour"}, {"id": 1, "name": "blue", "type": "colour"},
                           {"id": 2, "name": "small", "type": "size"}, {"id": 3, "name": "large", "type": "size"}]}
    (tmp_path / "i.json").write_text(json.dumps(coco))
    return DetectionDataset.load(tmp_path / "i.json", img_dir)


def _perfect(d):
    dets = {}
    for r in d.records:
        probs = np.zeros((len(r.boxes), 4), np.float32)
        for k, labels in enumerate(r.attributes):
            probs[k, labels[labels >= 0]] = 0.5
        dets[r.image_id] = {"boxes": r.boxes.copy(), "scores": np.linspace(0.9, 0.8, len(r.boxes)),
                            "classes": r.classes.copy(), "attr_probs": probs}
    return dets


def _results(d, dets):
    return [x for r in d.records for x in to_coco_results(r.image_id, dets[r.image_id], d.category_ids)]


def test_perfect_detections_give_map_one_and_full_attribute_accuracy(data):
    dets = _perfect(data)
    m = coco_box_map(data.coco, _results(data, dets))
    assert m["map50"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)
    a = attribute_accuracy(data, dets)
    assert a["attr_acc"] == 1.0 and a["attr_colour_acc"] == 1.0 and a["attr_size_acc"] == 1.0
    assert a["attr_top1_acc"] == 1.0 and a["box_recall"] == 1.0 and a["matched_boxes"] == 3


def test_imperfect_detections_lower_map_and_attribute_accuracy(data):
    dets = _perfect(data)
    d1 = dets[1]
    d1["classes"] = np.array([1, 1])  # second box gets the wrong class
    d1["attr_probs"][0] = [0.1, 0.6, 0.3, 0.0]  # first box: colour wrong (blue), size right (small)
    m = coco_box_map(data.coco, _results(data, dets))
    assert 0.0 < m["map50"] < 1.0
    a = attribute_accuracy(data, dets)
    assert a["attr_colour_acc"] == pytest.approx(2 / 3) and a["attr_size_acc"] == 1.0
    assert a["attr_acc"] == pytest.approx(5 / 6)
    assert a["attr_top1_acc"] == pytest.approx(2 / 3)


def test_shifted_boxes_are_unmatched(data):
    dets = _perfect(data)
    dets[2]["boxes"] = dets[2]["boxes"] + 30  # IoU < 0.5 with its box
    m = coco_box_map(data.coco, _results(data, dets))
    a = attribute_accuracy(data, dets)
    assert m["map50"] < 1.0 and a["matched_boxes"] == 2 and a["box_recall"] == pytest.approx(2 / 3)


def test_no_detections_give_zero(data):
    assert coco_box_map(data.coco, [])["map50"] == 0.0
    a = attribute_accuracy(data, {})
    assert a["matched_boxes"] == 0 and np.isnan(a["attr_acc"])


def test_match_greedy_prefers_high_scores_one_to_one():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    det = np.array([[0, 0, 10, 11], [0, 0, 10, 10], [21, 20, 31, 30], [50, 50, 60, 60]], np.float32)
    m = match_greedy(gt, det, np.array([0.9, 0.5, 0.8, 0.99]))
    assert m.tolist() == [0, 2]
    assert match_greedy(gt, det[:0], np.zeros(0)).tolist() == [-1, -1]
