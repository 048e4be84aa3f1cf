"""One resume rule for the three training loops, through the real CLI in subprocesses: `--resume` restores the
run's stored settings (flags left out are NOT the defaults), a conflicting flag is refused with one line naming
it, and the epoch count may be raised to train longer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glied.pipeline.data import make_shapes_world, prepare_captions

GRID = f"{Path(__file__).with_name('grid_extractor.py')}:make_extractor"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def glied(*args):
    return subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, text=True, env=ENV)


def refused(r, flag_and_value, stored, where):
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert line.startswith("error: ") and where in line, line
    assert f"{flag_and_value} conflicts with the run's stored {stored}; drop the flag or start a new run" in line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_shapes_world(root / "w", 24, seed=2, size=64, workers=1)
    prepare_captions(root / "w" / "captions.json", root / "p")
    return root


def test_detector_resume(world):
    run = world / "det"
    common = ("train-detector", "--annotations", world / "w" / "instances.json", "--images", world / "w" / "images",
              "--out", run, "--max-images", 4, "--batch-size", 2, "--threads", 1, "--input-size", 64)
    r = glied(*common, "--epochs", 1, "--lr", "0.001")
    assert r.returncode == 0, r.stderr
    refused(glied(*common, "--resume", "--lr", "0.01"), "--lr 0.01", "0.001", str(run / "checkpoint.pt"))
    refused(glied(*common, "--resume", "--batch-size", 4), "--batch-size 4", "2", "checkpoint.pt")
    r = glied(*common, "--resume", "--epochs", 2)
    assert r.returncode == 0, r.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["extra"]["epoch"] == 2 and state["extra"]["train_config"]["lr"] == 0.001


def test_attributes_resume(world):
    run = world / "mil"
    common = ("train-attributes", "--data", world / "p", "--out", run, "--threads", 1, "--batch-size", 8)
    r = glied(*common, "--epochs", 1, "--lr", "0.005", "--vocab-size", 30)
    assert r.returncode == 0, r.stderr
    refused(glied(*common, "--resume", "--lr", "0.01"), "--lr 0.01", "0.005", str(run / "last.pt"))
    refused(glied(*common, "--resume", "--vocab-size", 40), "--vocab-size 40", "30", "last.pt")
    # --lr and --vocab-size left out: the run's own 0.005 and 30, not the defaults
    r = glied(*common, "--resume", "--epochs", 2)
    assert r.returncode == 0, r.stderr
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["train_config"]["lr"] == 0.005 and len(ck["vocab"]) <= 30


def test_decoder_resume(world):
    from glied.pipeline.extract import extract

    spec_dir = str(Path(__file__).parent)
    sys.path.insert(0, spec_dir)
    try:
        import grid_extractor
    finally:
        sys.path.remove(spec_dir)
    extract(str(world / "w" / "captions.json"), str(world / "cache"),
            region_extractor=grid_extractor.GridRegionExtractor(), attribute_extractor=grid_extractor.WordExtractor(),
            images_root=str(world / "w"), progress=False, workers=0)
    run = world / "dec"
    common = ("train", "--data", world / "p", "--features", world / "cache", "--out", run)
    r = glied(*common, "--stage", "xe", "--epochs", 1, "--d-model", 32, "--d-embed", 16, "--heads", 4,
              "--batch-size", 8, "--lr", "0.002")
    assert r.returncode == 0, r.stderr
    refused(glied(*common, "--resume", "--lr", "0.01"), "--lr 0.01", "0.002", str(run / "last.pt"))
    refused(glied(*common, "--resume", "--heads", 8), "--heads 8", "4", "last.pt")
    r = glied(*common, "--resume", "--epochs", 2)
    assert r.returncode == 0, r.stderr
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["progress"]["xe_done"] == 2 and ck["train_config"]["lr"] == 0.002
    assert ck["train_config"]["d_model"] == 32 and ck["train_config"]["stage"] == "xe"
    assert json.loads((run / "train_config.json").read_text())["train"]["n_heads"] == 4
