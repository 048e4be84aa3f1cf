"""`glied bundle` + `glied caption` end to end on a tiny shapes world (tiny, briefly trained real models).

What is checked is behaviour, not quality: every stage runs for real, the bundle refuses damage and
mismatched parts, the CLI prints captions / JSON, draws a non-blank picture, and a bad photo among good ones
gives one error line and a non-zero exit while the others are still captioned.
"""
import json
import shutil
import subprocess
import sys

import cv2
import pytest

from glied.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The tiny really-trained bundle (tests/pipeline/conftest.py), shared with the serve tests."""
    return tiny_bundle


def run(*args):
    return subprocess.run([sys.executable, "-m", "glied", *args], capture_output=True, text=True)


def test_caption_text_json_and_picture(bundle, tmp_path):
    photo = bundle["world"] / "images" / "000001.jpg"
    r = run("caption", str(photo), "--model", str(bundle["bundle"]), "--show", str(tmp_path / "seen.png"),
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    caption = r.stdout.strip()
    assert caption and "\n" not in caption
    pic = cv2.imread(str(tmp_path / "seen.png"))
    assert pic is not None and pic.shape[1] >= 512 and pic.shape[0] >= 400 and pic.std() > 20
    r = run("caption", str(photo), str(bundle["world"] / "images" / "000002.jpg"), "--model", str(bundle["bundle"]),
            "--json", "--beam", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(isinstance(x["caption"], str) for x in rows)
    assert rows[0]["regions"] and rows[0]["attribute_words"]
    assert {"box", "object", "score"} <= set(rows[0]["regions"][0])


def test_bad_photo_among_good_ones(bundle, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    good = bundle["world"] / "images" / "000003.jpg"
    r = run("caption", str(bad), str(good), str(tmp_path / "missing.jpg"), "--model", str(bundle["bundle"]))
    assert r.returncode == 2
    assert str(good) in r.stdout  # the good photo is still captioned
    errs = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert any("broken.jpg" in e for e in errs) and any("missing.jpg" in e for e in errs)
    assert "Traceback" not in r.stderr


def test_photo_without_regions_or_too_elongated_among_good_ones(bundle, tmp_path):
    """One photo the detector cannot take and one where it finds no region: each gets its own error, the
    rest of the batch is captioned."""
    import numpy as np

    from glied.pipeline.caption import Captioner
    from glied.records import RegionFeatures

    c = Captioner.from_bundle(bundle["bundle"])
    real = c.region_extractor.extract

    def extract(images):                          # no region in a photo 99 pixels wide
        regs = real(images)
        return [RegionFeatures(r.boxes[:0], r.features[:0], r.obj_ids[:0], r.obj_scores[:0], r.attr_ids[:0],
                               r.attr_scores[:0], r.image_w, r.image_h) if im.shape[1] == 99 else r
                for r, im in zip(regs, images)]

    c.region_extractor.extract = extract
    empty, sliver = tmp_path / "empty.png", tmp_path / "sliver.png"
    cv2.imwrite(str(empty), cv2.resize(cv2.imread(str(bundle["world"] / "images" / "000004.jpg")), (99, 80)))
    cv2.imwrite(str(sliver), np.full((20, 4000, 3), 128, np.uint8))
    good = [str(bundle["world"] / "images" / f"00000{k}.jpg") for k in (5, 6)]
    res = c.caption_files([good[0], str(empty), str(sliver), good[1]], batch_size=4)
    assert [r.path for r in res] == [good[0], str(empty), str(sliver), good[1]]
    assert res[0].caption and res[3].caption and not res[0].error and not res[3].error
    assert res[1].error == "the detector found no region in the photo"
    assert "too elongated" in res[2].error
    alone = c.caption_files(good, batch_size=2)
    assert [r.caption for r in alone] == [res[0].caption, res[3].caption]


def test_damaged_or_incomplete_bundle_is_refused(bundle, tmp_path):
    from glied.pipeline.caption import Captioner

    copy = tmp_path / "b"
    shutil.copytree(bundle["bundle"], copy)
    with open(copy / "decoder.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match="damaged"):
        Captioner.from_bundle(copy)
    (copy / "attributes.pt").unlink()
    with pytest.raises(InputError, match="missing"):
        Captioner.from_bundle(copy)
    meta = json.loads((bundle["bundle"] / "bundle.json").read_text())
    shutil.rmtree(copy)
    shutil.copytree(bundle["bundle"], copy)
    meta["version"] = 99
    (copy / "bundle.json").write_text(json.dumps(meta))
    r = run("caption", str(bundle["world"] / "images" / "000001.jpg"), "--model", str(copy))
    assert r.returncode == 2 and "version 99" in r.stderr and r.stderr.count("\n") == 1


def test_bundle_refuses_parts_that_do_not_belong_together(bundle, tmp_path):
    from glied.pipeline.attributes import train_attributes
    from glied.pipeline.caption import build_bundle

    root = bundle["root"]
    train_attributes(root / "prep", tmp_path / "mil2", epochs=1, seed=1, log=lambda s: None)
    with pytest.raises(ConfigError, match="trained on features"):
        build_bundle(tmp_path / "mixed", detector=str(root / "det" / "checkpoint.pt"), attributes=str(tmp_path / "mil2"),
                     decoder=str(root / "dec"))
    assert not (tmp_path / "mixed").exists()
