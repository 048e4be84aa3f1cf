"""`glied extract` goes on past one bad item: an image the extractor refuses, bad --boxes entries, a FIFO
named x.jpg; file names that are not UTF-8 and non-ASCII ids work through extract and export-features;
.gif files are found in folders. Real subprocesses (the behaviour is the CLI's)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from glied.datasets.bottomup_files import read_tsv
from glied.datasets.cache import FeatureCache

REPO = Path(__file__).resolve().parents[2]
EXT = f"{Path(__file__).with_name('grid_extractor.py')}:make_extractor"


def _glied(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, env=env,
                          timeout=timeout)


def _img(path, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _failures(cache: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (cache / "failures.jsonl").read_text().splitlines())}


def test_bad_items_are_recorded_and_odd_names_work(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        _img(src / f"good_{k}.jpg", seed=k)
    _img(src / "sliver.png", w=4000, h=20)                      # the extractor refuses it
    _img(src / "emoji_😀.png", seed=5)
    _img(src / "ünïcødé_日本.jpg", seed=6)
    _img(src / "anim.gif", seed=7)
    with open(os.path.join(os.fsencode(src), b"caf\xe9.png"), "wb") as f:   # not UTF-8
        Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(f, "PNG")
    os.mkfifo(src / "x.jpg")                                    # would block a reader forever
    out = tmp_path / "c"
    r = _glied("extract", src, "--out", out, "--extractor-module", EXT, "--quiet", "--batch-size", "4")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    c = FeatureCache.open(out)
    ids = set(c.ids())
    assert {"good_0.jpg", "good_1.jpg", "good_2.jpg", "emoji_😀.png", "ünïcødé_日本.jpg", "anim.gif",
            "caf\\xe9.png"} == ids
    fails = _failures(out)
    assert set(fails) == {"sliver.png"}
    assert fails["sliver.png"]["path"] == str(src / "sliver.png") and "too elongated" in \
        fails["sliver.png"]["reason"] and not fails["sliver.png"]["reason"].startswith("image ")
    assert "extracted 7 images" in r.stdout.decode() and "1 failed" in r.stdout.decode()
    # a rerun does not stop at the same image: nothing left to do but the refused one
    r = _glied("extract", src, "--out", out, "--extractor-module", EXT, "--quiet")
    assert r.returncode == 0 and "7 already" in r.stdout.decode() and set(_failures(out)) == {"sliver.png"}
    # non-ASCII ids through export-features and back
    r = _glied("export-features", out, "--out", tmp_path / "x.tsv")
    assert r.returncode == 0, r.stderr.decode()
    rows = dict(read_tsv(str(tmp_path / "x.tsv")))
    assert set(rows) == ids
    np.testing.assert_array_equal(rows["emoji_😀.png"].features, c.regions("emoji_😀.png").features)


def test_bad_given_boxes_are_recorded_per_image(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        _img(src / f"{k}.jpg", seed=k)
    boxes = {"0.jpg": [[1, 1, 20, 20]], "1.jpg": [[1, 1, float("nan"), 20]], "2.jpg": [[-5, 1, 20, 20]],
             "3.jpg": [[1, 2, 3]], "4.jpg": "abc", "5.jpg": [[2, 2, 30, 40], [0, 0, 10, 10]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))              # NaN written as the JSON NaN token
    out = tmp_path / "c"
    r = _glied("extract", src, "--out", out, "--extractor-module", EXT, "--quiet", "--boxes",
               tmp_path / "boxes.json")
    assert r.returncode == 0 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    assert sorted(FeatureCache.open(out).ids()) == ["0.jpg", "5.jpg"]
    fails = _failures(out)
    assert set(fails) == {"1.jpg", "2.jpg", "3.jpg", "4.jpg"}
    assert "NaN" in fails["1.jpg"]["reason"] and "negative" in fails["2.jpg"]["reason"]
    assert all(f["kind"] == "bad_boxes" and f["path"].endswith(i) for i, f in fails.items())
    # a --boxes file that is not boxes at all is one line, exit 2
    (tmp_path / "b2.json").write_text(json.dumps({"annotations": [1, 2]}))
    shutil.rmtree(out)
    r = _glied("extract", src, "--out", out, "--extractor-module", EXT, "--quiet", "--boxes", tmp_path / "b2.json")
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and "annotations[0]" in lines[-1]
    assert "Traceback" not in r.stderr.decode()
