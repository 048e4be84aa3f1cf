"""`glied bundle --out DIR` never deletes what is not a bundle: a run folder, a user's folder, a file, a link,
or the folder an input part comes from; a bundle (or an empty folder) is replaced; the umask is honoured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glied.errors import InputError
from glied.pipeline.bundle import write_bundle

REPO = Path(__file__).resolve().parents[2]


def _parts(root: Path) -> dict[str, Path]:
    """Three stand-in checkpoint files (write_bundle copies bytes; loading is the verify step's job)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for part in ("detector", "attributes", "decoder"):
        out[part] = root / f"{part}_src.pt"
        out[part].write_bytes(os.urandom(64))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _glied(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_refuses_to_replace_what_is_not_a_bundle(tmp_path):
    p = _parts(tmp_path / "src")
    run = tmp_path / "decoder_run"                       # a decoder's run folder as --out
    run.mkdir()
    (run / "best.pt").write_bytes(b"weights")
    (run / "metrics.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    link = tmp_path / "link"
    link.symlink_to(notes)
    cases = [(run, run, "holds the decoder checkpoint"),
             (run, p["decoder"], "is not a glied bundle"),
             (notes, p["decoder"], "is not a glied bundle"),
             (link, p["decoder"], "symbolic link")]
    for k, (out, dec, msg) in enumerate(cases):
        before = _snapshot(tmp_path)
        if k < 2:                                  # the CLI: one line, exit 2
            r = _glied("bundle", "--detector", p["detector"], "--attributes", p["attributes"], "--decoder", dec,
                       "--out", out)
            assert r.returncode == 2 and msg in r.stderr, (out, r.stderr)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        else:                                      # the same check, in process (faster)
            with pytest.raises(InputError, match=msg):
                write_bundle(out, detector=p["detector"], attributes=p["attributes"], decoder=dec)
        assert _snapshot(tmp_path) == before                         # nothing deleted, nothing written
        assert not [q for q in tmp_path.iterdir() if ".tmp" in q.name]
    r = _glied("bundle", "--detector", p["detector"], "--attributes", p["attributes"], "--decoder", p["decoder"],
               "--out", tmp_path / "b", "--beam", "0")
    assert r.returncode == 2 and "--beam" in r.stderr and "Traceback" not in r.stderr


def test_bundles_are_replaced_and_input_parts_protected(tmp_path):
    p = _parts(tmp_path / "src")
    out = tmp_path / "bundle"
    write_bundle(out, **p)
    first = json.loads((out / "bundle.json").read_text())
    assert sorted(os.listdir(out)) == ["attributes.pt", "bundle.json", "decoder.pt", "detector.pt"]
    (tmp_path / "src" / "decoder_src.pt").write_bytes(b"new decoder")
    write_bundle(out, **p)                                            # a bundle is replaced
    assert json.loads((out / "bundle.json").read_text())["parts"]["decoder"]["sha256"] != \
        first["parts"]["decoder"]["sha256"]
    with pytest.raises(InputError, match="holds the decoder checkpoint"):      # a part read from --out
        write_bundle(out, detector=p["detector"], attributes=p["attributes"], decoder=out / "decoder.pt")
    (out / "README.txt").write_text("a user's note inside a bundle folder")
    with pytest.raises(InputError, match="not a glied bundle .*README.txt"):
        write_bundle(out, **p)
    assert (out / "README.txt").read_text().startswith("a user's note")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_bundle(afile, **p)
    assert afile.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(empty, **p)                                          # an empty folder is fine
    assert (empty / "bundle.json").is_file()


def test_bundle_folder_honours_umask(tmp_path):
    p = _parts(tmp_path / "src")
    old = os.umask(0o022)
    try:
        out = write_bundle(tmp_path / "b", **p)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
