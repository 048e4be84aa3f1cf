"""Reading Karpathy-split caption files: ``dataset_coco.json``, ``dataset_flickr30k.json`` and the shapes world's.

Layout (Karpathy, as used by ImageCaptioning.pytorch and most captioning work)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "cocoid": 391895, "imgid": 0, "split": "train|restval|val|test", "sentids": [...],
      "sentences": [{"tokens": [...], "raw": "...", "imgid": 0, "sentid": 0}, ...]}, ...]}

Flickr30k has no ``filepath`` and no ``cocoid``; its stable id is the file name's stem (the Flickr photo id).
Ids are taken from fields, never guessed from file names except that documented Flickr30k rule.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from glied.errors import InputError

SPLITS = ("train", "val", "test")
_TOKEN_RE = re.compile(r"[\W_]+")      # anything but Unicode letters and digits separates words


def tokenize(raw: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace (the Karpathy preprocessing of ``raw``).

    Words are Unicode letters and digits (after NFC normalisation), so "café", "naïve" and CJK words are
    kept whole; on ASCII text this is exactly Karpathy's ``[^a-z0-9]`` rule."""
    return [t for t in _TOKEN_RE.sub(" ", unicodedata.normalize("NFC", raw).lower()).split() if t]


def _clean_token(w: str) -> str:
    return _TOKEN_RE.sub("", unicodedata.normalize("NFC", w).lower())


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy file with its normalised fields."""

    id: str
    file: str  # relative to the images root: "filepath/filename" or "filename"
    split: str  # train | val | test (restval folded into train)
    source_split: str
    sentences: tuple[tuple[str, ...], ...]  # tokenised
    raws: tuple[str, ...]


def image_id(im: dict, dataset: str = "") -> str:
    """The stable id of a Karpathy image entry: ``str(cocoid)`` (COCO), else the file name's stem (Flickr), else
    ``str(imgid)``. It is the key that joins the feature cache to the prepared data."""
    if "cocoid" in im:
        return str(im["cocoid"])
    if dataset.startswith("flickr") or "filename" in im:
        return Path(im["filename"]).stem
    return str(im["imgid"])


def read_karpathy(path: str | Path) -> tuple[str, list[KarpathyImage], dict[str, int]]:
    """Parse a Karpathy-format captions file into (dataset name, images, skipped).

    A caption that is empty after tokenising (COCO's has one that is only ".") is skipped, and an image left
    without captions too; ``skipped`` counts them: {"captions": n, "images": m}.

    Raises:
        InputError: the file is missing, is not JSON, has no ``images`` list, an entry lacks ``filename`` or
            ``split``, ids repeat, or every caption is empty after tokenising. The message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such captions file (give a Karpathy-format json such as dataset_coco.json)")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a UTF-8 text file; expected a Karpathy-format json") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{p}: not a Karpathy-format file: expected a top-level object with an 'images' list")
    if not data["images"]:
        raise InputError(f"{p}: the 'images' list is empty")
    dataset = str(data.get("dataset", "unknown"))
    images: list[KarpathyImage] = []
    seen: set[str] = set()
    skipped = {"captions": 0, "images": 0}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or "split" not in im:
            raise InputError(f"{p}: images[{k}] lacks 'filename' or 'split'")
        sents = im.get("sentences") or []
        if not sents:
            raise InputError(f"{p}: images[{k}] ({im['filename']}) has no sentences")
        iid = image_id(im, dataset)
        if iid in seen:
            raise InputError(f"{p}: image id {iid} appears twice (images[{k}], {im['filename']})")
        seen.add(iid)
        toks, raws = [], []
        for s in sents:
            if not isinstance(s, dict):
                raise InputError(f"{p}: images[{k}] ({im['filename']}): a sentence is not an object")
            raw = str(s.get("raw", " ".join(map(str, s.get("tokens", [])))))
            t = ([w for w in (_clean_token(str(w)) for w in s["tokens"]) if w] if s.get("tokens")
                 else tokenize(raw))
            if not t:
                skipped["captions"] += 1
                continue
            toks.append(tuple(t))
            raws.append(raw)
        if not toks:
            skipped["images"] += 1
            continue
        src = str(im["split"])
        split = "train" if src == "restval" else src
        if split not in SPLITS:
            raise InputError(f"{p}: images[{k}] has unknown split {src!r} (expected train, restval, val, test)")
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        images.append(KarpathyImage(iid, rel, split, src, tuple(toks), tuple(raws)))
    if not images:
        raise InputError(f"{p}: all {skipped['captions']} captions are empty after tokenising (no letters or "
                         "digits); nothing to prepare")
    return dataset, images, skipped
