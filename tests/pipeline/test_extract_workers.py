"""`glied extract --workers N`: decoding and the detector's resize in DataLoader worker processes give exactly
the cache of decoding in the main process, bad files included; the prepared-input path equals extract()."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glied.datasets.cache import FeatureCache
from glied.datasets.images import load_image
from glied.pipeline.data import make_shapes_world
from glied.pipeline.extract import extract
from tests.cache_checks import REGION_ARRAYS, assert_same_regions

_spec = importlib.util.spec_from_file_location("grid_extractor", Path(__file__).with_name("grid_extractor.py"))
ge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ge)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 shapes-world images plus a truncated JPEG, a text file named .jpg, a sliver the detector refuses
    and a photo larger than the --max-side used (200); and a small bottom-up detector checkpoint (random weights)."""
    import torch

    from glied.extractors.bottomup.config import BottomUpConfig
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.weights import save_checkpoint

    root = tmp_path_factory.mktemp("workers")
    make_shapes_world(root / "shapes", 8, seed=6, size=96, workers=1)
    folder = root / "photos"
    shutil.copytree(root / "shapes" / "images", folder)
    rng = np.random.default_rng(1)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(b, "JPEG")
    (folder / "truncated.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    (folder / "text.jpg").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (8, 900, 3), dtype=np.uint8)).save(folder / "sliver.png")
    Image.fromarray(rng.integers(0, 255, (150, 260, 3), dtype=np.uint8)).save(folder / "big.png")
    torch.manual_seed(0)
    save_checkpoint(root / "det.pt", BottomUpDetector(BottomUpConfig.small()))
    return {"folder": folder, "det": root / "det.pt"}


def _entries(path: Path) -> dict:
    c = FeatureCache.open(path)
    out = {}
    for i in c.ids():
        r, w = c.regions(i), c.attributes(i)
        out[i] = ([getattr(r, f).tobytes() for f in REGION_ARRAYS], (r.image_w, r.image_h),
                  None if w is None else (w.word_ids.tobytes(), w.probs.tobytes()))
    return out


def _failures(path: Path) -> list:
    return sorted(map(json.loads, (path / "failures.jsonl").read_text().splitlines()), key=lambda f: f["id"])


def test_worker_processes_give_the_same_cache_as_none(photos, tmp_path, one_thread, capsys):
    from glied.extractors.bottomup import load_region_extractor

    ext = load_region_extractor(str(photos["det"]), device="cpu", precision="fp32")
    words = ge.WordExtractor(top_k=3)
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        s = extract(str(photos["folder"]), str(out), region_extractor=ext, attribute_extractor=words, top_k=3,
                    max_side=200, batch_size=3, workers=workers, progress=False)
        assert (s.total, s.extracted, s.failed) == (12, 9, 3)
        runs[workers] = (_entries(out), _failures(out))
    assert runs[0] == runs[2]
    fails = {f["id"]: (f["kind"], f["reason"]) for f in runs[2][1]}
    assert fails["truncated.jpg"][0] == "truncated" and fails["text.jpg"][0] == "not_image"
    assert fails["sliver.png"][0] == "extractor" and fails["sliver.png"][1].startswith("200x2 is too elongated")
    err = capsys.readouterr().err
    assert sum(line.startswith("skipped ") for line in err.splitlines()) == 6     # each failure once per run
    big = FeatureCache.open(tmp_path / "w2").regions("big.png")
    assert (big.image_w, big.image_h) == (260, 150)           # decoded at 200 px, recorded at its own size


def test_prepared_inputs_equal_plain_extract(photos, one_thread):
    from glied.extractors.bottomup import load_region_extractor

    ext = load_region_extractor(str(photos["det"]), device="cpu", precision="fp32")
    prepare = ext.input_preparer()
    for name in ("000000.jpg", "000003.jpg", "big.png"):
        im = load_image(photos["folder"] / name)
        a, b = ext.extract([im])[0], ext.extract_prepared([prepare(im, "image 0")])[0]
        assert_same_regions(a, b, name)


@pytest.mark.gpu
def test_pinned_workers_on_cuda_equal_no_workers(photos, tmp_path):
    from glied.extractors.bottomup import load_region_extractor

    ext = load_region_extractor(str(photos["det"]), device="cuda", precision="fp32")
    for workers in (0, 2):
        extract(str(photos["folder"]), str(tmp_path / f"w{workers}"), region_extractor=ext, max_side=200,
                batch_size=1, workers=workers, progress=False)
    assert _entries(tmp_path / "w0") == _entries(tmp_path / "w2")
