"""`glied extract` under torchrun: two CPU processes (gloo) each extract their shard into a rank cache, rank 0
merges them; the result equals a single-process extraction, and an interrupted run is resumed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glied.datasets.cache import FeatureCache
from glied.datasets.inputs import enumerate_inputs, shard
from glied.pipeline.data import make_shapes_world
from glied.pipeline.extract import extract
from glied.pipeline.extract_ranks import rank_cache
from tests.cache_checks import assert_same_cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A shapes world of 8 images and a small bottom-up detector checkpoint (random weights)."""
    import torch

    from glied.extractors.bottomup.config import BottomUpConfig
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.weights import save_checkpoint

    root = tmp_path_factory.mktemp("torchrun")
    make_shapes_world(root / "shapes", 8, seed=4, size=96, workers=1)
    torch.manual_seed(0)
    save_checkpoint(root / "det.pt", BottomUpDetector(BottomUpConfig.small()))
    return root


def _subset(world: Path, dst: Path, keep) -> str:
    """A copy of the world's Karpathy json (written beside it) with only the images whose id is in ``keep``."""
    d = json.loads((world / "captions.json").read_text())
    d["images"] = [im for im in d["images"] if str(im["cocoid"]) in keep]
    dst.write_text(json.dumps(d))
    return str(dst)


def test_two_gloo_ranks_merge_to_the_single_process_cache_and_resume(setup, tmp_path, one_thread):
    """Bit-equal to a single-process run: one image per forward and one thread on both sides (a batch's RoI
    head runs over the RoIs of all its images, whose grouping changes float rounding by ~1e-7)."""
    from glied.extractors.bottomup import load_region_extractor

    det = setup / "det.pt"
    world = tmp_path / "world"                  # a copy with one truncated JPEG: failures are merged too
    shutil.copytree(setup / "shapes", world)
    items = enumerate_inputs(str(world / "captions.json"))
    bad = items[5]
    data = Path(bad.path).read_bytes()
    Path(bad.path).write_bytes(data[: len(data) // 2])
    cj = str(world / "captions.json")
    ext = load_region_extractor(str(det), device="cpu", precision="fp32")
    extract(cj, str(tmp_path / "single"), region_extractor=ext, workers=0, batch_size=1, progress=False)
    ref = FeatureCache.open(tmp_path / "single")
    ids = sorted(ref.ids())
    assert len(ids) == 7 and bad.id not in ids and all(len(ref.regions(i)) > 0 for i in ids)
    # an interrupted earlier run: two ids already merged into OUT, and rank 1 had committed one id of its shard
    out = tmp_path / "out"
    merged = set(ids[:2])
    extract(_subset(world, world / "merged.json", merged), str(out), region_extractor=ext, workers=0,
            batch_size=1, progress=False)
    r1 = [it.id for it in shard(items, 1, 2) if it.id not in merged and it.id != bad.id]
    assert r1 and shard(items, 0, 2)
    extract(_subset(world, world / "r1.json", {r1[0]}), rank_cache(str(out), 1, 2), region_extractor=ext,
            shard=(1, 2), workers=0, batch_size=1, progress=False)

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "glied", "extract", cj, "--out", str(out), "--detector", str(det), "--device", "cpu",
           "--precision", "fp32", "--workers", "1", "--batch-size", "1", "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    # every rank extracted only what was in neither OUT nor its rank cache; rank 0 printed the sums once
    assert p.stdout.count("extracted ") == 1, p.stdout
    assert "extracted 4 images" in p.stdout and "3 already in" in p.stdout and "1 failed" in p.stdout
    assert "merged 5 entries of 2 rank caches" in p.stderr
    assert p.stderr.count(f"skipped {bad.id}: truncated") == 1
    assert_same_cache(ref, FeatureCache.open(out))
    assert not (out / "ranks").exists()
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["kind"]) for f in fails] == [(bad.id, "truncated")]



def test_shard_under_torchrun_is_refused_in_one_line(setup, tmp_path, monkeypatch, capsys):
    from glied.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as ei:
        main(["extract", str(setup / "shapes" / "captions.json"), "--out", str(tmp_path / "c"), "--detector",
              str(setup / "det.pt"), "--device", "cpu", "--shard", "0/2"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --shard 0/2: under torchrun each of the 2 ranks takes its own shard")
    assert err.count("\n") == 1 and not (tmp_path / "c").exists()
