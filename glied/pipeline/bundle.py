"""Model bundles: the detector, the attribute detector and the decoder in one folder, ready to caption.

Layout of ``BUNDLE/``::

    bundle.json      {"format": "glied-bundle", "version": 1, "glied_version",
                      "parts": {"detector": {"file", "sha256", "bytes"}, "attributes": {...}, "decoder": {...}},
                      "settings": {"top_k": ..., "beam_size": ..., "precision": ...}}
    detector.pt, attributes.pt, decoder.pt     the three checkpoints, copied unchanged

A bundle is written into a temporary folder beside ``BUNDLE`` and renamed into place, so a reader never sees
half a bundle. Loading checks the format and version, that every part is present with its recorded sha256,
and that the decoder was trained on features from exactly this detector and attribute detector.
Nothing in a bundle executes code on load: every checkpoint is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from glied import __version__
from glied import checkpoint as ck
from glied.errors import ConfigError, InputError
from glied.fileio import sha256_file, umask_mode

FORMAT = "glied-bundle"
VERSION = 1
PARTS = ("detector", "attributes", "decoder")


def _checkpoint_formats() -> dict:
    """{part: its checkpoint Format} (see :mod:`glied.checkpoint`)."""
    from glied.extractors.bottomup.weights import DETECTOR
    from glied.extractors.mil.checkpoint import MIL
    from glied.models.checkpoint import DECODER

    return {"detector": DETECTOR, "attributes": MIL, "decoder": DECODER}


def _check_replaceable(out: Path, sources: dict[str, Path]) -> None:
    """Refuse an ``out`` that is not empty and not a bundle (a run folder, a user's folder, a file, a
    symbolic link), and one that holds an input part: writing a bundle must never delete anything else."""
    if os.path.islink(out):
        raise InputError(f"--out {out}: is a symbolic link; give the bundle folder itself or a new folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; give a new folder for the bundle")
    real = out.resolve()
    for part, src in sources.items():
        if real == src.resolve() or real in src.resolve().parents:
            raise InputError(f"--out {out}: holds the {part} checkpoint {src} that goes into the bundle; "
                             f"write the bundle to another folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    bundle_files = {"bundle.json"} | {f"{p}.pt" for p in PARTS}
    try:
        fmt = json.loads((out / "bundle.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT or not names <= bundle_files:
        other = sorted(names - bundle_files)[:3]
        raise InputError(f"--out {out}: exists and is not a glied bundle (it holds "
                         f"{', '.join(other or sorted(names)[:3])}{' ...' if len(names) > 3 else ''}); "
                         f"refusing to replace it: give a new folder, or remove it yourself")


def write_bundle(out: str | os.PathLike, *, detector: str | os.PathLike, attributes: str | os.PathLike,
                 decoder: str | os.PathLike, settings: dict | None = None,
                 verify: Callable[[Path], object] | None = None) -> Path:
    """Copy the three checkpoints (files or run folders) into a new bundle folder ``out``; returns its path.

    ``verify(folder)`` runs on the complete bundle before it is renamed into place (the caption pipeline loads
    it there and checks that the parts belong together); if it raises, nothing at ``out`` changes.
    An existing ``out`` is replaced only if it is a bundle (or empty), and only once the new bundle is complete
    and verified; anything else at ``out`` (a run folder, a folder holding an input part, a file) is refused.
    """
    out = Path(out)
    fmts = _checkpoint_formats()
    sources = {part: ck.resolve(src, fmts[part])
               for part, src in (("detector", detector), ("attributes", attributes), ("decoder", decoder))}
    _check_replaceable(out, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    os.chmod(tmp, umask_mode(0o777))
    try:
        meta = {"format": FORMAT, "version": VERSION, "glied_version": __version__, "parts": {},
                "settings": dict(settings or {})}
        for part, src in sources.items():
            dst = tmp / f"{part}.pt"
            shutil.copyfile(src, dst)
            meta["parts"][part] = {"file": dst.name, "sha256": sha256_file(dst), "bytes": dst.stat().st_size,
                                   "source": str(src.resolve())}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=1))
        if verify is not None:
            verify(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_bundle(path: str | os.PathLike) -> tuple[dict, dict[str, Path]]:
    """Validate ``bundle.json`` and the part files (presence and sha256); returns (meta, {part: file})."""
    root = Path(path)
    meta_path = root / "bundle.json"
    if not meta_path.is_file():
        raise InputError(f"{root}: not a glied model bundle (no bundle.json); build one with `glied bundle`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{meta_path}: damaged bundle metadata (not JSON); rebuild with `glied bundle`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{meta_path}: not a glied model bundle (format {fmt!r})")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{root}: bundle format version {meta.get('version')} (glied "
                          f"{meta.get('glied_version', '?')}) is not the version {VERSION} this glied "
                          f"{__version__} reads; rebuild it with `glied bundle`")

    def bad(what: str) -> InputError:
        return InputError(f"{meta_path}: {what}; rebuild the bundle with `glied bundle`")

    parts, settings = meta.get("parts"), meta.get("settings", {})
    if not isinstance(parts, dict):
        raise bad("'parts' is not an object")
    if not isinstance(settings, dict):
        raise bad("'settings' is not an object")
    for k in ("beam_size", "max_len", "top_k"):
        v = settings.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad(f"settings.{k} is {v!r}, not a positive integer")
    if not isinstance(settings.get("precision", ""), str):
        raise bad("settings.precision is not a string")
    real_root = root.resolve()
    files = {}
    for part in PARTS:
        info = parts.get(part)
        if info is None:
            raise InputError(f"{root}: the bundle has no {part} part; rebuild it with `glied bundle`")
        if (not isinstance(info, dict) or not isinstance(info.get("file"), str)
                or not isinstance(info.get("sha256"), str)
                or not isinstance(info.get("bytes", 0), int) or isinstance(info.get("bytes"), bool)):
            raise bad(f"parts.{part} needs a file name, a sha256 and a byte count")
        name = info["file"]
        # a part is a plain file inside the bundle: no absolute path, no folder, no link out of it
        if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
            raise bad(f"parts.{part}.file {name!r} is not a file name inside the bundle")
        f = root / name
        if f.is_symlink() or (f.exists() and f.resolve().parent != real_root):
            raise bad(f"parts.{part}.file {name!r} is a link (parts must be plain files inside the bundle)")
        if not f.is_file():
            raise InputError(f"{f}: the bundle's {part} checkpoint is missing; rebuild it with `glied bundle`")
        if f.stat().st_size != info.get("bytes", f.stat().st_size) or sha256_file(f) != info["sha256"]:
            raise InputError(f"{f}: the bundle's {part} checkpoint is damaged (checksum differs); "
                             "rebuild it with `glied bundle`")
        files[part] = f
    return meta, files
