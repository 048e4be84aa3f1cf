"""Fault injection into a feature cache: bytes and bits flipped in data and index files, data files truncated
and deleted, torn index tails, a lost manifest. For every fault: each undamaged entry survives (reads back
bit-identical, also after a writer resumed the cache), no damaged entry is ever served (reader, export,
merge, the decoder's training dataset), and a resume re-extracts exactly the damaged entries."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glied.datasets import cache_store as cs
from glied.datasets.cache import (CacheWriter, DamagedEntryError, FeatureCache, check_cache, make_manifest)
from glied.errors import GliedError, InputError
from glied.pipeline.features_io import export_tsv, merge_caches
from tests.cache_checks import assert_same_regions
from glied.records import RegionFeatures

IDENT = {"name": "faults", "config": {}, "weights_fingerprint": "f", "feature_dim": 24}
N = 30
REPO = Path(__file__).resolve().parents[2]


def _data(seed: int = 0) -> dict[str, RegionFeatures]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(N):
        n = int(rng.integers(1, 9))
        out[f"img_{i:02d}"] = RegionFeatures(
            boxes=rng.random((n, 4), dtype=np.float32) * 90, features=rng.standard_normal((n, 24)).astype(np.float32),
            obj_ids=rng.integers(0, 9, n), obj_scores=rng.random(n, dtype=np.float32),
            attr_ids=rng.integers(0, 9, n), attr_scores=rng.random(n, dtype=np.float32), image_w=100, image_h=90)
    return out


def _build(root: Path, data: dict) -> dict[str, list]:
    """A cache spread over several data files; returns {id: index entry} (file, offset, nbytes, ...)."""
    with CacheWriter(root, make_manifest(IDENT, "float32"), commit_every=4, max_file_bytes=3000) as w:
        for k, r in data.items():
            w.put(k, r)
    entries = cs.IndexReader().read(str(root / cs.INDEX_NAME)).entries
    assert len({e[1] for e in entries.values()}) >= 3
    return entries


def _check_served(root: Path, data: dict, damaged: set[str]) -> None:
    """Every undamaged entry reads back identical; every damaged one is refused (never served)."""
    c = FeatureCache.open(root)
    assert set(c.ids()) >= set(data) - damaged
    for k, r in data.items():
        if k in damaged:
            with pytest.raises(InputError):
                c.regions(k)
        else:
            assert_same_regions(r, c.regions(k))
    assert c.verify() == []                     # what is left is intact
    assert set(c.ids()) == set(data) - damaged


def _resume(root: Path, data: dict, damaged: set[str]) -> None:
    """A writer reopening the cache keeps every intact entry and re-extracts exactly the damaged ones."""
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:
        todo = [k for k in data if k not in w]
        assert set(todo) == damaged
        for k in data:                           # intact entries kept byte for byte before anything new
            if k not in damaged:
                assert k in w
        for k in todo:
            w.put(k, data[k])
    c = FeatureCache.open(root)
    assert set(c.ids()) == set(data) and c.damaged == {} and c.verify() == []
    for k, r in data.items():
        assert_same_regions(r, c.regions(k))


def _flip(path: Path, positions, mask: int | None = None, seed: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for p in positions:
        raw[p] ^= mask if mask is not None else int(rng.integers(1, 256))
    path.write_bytes(bytes(raw))


def _in_file(entries: dict, num: int) -> dict:
    return {k: e for k, e in entries.items() if e[1] == num}


# ------------------------------------------------------------------------------------------- data files


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["bytes", "bit"])
def test_flipped_data_never_served_and_resumed(tmp_path, seed, kind):
    data = _data(seed)
    root = tmp_path / "c"
    entries = _build(root, data)
    rng = np.random.default_rng(seed)
    num = int(rng.choice(sorted({e[1] for e in entries.values()})))
    f = root / cs.data_file_name(num)
    in_f = _in_file(entries, num)
    if kind == "bytes":                         # 64 bytes somewhere in the file's entries
        pos = sorted(int(p) for p in rng.choice(f.stat().st_size, 64, replace=False))
        _flip(f, pos, seed=seed)
    else:                                       # one bit inside one entry
        k = sorted(in_f)[int(rng.integers(len(in_f)))]
        pos = [in_f[k][2] + int(rng.integers(in_f[k][3]))]
        _flip(f, pos, mask=1 << int(rng.integers(8)))
    damaged = {k for k, e in in_f.items() if any(e[2] <= p < e[2] + e[3] for p in pos)}
    assert damaged
    c = FeatureCache.open(root)
    assert sorted(c.verify()) == sorted(damaged)
    for k in damaged:                            # the CLI-facing error: one line naming the fix
        with pytest.raises(DamagedEntryError, match="verify-cache .*--repair"):
            FeatureCache.open(root).regions(k)
    n_ok, bad = check_cache(root)                # listing does not change anything
    assert set(bad) == damaged and n_ok == N - len(damaged)
    n_ok, bad = check_cache(root, repair=True)
    assert set(bad) == damaged
    _check_served(root, data, damaged)
    _resume(root, data, damaged)


@pytest.mark.parametrize("where", ["inside_entry", "first_file_start", "last_file"])
def test_truncated_data_file(tmp_path, where):
    data = _data(1)
    root = tmp_path / "c"
    entries = _build(root, data)
    nums = sorted({e[1] for e in entries.values()})
    num = nums[-1] if where == "last_file" else nums[0]
    in_f = _in_file(entries, num)
    if where == "first_file_start":
        size = 10
    else:
        k = sorted(in_f, key=lambda k: in_f[k][2])[len(in_f) // 2]
        size = in_f[k][2] + in_f[k][3] // 2
    os.truncate(root / cs.data_file_name(num), size)
    damaged = {k for k, e in in_f.items() if e[2] + e[3] > size}
    c = FeatureCache.open(root)
    assert set(c.damaged) == damaged and not set(c.ids()) & damaged
    _check_served(root, data, damaged)
    _resume(root, data, damaged)             # re-extracts only them; never appends over another entry's bytes


@pytest.mark.parametrize("which", [0, 1, -1])
def test_deleted_data_file(tmp_path, which):
    data = _data(2)
    root = tmp_path / "c"
    entries = _build(root, data)
    num = sorted({e[1] for e in entries.values()})[which]
    os.remove(root / cs.data_file_name(num))
    damaged = set(_in_file(entries, num))
    assert set(FeatureCache.open(root).damaged) == damaged
    _check_served(root, data, damaged)
    _resume(root, data, damaged)


# ------------------------------------------------------------------------------------------- index file


def _line_spans(idx: Path) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for line in idx.read_bytes().split(b"\n")[:-1]:
        spans.append((pos, pos + len(line)))          # [start, newline position)
        pos += len(line) + 1
    return spans


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["bit_in_middle_line", "bytes_in_two_lines", "last_line", "crc_digit",
                                  "newline"])
def test_damaged_index_lines(tmp_path, seed, kind):
    data = _data(3 + seed)
    root = tmp_path / "c"
    _build(root, data)
    idx = root / cs.INDEX_NAME
    spans = _line_spans(idx)
    ids = list(data)                                   # line k holds ids[k]
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, N - 2))
    if kind == "bit_in_middle_line":                   # one flipped bit in a line's body
        _flip(idx, [int(rng.integers(spans[k][0] + 9, spans[k][1]))], mask=1 << int(rng.integers(8)))
        damaged = {ids[k]}
    elif kind == "bytes_in_two_lines":
        j = int(rng.integers(0, k))
        _flip(idx, [int(rng.integers(spans[i][0] + 9, spans[i][1])) for i in (j, k)], seed=seed)
        damaged = {ids[j], ids[k]}
    elif kind == "last_line":                           # complete but corrupt final line
        _flip(idx, [int(rng.integers(spans[-1][0] + 9, spans[-1][1]))], seed=seed)
        damaged = {ids[-1]}
    elif kind == "crc_digit":
        _flip(idx, [spans[k][0] + int(rng.integers(8))], mask=1)
        damaged = {ids[k]}
    else:                                               # a newline bit: two lines merge into one bad line
        _flip(idx, [spans[k][1]], mask=1)
        damaged = {ids[k], ids[k + 1]}
    c = FeatureCache.open(root)
    assert set(c.ids()) == set(data) - damaged       # every other line kept, wherever the damage is
    assert ids[k if kind != "last_line" else -1] in c.damaged
    _check_served(root, data, damaged)
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:   # a writer keeps all intact entries
        assert set(w.ids()) == set(data) - damaged
        assert set(w.dropped) & damaged
    _check_served(root, data, damaged)
    _resume(root, data, damaged)


def test_torn_final_line_is_the_only_thing_cut(tmp_path):
    data = _data(9)
    root = tmp_path / "c"
    _build(root, data)
    idx = root / cs.INDEX_NAME
    raw = idx.read_bytes()
    spans = _line_spans(idx)
    idx.write_bytes(raw[: spans[-1][0] + (spans[-1][1] - spans[-1][0]) // 2])     # crash mid-append
    ids = list(data)
    _check_served(root, data, {ids[-1]})
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:
        assert w.recovered_bytes == (spans[-1][1] - spans[-1][0]) // 2 and not w.dropped
        assert set(w.ids()) == set(ids[:-1])
    assert idx.read_bytes() == raw[: spans[-1][0]]
    _resume(root, data, {ids[-1]})


# ------------------------------------------------------------------------------------------- manifest


def test_lost_manifest_refuses_writes(tmp_path):
    data = _data(4)
    root = tmp_path / "c"
    _build(root, data)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "lock"}
    os.remove(root / "manifest.json")
    other = dict(IDENT, name="another-extractor")
    with pytest.raises(InputError, match="no manifest.json.*restore manifest.json.*new --out"):
        CacheWriter(root, make_manifest(other, "float32"))
    with pytest.raises(InputError, match="no manifest.json"):
        CacheWriter(root, make_manifest(IDENT, "float32"))
    assert not (root / "manifest.json").exists()
    for p, b in before.items():
        if p.name != "manifest.json":
            assert p.read_bytes() == b


# ------------------------------------------------------------------------------------------- consumers


def test_export_merge_and_training_dataset_never_serve_damage(tmp_path):
    spec = importlib.util.spec_from_file_location("decoder_fixtures",
                                                  REPO / "tests" / "pipeline" / "decoder_fixtures.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    from glied.datasets.captions import CaptionDataset
    from glied.datasets.prepared import PreparedData

    prep = fx.make_prepared(tmp_path / "d", n_images=12)
    mem = fx.MemoryFeatures(tmp_path / "d", dim=24)
    data = {i: mem.regions(i) for i in mem.ids()}
    root = tmp_path / "c"
    with CacheWriter(root, make_manifest(IDENT, "float32"), commit_every=3) as w:
        for k, r in data.items():
            w.put(k, r)
    entries = cs.IndexReader().read(str(root / cs.INDEX_NAME)).entries
    pd = PreparedData.load(prep)
    train_id = pd.images[pd.split_indices("train")[1]]["id"]
    e = entries[train_id]
    _flip(root / cs.data_file_name(e[1]), [e[2] + 5])          # 1 damaged training image
    export = tmp_path / "x.tsv"
    with pytest.raises(DamagedEntryError, match=repr(train_id)):
        export_tsv(str(root), str(export))
    assert not export.exists() and not list(tmp_path.glob("x.tsv*"))
    with pytest.raises(DamagedEntryError):
        merge_caches(str(tmp_path / "m"), [str(root)])
    assert train_id not in FeatureCache.open(tmp_path / "m")   # whatever was merged is intact
    ds = CaptionDataset(PreparedData.load(prep), FeatureCache.open(root), "train", where=str(root))
    with pytest.raises(DamagedEntryError):
        ds[ds.ids.index(train_id)]
    # after --repair the dataset refuses at build time, naming the damaged image and the fix
    check_cache(root, repair=True)
    with pytest.raises(InputError, match="missing from the feature cache"):
        CaptionDataset(PreparedData.load(prep), FeatureCache.open(root), "train", where=str(root))
    # a truncated data file: damaged entries are known at open; export refuses before writing anything
    os.truncate(root / cs.data_file_name(0), 100)
    with pytest.raises(GliedError, match="truncated"):
        export_tsv(str(root), str(export))
    ds_err = None
    try:
        CaptionDataset(PreparedData.load(prep), FeatureCache.open(root), "train", where=str(root))
    except InputError as err:
        ds_err = str(err)
    assert ds_err is not None and "damaged" in ds_err and "verify-cache" in ds_err


def test_zero_region_entry_refused_when_dataset_is_built(tmp_path):
    spec = importlib.util.spec_from_file_location("decoder_fixtures",
                                                  REPO / "tests" / "pipeline" / "decoder_fixtures.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    from glied.datasets.captions import CaptionDataset
    from glied.datasets.prepared import PreparedData

    prep = fx.make_prepared(tmp_path / "d", n_images=12)
    mem = fx.MemoryFeatures(tmp_path / "d", dim=24)
    root = tmp_path / "c"
    with CacheWriter(root, make_manifest(IDENT, "float32")) as w:
        for k in mem.ids():
            r = mem.regions(k)
            if k == "0":                                           # a training image with no region
                r = RegionFeatures(r.boxes[:0], r.features[:0], r.obj_ids[:0], r.obj_scores[:0],
                                   r.attr_ids[:0], r.attr_scores[:0], r.image_w, r.image_h)
            w.put(k, r)
    with pytest.raises(InputError, match=r"1 train images have no regions .*\b0\b"):
        CaptionDataset(PreparedData.load(prep), FeatureCache.open(root), "train", where=str(root))


# ------------------------------------------------------------------------------------------- the CLI


def _glied(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


def test_verify_cache_cli_lists_and_repairs(tmp_path):
    data = _data(5)
    root = tmp_path / "c"
    entries = _build(root, data)
    r = _glied("verify-cache", root)
    assert r.returncode == 0 and f"all {N} entries intact" in r.stdout
    e = entries["img_07"]
    _flip(root / cs.data_file_name(e[1]), range(e[2], e[2] + 64), seed=1)
    r = _glied("verify-cache", root)
    assert r.returncode == 1 and r.stdout.splitlines() == ["damaged\timg_07\tdata checksum mismatch"]
    assert "--repair" in r.stderr
    r = _glied("export-features", root, "--out", tmp_path / "x.tsv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "img_07" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.tsv").exists()
    r = _glied("verify-cache", root, "--repair")
    assert r.returncode == 0 and "dropped 1 damaged" in r.stdout
    assert set(FeatureCache.open(root).ids()) == set(data) - {"img_07"}
    r = _glied("verify-cache", root)
    assert r.returncode == 0 and f"all {N - 1} entries intact" in r.stdout


def test_extract_resume_after_data_loss_equals_clean_run(tmp_path):
    """`glied extract` into a cache whose data file was truncated (CLI) or deleted (API) re-extracts exactly
    the lost entries; the result equals a clean run entry for entry (no other image's bytes served)."""
    from glied.pipeline.data import make_shapes_world
    from glied.pipeline.extract import extract

    spec = importlib.util.spec_from_file_location("grid_extractor", REPO / "tests" / "pipeline" / "grid_extractor.py")
    ge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ge)
    make_shapes_world(tmp_path / "w", 12, seed=5, size=64, workers=1)
    images = tmp_path / "w" / "images"
    extract(str(images), str(tmp_path / "clean"), region_extractor=ge.make_extractor(), progress=False,
            workers=0, log=lambda s: None)
    clean = FeatureCache.open(tmp_path / "clean")
    for fault in ("truncate", "delete"):
        c = tmp_path / fault
        shutil.copytree(tmp_path / "clean", c)
        f = c / cs.data_file_name(0)
        if fault == "truncate":
            os.truncate(f, f.stat().st_size // 2)
        else:
            os.remove(f)
        lost = set(FeatureCache.open(c).damaged)
        assert 0 < len(lost) <= 12
        if fault == "truncate":
            ext = f"{REPO / 'tests' / 'pipeline' / 'grid_extractor.py'}:make_extractor"
            r = _glied("extract", images, "--extractor-module", ext, "--quiet", "--workers", "0", "--out", c)
            assert r.returncode == 0 and f"extracted {len(lost)} images" in r.stdout and "dropped" in r.stderr
        else:
            logged = []
            s = extract(str(images), str(c), region_extractor=ge.make_extractor(), progress=False, workers=0,
                        log=logged.append)
            assert s.extracted == len(lost) == 12 and any("dropped 12 damaged" in m for m in logged)
        b = FeatureCache.open(c)
        assert sorted(clean.ids()) == sorted(b.ids()) and b.verify() == []
        for i in clean.ids():
            assert_same_regions(clean.regions(i), b.regions(i))


def test_a_forked_child_does_not_keep_the_writer_lock(tmp_path):
    """flock belongs to the open file: a forked child (a DataLoader worker decoding images) that outlives its
    writer must not keep the cache locked, or a resume right after a crash would be refused."""
    import os
    import time

    root = tmp_path / "c"
    w = CacheWriter(root, make_manifest(IDENT, "float32"))
    r, wr = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the child lives on for a while, as an orphaned worker would
        os.write(wr, b"x")
        time.sleep(3)
        os._exit(0)
    try:
        os.read(r, 1)                   # the child runs (its fork handlers have run)
        w.close()
        CacheWriter(root, make_manifest(IDENT, "float32")).close()   # "lock held" if the child kept it
    finally:
        os.waitpid(pid, 0)
        os.close(r), os.close(wr)
