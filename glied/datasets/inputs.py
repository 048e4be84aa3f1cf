"""What `glied extract` reads: enumerate INPUT into (stable id, path) pairs in a deterministic order.

INPUT may be
* a folder: searched recursively for regular files named .jpg .jpeg .png .bmp .webp .tif .tiff .gif (any
  case); id = the path relative to the folder, with "/" separators and Unicode NFC normalisation
  (``"2014/a.jpg"``; bytes of a file name that are not UTF-8 appear as ``\\xNN``);
* a text file listing one path per line (blank lines and lines starting with ``#`` ignored); relative paths
  resolve against ``images_root`` (default: the list's folder); id = the path relative to that root;
* a Karpathy captions json (``images[].filename`` [+ ``filepath``]): id = ``str(cocoid)`` when present,
  else the filename stem (Flickr30k), exactly as ``glied prepare`` keys them;
* a COCO instances json (``images[].file_name`` + ``id``): id = ``str(id)``;
* a prepared folder (``glied prepare`` output) or its ``images.json``: the ids and files listed there.

Ids are never parsed out of file names by guesswork. Order: sorted by id (so runs and shards agree).
``shard(items, i, n)`` keeps the items whose CRC32(id) % n == i: stable when the input list grows.
"""
from __future__ import annotations

import json
import os
import unicodedata
import zlib
from pathlib import Path
from typing import NamedTuple

from glied.datasets.images import IMAGE_EXTENSIONS, find_images
from glied.datasets.karpathy import image_id as karpathy_image_id
from glied.errors import InputError


class InputImage(NamedTuple):
    """One image to extract: its stable id and the path to read it from."""

    id: str
    path: str


def _norm_rel(rel: str) -> str:
    if not rel.isascii():   # bytes that are not UTF-8 (surrogate escapes) become a visible \xNN in the id
        rel = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    rel = unicodedata.normalize("NFC", rel.replace(os.sep, "/"))
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _check_unique(items: list[InputImage], src: str) -> list[InputImage]:
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise InputError(f"{src}: image id {it.id!r} appears twice ({seen[it.id]} and {it.path}); "
                             f"ids must be unique")
        seen[it.id] = it.path
    return sorted(items, key=lambda it: it.id)


def from_folder(root: str | os.PathLike) -> list[InputImage]:
    root = os.path.abspath(os.fspath(root))
    items = [InputImage(_norm_rel(os.path.relpath(p, root)), p) for p in find_images(root)]
    if not items:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)")
    return _check_unique(items, root)


def from_list(path: str, images_root: str | None) -> list[InputImage]:
    root = os.path.abspath(images_root or os.path.dirname(os.path.abspath(path)))
    prefix = os.path.join(root, "")
    nfc = unicodedata.normalize
    items = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:   # file names need not be UTF-8
        for line in f:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s[0] != "/" and "/." not in "/" + s and "//" not in s and s[-1] != "/" and "\\" not in s:
                items.append(InputImage(nfc("NFC", s) if s.isascii() else _norm_rel(s), prefix + s))  # clean
                continue
            p = os.path.normpath(os.path.join(root, s))
            rel = os.path.relpath(p, root)
            iid = _norm_rel(rel) if not rel.startswith("..") else _norm_rel(p)
            items.append(InputImage(iid, p))
    if not items:
        raise InputError(f"{path}: the list of images is empty")
    return _check_unique(items, path)


def _pick_root(src: Path, first_file: str, images_root: str | None) -> Path:
    if images_root:
        return Path(images_root).absolute()
    for cand in (src.parent, src.parent / "images"):
        if (cand / first_file).exists():
            return cand.absolute()
    raise InputError(f"{src}: cannot find {first_file} next to the json or under images/; "
                     f"pass --images-root DIR (the folder the json's file names are relative to)")


def from_json(path: str, images_root: str | None) -> list[InputImage]:
    src = Path(path)
    try:
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{src}: not valid JSON ({e}); expected a Karpathy or COCO json") from None
    if isinstance(data, list):          # prepared images.json
        return _from_prepared_list(src, data, images_root)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images or not isinstance(images[0], dict):
        raise InputError(f"{src}: expected a Karpathy or COCO json with a non-empty 'images' list")
    items = []
    if "filename" in images[0]:                                   # Karpathy
        first = os.path.join(images[0].get("filepath", ""), images[0]["filename"])
        root = _pick_root(src, first, images_root)
        for k, im in enumerate(images):
            if "filename" not in im:
                raise InputError(f"{src}: images[{k}] lacks 'filename'")
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            items.append(InputImage(karpathy_image_id(im), str(root / rel)))
    elif "file_name" in images[0]:                                # COCO instances / captions
        root = _pick_root(src, images[0]["file_name"], images_root)
        for k, im in enumerate(images):
            if "file_name" not in im or "id" not in im:
                raise InputError(f"{src}: images[{k}] lacks 'file_name' or 'id'")
            items.append(InputImage(str(im["id"]), str(root / im["file_name"])))
    else:
        raise InputError(f"{src}: images[0] has neither 'filename' (Karpathy) nor 'file_name' (COCO)")
    return _check_unique(items, str(src))


def _from_prepared_list(src: Path, data: list, images_root: str | None) -> list[InputImage]:
    if images_root is None:
        man = src.parent / "manifest.json"
        if man.is_file():
            images_root = json.loads(man.read_text(encoding="utf-8")).get("images_root")
    if images_root is None:
        raise InputError(f"{src}: no manifest.json beside it to give images_root; pass --images-root DIR")
    try:
        items = [InputImage(str(im["id"]), str(Path(images_root) / im["file"])) for im in data]
    except (TypeError, KeyError):
        raise InputError(f"{src}: expected a list of {{'id', 'file'}} objects "
                         f"(glied prepare's images.json)") from None
    return _check_unique(items, str(src))


def enumerate_inputs(inp: str | os.PathLike, images_root: str | None = None) -> list[InputImage]:
    """All images of INPUT (see module docstring), sorted by id; raises InputError with the fix."""
    p = os.fspath(inp)
    if os.path.isdir(p):
        if all(os.path.isfile(os.path.join(p, n)) for n in ("images.json", "manifest.json")):
            return from_json(os.path.join(p, "images.json"), images_root)
        return from_folder(p)
    if not os.path.exists(p):
        raise InputError(f"{p}: no such file or folder (give a folder of images, a list file or a json)")
    if p.lower().endswith(".json"):
        return from_json(p, images_root)
    return from_list(p, images_root)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def shard(items: list[InputImage], i: int, n: int) -> list[InputImage]:
    """Items of shard i of n: CRC32(id) % n == i (stable, balanced, independent of the list's order)."""
    if n == 1:
        return items
    return [it for it in items if zlib.crc32(it.id.encode("utf-8")) % n == i]
