"""Feature cache: round trip, identity checks, missing ids, torn-tail repair, locking, roll-over,
checksums."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from glied.datasets import cache_store as cs
from glied.datasets.cache import CacheWriter, FeatureCache, make_manifest
from glied.errors import ConfigError, GliedError, InputError
from glied.records import AttributeWords, RegionFeatures

IDENT = {"name": "unit", "config": {"k": 1}, "weights_fingerprint": "abc", "feature_dim": 16}


def _regions(rng, n, d=16, w=100, h=80) -> RegionFeatures:
    return RegionFeatures(boxes=rng.random((n, 4), dtype=np.float32) * 50,
                          features=rng.standard_normal((n, d)).astype(np.float32),
                          obj_ids=rng.integers(0, 10, n), obj_scores=rng.random(n, dtype=np.float32),
                          attr_ids=rng.integers(0, 5, n), attr_scores=rng.random(n, dtype=np.float32),
                          image_w=w, image_h=h)


def _same(a: RegionFeatures, b: RegionFeatures, dtype=np.float32) -> None:
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(np.asarray(a.features).astype(dtype), b.features)
    for f in ("obj_ids", "obj_scores", "attr_ids", "attr_scores"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert (a.image_w, a.image_h) == (b.image_w, b.image_h)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_with_attributes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    attrs = {"name": "w", "config": {}, "weights_fingerprint": "x", "vocab": ["red", "blue", "big"],
             "top_k": 2}
    m = make_manifest(IDENT, dtype, attrs)
    data = {f"img/{i}.jpg": _regions(rng, int(rng.integers(0, 12))) for i in range(30)}
    words = AttributeWords(word_ids=np.array([2, 0]), probs=np.array([0.9, 0.4], np.float32),
                           word_map=np.ones((3, 2, 2), np.float32))
    with CacheWriter(tmp_path / "c", m, commit_every=7) as w:
        for k, r in data.items():
            w.put(k, r, words)
    c = FeatureCache.open(tmp_path / "c")
    assert c.ids() == list(data) and len(c) == 30 and "img/3.jpg" in c and "nope" not in c
    assert c.manifest["dtype"] == dtype and c.attribute_vocab == ["red", "blue", "big"]
    for k, r in data.items():
        got = c.regions(k)
        assert got.features.dtype == np.dtype(dtype) and got.obj_ids.dtype == np.int64
        _same(r, got, np.dtype(dtype))
        a = c.attributes(k)
        np.testing.assert_array_equal(a.word_ids, [2, 0])
        assert a.word_map.shape == (3, 2, 2)
    assert c.verify() == []
    # a pickled (DataLoader worker) copy reads the same
    c2 = pickle.loads(pickle.dumps(c))
    _same(data["img/5.jpg"], c2.regions("img/5.jpg"), np.dtype(dtype))


def test_missing_id_and_not_a_cache(tmp_path):
    with CacheWriter(tmp_path / "c", make_manifest(IDENT)) as w:
        w.put("1", _regions(np.random.default_rng(1), 3))
    c = FeatureCache.open(tmp_path / "c")
    with pytest.raises(InputError, match=r"'42' is not in feature cache .*c"):
        c.regions("42")
    assert c.attributes("1") is None
    with pytest.raises(InputError, match="not a glied feature cache"):
        FeatureCache.open(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        FeatureCache.open(tmp_path / "nothing")


def test_identity_mismatch_names_what_differs(tmp_path):
    with CacheWriter(tmp_path / "c", make_manifest(IDENT, "float16")) as w:
        w.put("1", _regions(np.random.default_rng(1), 3))
    other = dict(IDENT, weights_fingerprint="zzz", config={"k": 2})
    with pytest.raises(ConfigError) as ei:
        CacheWriter(tmp_path / "c", make_manifest(other, "float16"))
    msg = str(ei.value)
    assert "extractor.weights_fingerprint" in msg and "extractor.config.k" in msg and "float16" not in msg
    with pytest.raises(ConfigError, match="dtype"):
        CacheWriter(tmp_path / "c", make_manifest(IDENT, "float32"))
    c = FeatureCache.open(tmp_path / "c")
    c.check_compatible({"extractor": IDENT})               # same: no error
    with pytest.raises(ConfigError, match=r"attributes: .*expected .*vocab"):
        c.check_compatible({"extractor": IDENT, "attributes": {"vocab": ["a"], "top_k": 1}})
    # the existing cache is untouched by the refused writers
    assert FeatureCache.open(tmp_path / "c").ids() == ["1"]


def test_torn_tail_detected_and_repaired(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "c"
    data = {str(i): _regions(rng, 5) for i in range(10)}
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:
        for k in list(data)[:6]:
            w.put(k, data[k])
    idx, dat = root / cs.INDEX_NAME, root / cs.data_file_name(0)
    good_index, good_data = idx.stat().st_size, dat.stat().st_size
    # simulate a crash: data of an uncommitted entry written, then a half-written index line
    with open(dat, "ab") as f:
        f.write(os.urandom(1000))
    line = open(idx, "rb").read().splitlines(keepends=True)[-1]
    with open(idx, "ab") as f:
        f.write(line[: len(line) // 2])
    r = FeatureCache.open(root)                           # a reader sees only the committed entries
    assert r.ids() == list(data)[:6]
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:
        assert w.recovered_bytes == len(line) // 2
        assert idx.stat().st_size == good_index and dat.stat().st_size == good_data
        for k in list(data)[6:]:
            w.put(k, data[k])
    c = FeatureCache.open(root)
    assert c.ids() == list(data) and c.verify() == []
    for k, r in data.items():
        _same(r, c.regions(k))
    # a corrupted (not torn) last line is also refused by its checksum
    raw = bytearray(idx.read_bytes())
    raw[-5] = ord("0") if raw[-5] != ord("0") else ord("1")
    idx.write_bytes(bytes(raw))
    assert FeatureCache.open(root).ids() == list(data)[:-1]


def test_verify_detects_flipped_data_byte(tmp_path):
    with CacheWriter(tmp_path / "c", make_manifest(IDENT, "float32")) as w:
        for i in range(3):
            w.put(str(i), _regions(np.random.default_rng(i), 4))
    p = tmp_path / "c" / cs.data_file_name(0)
    raw = bytearray(p.read_bytes())
    raw[200] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert FeatureCache.open(tmp_path / "c").verify() == ["0"]


def test_lock_rollover_duplicates_and_refresh(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "c"
    w = CacheWriter(root, make_manifest(IDENT, "float32"), commit_every=2, max_file_bytes=4096)
    with pytest.raises(GliedError, match="another process"):
        CacheWriter(root, make_manifest(IDENT, "float32"))
    data = {str(i): _regions(rng, 10) for i in range(12)}      # ~1 KiB each -> several data files
    for k, r in data.items():
        w.put(k, r)
    with pytest.raises(ValueError, match="already"):
        w.put("3", data["3"])
    reader = FeatureCache.open(root)
    n0 = len(reader)
    assert n0 >= 10                                          # committed every 2 puts
    w.close()
    reader.refresh()
    assert len(reader) == 12 and n0 <= 12
    assert len(os.listdir(root / cs.DATA_DIR)) >= 3
    for k, r in data.items():
        _same(r, reader.regions(k))
    with pytest.raises(ValueError, match=r"\(R, 16\)"):
        with CacheWriter(root, make_manifest(IDENT, "float32")) as w2:
            w2.put("x", _regions(rng, 2, d=8))


def test_padded_batch(tmp_path):
    rng = np.random.default_rng(4)
    attrs = {"name": "w", "config": {}, "weights_fingerprint": "x", "vocab": ["a", "b", "c"], "top_k": 3}
    data = {str(i): _regions(rng, n, w=10 + i) for i, n in enumerate([3, 7, 0])}
    with CacheWriter(tmp_path / "c", make_manifest(IDENT, "float16", attrs)) as w:
        for k, r in data.items():
            w.put(k, r, AttributeWords(word_ids=np.arange(int(k) + 1), probs=np.ones(int(k) + 1, np.float32)))
    b = FeatureCache.open(tmp_path / "c").batch(["1", "0", "2"])
    assert b["features"].shape == (3, 7, 16) and b["features"].dtype == np.float16
    np.testing.assert_array_equal(b["features"][1, :3], data["0"].features.astype(np.float16))
    assert (b["features"][1, 3:] == 0).all() and b["mask"].sum(1).tolist() == [7, 3, 0]
    np.testing.assert_array_equal(b["boxes"][0], data["1"].boxes)
    assert b["image_wh"][:, 0].tolist() == [11, 10, 12]
    assert b["word_ids"].tolist() == [[0, 1, -1], [0, -1, -1], [0, 1, 2]]
