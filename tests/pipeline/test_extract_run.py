"""`glied extract` end to end with a real (small) torch extractor: the shapes world plus a folder of bad
files, resume, shards + merge, given boxes, identity mismatch, CLI errors."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from glied.datasets.cache import FeatureCache
from glied.datasets.images import load_image
from glied.errors import ConfigError
from glied.pipeline.data import make_shapes_world
from glied.pipeline.extract import extract
from glied.pipeline.features_io import merge_caches
from tests.cache_checks import assert_same_cache

_spec = importlib.util.spec_from_file_location("grid_extractor",
                                               Path(__file__).with_name("grid_extractor.py"))
ge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ge)
FACTORY = f"{Path(__file__).with_name('grid_extractor.py')}:make_extractor"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_shapes_world(root / "shapes", 10, seed=3, size=96, workers=1)
    return root / "shapes"


def _bad_folder(world: Path, dst: Path) -> dict[str, str]:
    """Copy the shapes images and add one file of each awkward kind; returns {id: expected failure kind}."""
    shutil.copytree(world / "images", dst)
    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(b, "JPEG")
    (dst / "bad").mkdir()
    (dst / "bad" / "truncated.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    (dst / "bad" / "empty.jpg").write_bytes(b"")
    (dst / "bad" / "text.jpg").write_text("hello, not an image")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(dst / "bad" / "tiny.png")
    odd = dst / "odd"
    odd.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.jpg")
    cv2.imwrite(str(odd / "grey16.png"), (rng.random((50, 70)) * 65535).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(odd / "rotated.jpg", exif=exif)
    big = cv2.resize(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8), (3000, 2000))
    cv2.imwrite(str(odd / "huge.jpg"), big)
    rgba = rng.integers(0, 255, (30, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(odd / "rgba.png")
    return {"bad/truncated.jpg": "truncated", "bad/empty.jpg": "empty", "bad/text.jpg": "not_image",
            "bad/tiny.png": "too_small"}


def test_shapes_world_and_bad_files(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    expected_fail = _bad_folder(world, folder)
    out = tmp_path / "cache"
    ext, words = ge.GridRegionExtractor(), ge.WordExtractor(top_k=3)
    s = extract(str(folder), str(out), region_extractor=ext, attribute_extractor=words, top_k=3,
                max_side=1000, batch_size=3, workers=2, progress=False)
    assert (s.total, s.extracted, s.failed, s.already) == (19, 15, 4, 0)
    err = capsys.readouterr().err
    fails = [json.loads(x) for x in open(s.failures_path)]
    assert {f["id"]: f["kind"] for f in fails} == expected_fail
    assert all(f["path"].startswith(str(folder)) and f["reason"] for f in fails)
    assert sum(1 for line in err.splitlines() if line.startswith("skipped ")) == 4
    c = FeatureCache.open(out)
    attrs = c.manifest["attributes"]
    assert attrs["vocab"] == ge.WordExtractor.vocab and attrs["top_k"] == 3
    # normal images: the stored entry is the extractor's output on the decoded image, in float16
    for i in ("000000.jpg", "000004.jpg", "odd/cmyk.jpg", "odd/grey16.png", "odd/rgba.png"):
        ref = ext.extract([load_image(folder / i)])[0]
        got = c.regions(i)
        np.testing.assert_array_equal(got.features, ref.features.astype(np.float16))
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        assert len(c.attributes(i)) == 3 and c.attributes(i).word_map is None     # maps dropped by default
    # huge: decoded at <= 1000 px, boxes and size mapped back to original pixels
    h = c.regions("odd/huge.jpg")
    assert (h.image_w, h.image_h) == (3000, 2000)
    np.testing.assert_allclose(h.boxes[0], [0, 0, 3000, 2000], atol=1e-3)
    r = c.regions("odd/rotated.jpg")
    assert (r.image_w, r.image_h) == (40, 80)          # EXIF orientation 6: portrait
    # resume: nothing left to do except retrying the failures
    s2 = extract(str(folder), str(out), region_extractor=ext, attribute_extractor=words, top_k=3,
                 max_side=1000, progress=False)
    assert (s2.already, s2.extracted, s2.failed) == (15, 0, 4)
    # another extractor identity into the same cache is refused, saying what differs
    with pytest.raises(ConfigError, match=r"extractor.config.grid: cache has 3, expected 4"):
        extract(str(folder), str(out), region_extractor=ge.GridRegionExtractor(grid=4),
                attribute_extractor=words, top_k=3, progress=False)
    assert len(FeatureCache.open(out)) == 15


def test_max_side_is_validated_and_part_of_the_identity(world, tmp_path):
    ext = ge.GridRegionExtractor()
    cj = str(world / "captions.json")
    for bad in (-5, 3, 1.5):
        with pytest.raises(ConfigError, match=rf"--max-side {bad}: expected a whole number of pixels"):
            extract(cj, str(tmp_path / "c"), region_extractor=ext, max_side=bad, progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()
    extract(cj, str(tmp_path / "c"), region_extractor=ext, max_side=64, progress=False, workers=0)
    assert FeatureCache.open(tmp_path / "c").manifest["extractor"]["max_side"] == 64
    with pytest.raises(ConfigError, match="extractor.max_side: cache has 64, expected 2000"):
        extract(cj, str(tmp_path / "c"), region_extractor=ext, progress=False)
    extract(cj, str(tmp_path / "n"), region_extractor=ext, max_side=0, progress=False, workers=0)
    assert FeatureCache.open(tmp_path / "n").manifest["extractor"]["max_side"] is None
    r = subprocess.run([sys.executable, "-m", "glied", "extract", cj, "--out", str(tmp_path / "x"),
                        "--extractor-module", FACTORY, "--max-side", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --max-side -1: expected a whole number")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_shards_merge_equal_single_run(world, tmp_path):
    ext = ge.GridRegionExtractor()
    cj = str(world / "captions.json")
    extract(cj, str(tmp_path / "all"), region_extractor=ext, progress=False, workers=0)
    for i in range(2):
        extract(cj, str(tmp_path / f"s{i}"), region_extractor=ext, shard=(i, 2), progress=False)
    n, dup = merge_caches(str(tmp_path / "m"), [str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert (n, dup) == (10, 0)
    assert 0 < len(FeatureCache.open(tmp_path / "s0")) < 10
    full = FeatureCache.open(tmp_path / "all")
    assert sorted(full.ids()) == sorted(str(i) for i in range(10))        # Karpathy json: ids are cocoids
    assert_same_cache(full, FeatureCache.open(tmp_path / "m"))
    extract(cj, str(tmp_path / "other"), region_extractor=ge.GridRegionExtractor(dim=8), progress=False)
    with pytest.raises(ConfigError, match="feature_dim"):
        merge_caches(str(tmp_path / "m2"), [str(tmp_path / "s0"), str(tmp_path / "other")])


def test_given_boxes(world, tmp_path):
    inst = json.loads((world / "instances.json").read_text())
    s = extract(str(world / "instances.json"), str(tmp_path / "c"), region_extractor=ge.GridRegionExtractor(),
                boxes=str(world / "instances.json"), progress=False)
    with_boxes = {str(a["image_id"]) for a in inst["annotations"]}
    assert s.extracted == len(with_boxes) and s.failed == 10 - len(with_boxes)
    c = FeatureCache.open(tmp_path / "c")
    assert c.manifest["extractor"]["boxes"] == "given"
    a = inst["annotations"][0]
    x, y, w, h = a["bbox"]
    got = c.regions(str(a["image_id"]))
    assert np.isclose(got.boxes, [x, y, x + w, y + h]).all(1).any()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from glied.cli import main

    (tmp_path / "p").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "p" / "a.png")
    for argv, msg in [(["extract", str(tmp_path / "p"), "--out", str(tmp_path / "c"), "--device", "cpu"],
                       "needs --detector"),
                      (["extract", str(tmp_path / "p"), "--out", str(tmp_path / "c"), "--extractor-module",
                        "no_such_module_xyz:f", "--device", "cpu"], "cannot import"),
                      (["export-features", str(tmp_path / "p"), "--out", str(tmp_path / "x.tsv")],
                       "not a glied feature cache")]:
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err
    assert not os.path.exists(tmp_path / "c" / "manifest.json")


def test_real_bottomup_small_detector(world, tmp_path):
    """`glied extract --detector CKPT` through glied.extractors.bottomup (small preset, random weights)."""
    import torch

    from glied.extractors.bottomup import load_region_extractor
    from glied.extractors.bottomup.config import BottomUpConfig
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.weights import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "det.pt", BottomUpDetector(BottomUpConfig.small()))
    ext = load_region_extractor(str(tmp_path / "det.pt"), device="cpu")
    lst = tmp_path / "two.txt"
    lst.write_text("000000.jpg\n000001.jpg\n")
    s = extract(str(lst), str(tmp_path / "c"), region_extractor=ext, images_root=str(world / "images"),
                progress=False)
    assert (s.extracted, s.failed) == (2, 0)
    c = FeatureCache.open(tmp_path / "c")
    assert c.manifest["extractor"] == dict(json.loads(json.dumps(ext.identity())), max_side=2000)
    r = c.regions("000001.jpg")
    assert r.features.shape[1] == ext.identity()["feature_dim"] and (r.image_w, r.image_h) == (96, 96)
    assert (r.boxes >= 0).all() and (r.boxes <= 96).all()
