"""COCO-format detection data with attributes: parsing, splits, errors, flips, batching."""
import json

import cv2
import numpy as np
import pytest
import torch

from glied.errors import InputError
from glied.extractors.bottomup.data import DetectionDataset, ImageCache, hflip, make_batch, read_image


def _world(tmp_path, *, splits=True, vg=False, extra_ann=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images = []
    for i, (w, h) in enumerate([(64, 48), (80, 80), (40, 60)]):
        cv2.imwrite(str(img_dir / f"{i}.png"), np.full((h, w, 3), 30 * i, np.uint8))
        im = {"id": 10 + i, "file_name": f"{i}.png", "width": w, "height": h}
        if splits:
            im["split"] = ["train", "restval", "test"][i]
        images.append(im)
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 4, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 20, 30, 28], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 80, 80], "iscrowd": 1},
        {"id": 4, "image_id": 12, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    for a, at in zip(anns, ([0, 3], [2], [], [1, 2])):
        if vg:
            a["attribute"] = [v + 1 for v in at] + [0] * (3 - len(at))
        else:
            a["attribute_ids"] = at + [-1]
    anns += extra_ann or []
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "star"}, {"id": 3, "name": "circle"}],
            "attributes": [] if vg else [{"id": 0, "name": "red", "type": "colour"},
                                         {"id": 1, "name": "blue", "type": "colour"},
                                         {"id": 2, "name": "small", "type": "size"},
                                         {"id": 3, "name": "large", "type": "size"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, img_dir


def test_load_maps_categories_attributes_and_skips_crowd(tmp_path):
    ann, img = _world(tmp_path)
    d = DetectionDataset.load(ann, img)
    assert d.class_names == ["circle", "star"] and d.category_ids == [3, 7]
    assert d.attribute_groups() == {"colour": [0, 1], "size": [2, 3]}
    r0 = d.records[0]
    assert r0.boxes.tolist() == [[4, 4, 24, 14], [30, 20, 60, 48]]
    assert r0.classes.tolist() == [1, 0]
    assert r0.attributes.tolist() == [[0, 3], [2, -1]]
    assert len(d.records[1].boxes) == 0  # the crowd box is not a training target
    assert d.records[1].attributes.shape == (0, 1)


def test_visual_genome_style_one_based_attributes(tmp_path):
    ann, img = _world(tmp_path, vg=True)
    d = DetectionDataset.load(ann, img)
    assert d.records[0].attributes.tolist() == [[0, 3], [2, -1]]
    assert d.attribute_names == ["0", "1", "2", "3"]


def test_split_from_field_and_from_karpathy_file(tmp_path):
    ann, img = _world(tmp_path)
    assert [r.image_id for r in DetectionDataset.load(ann, img, split="train").records] == [10, 11]
    test = DetectionDataset.load(ann, img, split="test")
    assert [r.image_id for r in test.records] == [12]
    assert [a["id"] for a in test.coco["annotations"]] == [4]
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps({"images": [{"cocoid": 10, "split": "val"}, {"cocoid": 11, "split": "test"},
                                          {"cocoid": 12, "split": "test"}]}))
    assert [r.image_id for r in DetectionDataset.load(ann, img, split="test", split_file=cap).records] == [11, 12]


def test_split_without_source_is_a_clear_error(tmp_path):
    ann, img = _world(tmp_path, splits=False)
    with pytest.raises(InputError, match="--split-file"):
        DetectionDataset.load(ann, img, split="train")
    with pytest.raises(InputError, match="unknown split"):
        DetectionDataset.load(ann, img, split="dev")


@pytest.mark.parametrize("bad, match", [
    ({"id": 9, "image_id": 10, "category_id": 7, "bbox": [50, 4, 20, 10], "attribute_ids": []}, "outside"),
    ({"id": 9, "image_id": 10, "category_id": 7, "bbox": [5, 4, 0, 10], "attribute_ids": []}, "empty"),
    ({"id": 9, "image_id": 10, "category_id": 5, "bbox": [5, 4, 5, 10], "attribute_ids": []}, "category_id"),
    ({"id": 9, "image_id": 99, "category_id": 7, "bbox": [5, 4, 5, 10], "attribute_ids": []}, "unknown image"),
    ({"id": 9, "image_id": 10, "category_id": 7, "bbox": [5, 4, 5, 10], "attribute_ids": [4]}, "out of range"),
])
def test_bad_annotations_name_the_annotation(tmp_path, bad, match):
    ann, img = _world(tmp_path, extra_ann=[bad])
    with pytest.raises(InputError, match=match) as e:
        DetectionDataset.load(ann, img)
    assert str(ann) in str(e.value)


def test_missing_image_and_bad_json(tmp_path):
    ann, img = _world(tmp_path)
    (img / "1.png").unlink()
    with pytest.raises(InputError, match="1.png.*missing"):
        DetectionDataset.load(ann, img)
    with pytest.raises(InputError, match="does not exist"):
        DetectionDataset.load(tmp_path / "nope.json", img)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        DetectionDataset.load(tmp_path / "broken.json", img)


def test_image_size_mismatch_is_reported(tmp_path):
    ann, img = _world(tmp_path)
    d = DetectionDataset.load(ann, img)
    cv2.imwrite(str(img / "0.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(InputError, match="10x10"):
        read_image(d.records[0])


def test_hflip_mirrors_boxes_with_the_pixels():
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:10, 2:8] = 255  # box x 2..8, y 5..10
    boxes = np.array([[2.0, 5.0, 8.0, 10.0]], np.float32)
    fimg, fboxes = hflip(img, boxes)
    ys, xs = np.nonzero(fimg[..., 0])
    assert fboxes.tolist() == [[22.0, 5.0, 28.0, 10.0]]
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (22, 28, 5, 10)
    assert np.array_equal(hflip(fimg, fboxes)[0], img)


def test_make_batch_scales_boxes_and_pads(tmp_path):
    ann, img = _world(tmp_path)
    d = DetectionDataset.load(ann, img)

    def transform(im):  # doubles the size, like a model transform with scale 2
        big = cv2.resize(im, (im.shape[1] * 2, im.shape[0] * 2)).astype(np.float32)
        return torch.from_numpy(big).permute(2, 0, 1)[None], (2.0, 2.0)

    images, sizes, targets = make_batch([d.records[0], d.records[2]], transform, [False, True])
    assert sizes == [(96, 128), (120, 80)]
    assert images.shape == (2, 3, 128, 128)  # padded to a multiple of 16
    assert targets[0]["boxes"].tolist() == [[8, 8, 48, 28], [60, 40, 120, 96]]
    assert targets[1]["boxes"].tolist() == [[2 * (40 - 11), 2, 2 * (40 - 1), 22]]  # flipped, then scaled
    assert targets[1]["classes"].tolist() == [1]
    assert float(images[1, :, 120:].abs().sum()) == 0.0


def test_image_cache_reads_each_photo_once_and_keeps_it_unchanged(tmp_path, monkeypatch):
    ann, img = _world(tmp_path)
    d = DetectionDataset.load(ann, img)
    small = d.records[2].height * d.records[2].width * 3
    cache = ImageCache(max_bytes=d.records[0].height * d.records[0].width * 3 + small)
    first = [cache(r) for r in d.records]
    assert all(np.array_equal(a, read_image(r)) for a, r in zip(first, d.records))
    assert cache.nbytes == first[0].nbytes + first[2].nbytes      # the middle photo does not fit
    import glied.extractors.bottomup.data as data_mod
    reads = []
    monkeypatch.setattr(data_mod, "read_image", lambda r: reads.append(r.path) or read_image(r))
    again = [cache(r) for r in d.records]
    assert reads == [d.records[1].path]                            # only the uncached one is read again
    assert again[0] is first[0] and not again[0].flags.writeable  # shared, so read-only

    def transform(im):
        return torch.from_numpy(im.astype(np.float32)).permute(2, 0, 1)[None], (1.0, 1.0)

    for flips in ([False, True, True], [True, False, False]):    # mirroring never touches the cached pixels
        a = make_batch(d.records, transform, flips, load=cache)
        b = make_batch(d.records, transform, flips)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[2], b[2]))
    assert np.array_equal(cache(d.records[0]), first[0])
