"""import-features / export-features: bottom-up TSV (built exactly as generate_tsv.py writes it), multipart
TSV, LXMERT TSV, MILVLG and ImageCaptioning per-image npz."""
from __future__ import annotations

import base64
import csv
import sys

import numpy as np
import pytest

from glied.datasets.cache import FeatureCache
from glied.errors import InputError
from glied.pipeline.features_io import export_tsv, import_features

FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


def _rows(rng, n, start=0, d=2048):
    out = []
    for k in range(n):
        nb = int(rng.integers(10, 40))
        out.append({"image_id": 391895 + start + k, "image_w": 640, "image_h": 480, "num_boxes": nb,
                    "boxes": rng.random((nb, 4), dtype=np.float32) * 400,
                    "features": rng.random((nb, d), dtype=np.float32) * 5})
    return out


def _write_generate_tsv(path, rows):
    """The writer of bottom-up-attention/tools/generate_tsv.py: DictWriter, tab, default dialect (\\r\\n)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, delimiter="\t", fieldnames=FIELDS)
        for r in rows:
            w.writerow(dict(r, boxes=base64.b64encode(r["boxes"].tobytes()).decode("ascii"),
                            features=base64.b64encode(r["features"].tobytes()).decode("ascii")))


def test_tsv_round_trip_is_byte_identical(tmp_path):
    rows = _rows(np.random.default_rng(0), 5)
    src = tmp_path / "karpathy_test_resnet101_faster_rcnn_genome.tsv"
    _write_generate_tsv(src, rows)
    assert b"\r\n" in src.read_bytes()
    assert import_features([str(src)], str(tmp_path / "c")) == 5
    c = FeatureCache.open(tmp_path / "c")
    assert c.manifest["extractor"]["feature_dim"] == 2048 and c.manifest["dtype"] == "float32"
    for r in rows:
        got = c.regions(str(r["image_id"]))
        np.testing.assert_array_equal(got.features, r["features"])
        np.testing.assert_array_equal(got.boxes, r["boxes"])
        assert (got.image_w, got.image_h) == (640, 480) and (got.obj_ids == -1).all()
    assert export_tsv(str(tmp_path / "c"), str(tmp_path / "back.tsv")) == 5
    assert (tmp_path / "back.tsv").read_bytes() == src.read_bytes()
    assert import_features([str(src)], str(tmp_path / "c")) == 0        # re-run: nothing new


def test_multipart_tsv_and_float16(tmp_path):
    rng = np.random.default_rng(1)
    rows = _rows(rng, 3, 0, d=64) + _rows(rng, 2, 100, d=64)
    _write_generate_tsv(tmp_path / "f.tsv.0", rows[:3])
    _write_generate_tsv(tmp_path / "f.tsv.1", rows[3:])
    assert import_features([str(tmp_path / "f.tsv")], str(tmp_path / "c"), dtype="float16", name="butd") == 5
    c = FeatureCache.open(tmp_path / "c")
    assert c.manifest["extractor"]["name"] == "butd" and len(c) == 5
    np.testing.assert_array_equal(c.regions(str(rows[4]["image_id"])).features,
                                  rows[4]["features"].astype(np.float16))
    with pytest.raises(InputError, match="no such TSV"):
        import_features([str(tmp_path / "g.tsv")], str(tmp_path / "d"))


def test_lxmert_tsv_and_wrong_field_count(tmp_path):
    n = 3
    row = ["77", "480", "640", base64.b64encode(np.arange(n, dtype=np.int64).tobytes()).decode(),
           base64.b64encode(np.full(n, 0.5, np.float32).tobytes()).decode(),
           base64.b64encode(np.arange(n, dtype=np.int64).tobytes()).decode(),
           base64.b64encode(np.full(n, 0.25, np.float32).tobytes()).decode(), str(n),
           base64.b64encode(np.ones((n, 4), np.float32).tobytes()).decode(),
           base64.b64encode(np.ones((n, 8), np.float32).tobytes()).decode()]
    (tmp_path / "lx.tsv").write_text("\t".join(row) + "\n")
    import_features([str(tmp_path / "lx.tsv")], str(tmp_path / "c"))
    r = FeatureCache.open(tmp_path / "c").regions("77")
    assert (r.image_w, r.image_h) == (640, 480) and r.obj_ids.tolist() == [0, 1, 2]
    assert r.attr_scores.tolist() == [0.25] * 3
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(InputError, match="3 tab-separated fields"):
        import_features([str(tmp_path / "bad.tsv")], str(tmp_path / "d"))


def test_npz_layouts_never_unpickle(tmp_path):
    rng = np.random.default_rng(2)
    mil = tmp_path / "milvlg"
    mil.mkdir()
    x = rng.random((12, 32), dtype=np.float32)
    bbox = rng.random((12, 4), dtype=np.float32) * 100
    np.savez_compressed(mil / "391895.npz", x=x, bbox=bbox, num_bbox=12, image_h=480, image_w=640,
                        info=np.array({"objects_id": [1, 2]}, dtype=object))
    import_features([str(mil)], str(tmp_path / "c1"))
    r = FeatureCache.open(tmp_path / "c1").regions("391895")
    np.testing.assert_array_equal(r.features, x)
    np.testing.assert_array_equal(r.boxes, bbox)
    assert (r.image_w, r.image_h) == (640, 480)
    ic, boxes = tmp_path / "cocobu_att", tmp_path / "cocobu_box"
    ic.mkdir()
    boxes.mkdir()
    for k in (1, 2):
        np.savez_compressed(ic / f"{k}.npz", feat=rng.random((5, 16), dtype=np.float32))
    np.save(boxes / "1.npy", np.ones((5, 4), np.float32))
    import_features([str(ic)], str(tmp_path / "c2"), box_dir=str(boxes))
    c = FeatureCache.open(tmp_path / "c2")
    assert (c.regions("1").boxes == 1).all() and np.isnan(c.regions("2").boxes).all()
    assert (c.regions("1").image_w, c.regions("1").image_h) == (0, 0)          # unknown size
