"""Bad input is one line `error: ...` and exit 2, never a traceback; silent no-ops are refused; bundle parts
must be plain files inside the bundle; a full disk keeps what was written. Real subprocesses."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GRID = f"{REPO / 'tests' / 'pipeline' / 'grid_extractor.py'}:make_extractor"


def glied(*args, fsize: int | None = None, timeout=180):
    def limit():
        if fsize is not None:                     # a "disk" that is full after fsize bytes per file
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=limit)


def one_line(r, *needles):
    """Exit 2 and the error as the one last stderr line (progress lines before it are allowed)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _fake_bundle(root: Path, meta_edit=None) -> Path:
    root.mkdir(parents=True)
    parts = {}
    for part in ("detector", "attributes", "decoder"):
        data = os.urandom(32)
        (root / f"{part}.pt").write_bytes(data)
        parts[part] = {"file": f"{part}.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": 32}
    meta = {"format": "glied-bundle", "version": 1, "parts": parts, "settings": {"beam_size": 3}}
    if meta_edit:
        meta_edit(meta, root)
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def test_malformed_bundles_are_one_line(tmp_path):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"x" * 32)

    def link(meta, root):
        (root / "decoder.pt").unlink()
        (root / "decoder.pt").symlink_to(outside)

    cases = {
        "parts_list": (lambda m, r: m.update(parts=[1, 2]), "'parts' is not an object"),
        "file_number": (lambda m, r: m["parts"]["decoder"].update(file=7), "parts.decoder needs a file name"),
        "dotdot": (lambda m, r: m["parts"]["decoder"].update(file="../outside.pt"), "not a file name inside"),
        "absolute": (lambda m, r: m["parts"]["detector"].update(file=str(outside)), "not a file name inside"),
        "symlink": (link, "is a link"),
        "beam": (lambda m, r: m["settings"].update(beam_size="3"), "settings.beam_size"),
        "settings": (lambda m, r: m.update(settings=[]), "'settings' is not an object"),
    }
    from glied.errors import InputError
    from glied.pipeline.bundle import read_bundle

    for name, (edit, needle) in cases.items():
        b = _fake_bundle(tmp_path / name, edit)
        with pytest.raises(InputError) as e:
            read_bundle(b)
        assert needle in str(e.value) and "bundle.json" in str(e.value) and "\n" not in str(e.value)
    # the same through the CLI (one case: the path to the error line is the same for all)
    one_line(glied("caption", photo, "--model", tmp_path / "dotdot", "--device", "cpu"), "not a file name inside")


def test_bad_flags_and_silent_no_ops(tmp_path):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    d, c, o = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    one_line(glied("train", "--data", d, "--features", c, "--out", o, "--lr", "nan"), "--lr", "nan")
    one_line(glied("train", "--data", d, "--features", c, "--out", o, "--heads", "3"), "3 attention heads")
    one_line(glied("train", "--data", d, "--features", c, "--out", o, "--epochs", "0", "--stage", "xe"),
             "nothing to train")
    one_line(glied("extract", tmp_path, "--out", c, "--extractor-module", GRID, "--batch-size", "0"), "--batch-size")
    one_line(glied("caption", photo, "--model", tmp_path / "b", "--show", tmp_path / "nope" / "x.png"),
             "--show", "does not exist")
    assert not o.exists() and not c.exists()
    import torch

    if not torch.cuda.is_available():
        for cmd in (["train", "--data", d, "--features", c, "--out", o],
                    ["evaluate-attributes", "--run", o, "--data", d]):       # the same callback in all four
            one_line(glied(*cmd, "--device", "cuda"), "no CUDA device", "--device cpu")
        from glied.cli import cli

        for name in ("train", "evaluate", "train-attributes", "evaluate-attributes"):
            dev = next(p for p in cli.commands[name].params if p.name == "device")
            assert dev.callback is not None and dev.callback.__name__ == "_device"


def test_import_export_errors_are_one_line(tmp_path):
    z = tmp_path / "npz"
    z.mkdir()
    np.savez(z / "1.npz", x=np.array([object(), 1], dtype=object), bbox=np.zeros((2, 4)))
    one_line(glied("import-features", z, "--out", tmp_path / "c1"), "1.npz", "unusable npz")
    tsv = tmp_path / "f.tsv"
    tsv.write_text("1\t10\t10\t-3\tAAAA\tAAAA\r\n")
    one_line(glied("import-features", tsv, "--out", tmp_path / "c2"), "line 1", "num_boxes")
    tsv.write_text("1\t10\t10\t1\tnot base64!\tAAAA\r\n")
    one_line(glied("import-features", tsv, "--out", tmp_path / "c3"), "not valid base64")
    # a cache whose data file was truncated: export refuses before writing anything
    from glied.datasets.cache import CacheWriter, make_manifest
    from glied.records import RegionFeatures

    ident = {"name": "t", "config": {}, "weights_fingerprint": "x", "feature_dim": 8}
    with CacheWriter(tmp_path / "c", make_manifest(ident, "float32")) as w:
        for i in range(4):
            w.put(str(i), RegionFeatures(np.zeros((3, 4), np.float32), np.ones((3, 8), np.float32),
                                         np.zeros(3, np.int64), np.ones(3, np.float32), np.zeros(3, np.int64),
                                         np.ones(3, np.float32), 10, 10))
    os.truncate(tmp_path / "c" / "data" / "00000.bin", 100)
    one_line(glied("export-features", tmp_path / "c", "--out", tmp_path / "x.tsv"), "truncated", "verify-cache")
    assert not (tmp_path / "x.tsv").exists()


def test_refused_checkpoint_never_suggests_weights_only_false(tmp_path):
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"format": "glied-bottomup", "version": 1, "x": np.dtype("float32")}, evil)  # needs full unpickling
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src / "a.png")
    r = glied("extract", src, "--out", tmp_path / "c", "--detector", evil, "--device", "cpu")
    one_line(r, "evil.pt", "could run code")
    assert "weights_only" not in r.stderr and "can still be loaded" not in r.stderr


def test_full_disk_during_extract_and_checkpoint_save_keeps_work(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / f"{k:02d}.png")
    out = tmp_path / "c"
    r = glied("extract", src, "--out", out, "--extractor-module", GRID, "--quiet", "--batch-size", "2",
              "--commit-seconds", "0", fsize=6000)
    one_line(r, "free some space")
    from glied.datasets.cache import FeatureCache

    kept = FeatureCache.open(out)
    assert 0 < len(kept) < 12 and kept.verify() == [] and kept.damaged == {}
    r = glied("extract", src, "--out", out, "--extractor-module", GRID, "--quiet")
    assert r.returncode == 0 and f"{len(kept)} already" in r.stdout, r.stderr
    assert len(FeatureCache.open(out)) == 12
    # a checkpoint save that hits the limit: one line, the previous checkpoint kept, no temporary file left
    target = tmp_path / "run" / "last.pt"
    code = (f"import sys, torch; from glied.checkpoint import save; from glied.models.checkpoint import DECODER\n"
            f"from glied.errors import GliedError\n"
            f"try:\n    save(r'{target}', {{'model': {{'w': torch.zeros(int(sys.argv[1]))}}}}, DECODER)\n"
            f"except GliedError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")

    def save(n, fsize=None):
        def limit():
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        return subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120, preexec_fn=limit)

    assert save(10).returncode == 0
    old = target.read_bytes()
    r = save(100_000, fsize=50_000)
    assert r.returncode == 2 and "could not be saved" in r.stderr and "previous version is kept" in r.stderr
    assert target.read_bytes() == old and sorted(os.listdir(target.parent)) == ["last.pt"]
