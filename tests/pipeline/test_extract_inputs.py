"""Input enumeration for `glied extract`: stable ids, deterministic order, shards."""
from __future__ import annotations

import json

import pytest

from glied.datasets.inputs import enumerate_inputs, parse_shard, shard
from glied.errors import InputError


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_folder_recursive_relative_ids(tmp_path):
    for rel in ["b/2.JPG", "a/1.png", "c.webp", "d.tiff", "notes.txt", ".hidden.jpg", "e/f/g.bmp"]:
        _touch(tmp_path / rel)
    items = enumerate_inputs(tmp_path)
    assert [it.id for it in items] == ["a/1.png", "b/2.JPG", "c.webp", "d.tiff", "e/f/g.bmp"]
    assert items[0].path == str(tmp_path / "a" / "1.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        enumerate_inputs(tmp_path / "empty")


def test_list_file(tmp_path):
    _touch(tmp_path / "imgs" / "x.jpg")
    _touch(tmp_path / "imgs" / "sub" / "y.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("# my photos\nimgs/sub/y.jpg\n\n./imgs/x.jpg\n")
    assert [(it.id, it.path) for it in enumerate_inputs(lst)] == [
        ("imgs/sub/y.jpg", str(tmp_path / "imgs" / "sub" / "y.jpg")),
        ("imgs/x.jpg", str(tmp_path / "imgs" / "x.jpg"))]
    ids = [it.id for it in enumerate_inputs(lst, images_root=str(tmp_path / "imgs" / ".."))]
    assert ids == ["imgs/sub/y.jpg", "imgs/x.jpg"]
    lst.write_text("imgs/x.jpg\nimgs/./x.jpg\n")
    with pytest.raises(InputError, match="appears twice"):
        enumerate_inputs(lst)


def test_karpathy_and_coco_json(tmp_path):
    _touch(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    kj = tmp_path / "dataset_coco.json"
    kj.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "val"}]}))
    [it] = enumerate_inputs(kj)
    assert it.id == "42" and it.path.endswith("val2014/COCO_val2014_000000000042.jpg")
    fj = tmp_path / "flickr.json"
    fj.write_text(json.dumps({"images": [{"filename": "1000092795.jpg", "imgid": 0, "split": "test"}]}))
    [it] = enumerate_inputs(fj, images_root=str(tmp_path / "f"))
    assert it.id == "1000092795" and it.path == str(tmp_path / "f" / "1000092795.jpg")
    _touch(tmp_path / "images" / "000007.jpg")
    cj = tmp_path / "instances.json"
    cj.write_text(json.dumps({"images": [{"id": 7, "file_name": "000007.jpg", "width": 1, "height": 1}],
                              "annotations": []}))
    [it] = enumerate_inputs(cj)                  # resolves under images/ as the shapes world lays it out
    assert it.id == "7" and it.path == str(tmp_path / "images" / "000007.jpg")
    cj.write_text(json.dumps({"images": [{"id": 7, "file_name": "nowhere/000007.jpg"}]}))
    with pytest.raises(InputError, match="--images-root"):
        enumerate_inputs(cj)


def test_shards_partition_the_input():
    from glied.datasets.inputs import InputImage

    items = [InputImage(str(i), f"{i}.jpg") for i in range(1000)]
    parts = [shard(items, i, 4) for i in range(4)]
    assert sorted(it.id for p in parts for it in p) == sorted(it.id for it in items)
    assert all(200 < len(p) < 300 for p in parts)
    assert shard(items[:500], 1, 4) == [it for it in parts[1] if int(it.id) < 500]   # stable as input grows
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)
