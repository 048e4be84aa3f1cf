"""Readers and a writer for the feature files other bottom-up tools produce (docs/architecture.md, "Bottom-up
feature files").

* Bottom-up TSV (peteanderson80 ``generate_tsv.py``): no header, tab-separated, rows end ``\\r\\n``, fields
  ``image_id, image_w, image_h, num_boxes, boxes, features``; boxes/features are base64 of raw float32,
  (num_boxes, 4) x1,y1,x2,y2 original pixels and (num_boxes, D). Large releases come in parts
  ``.tsv.0``, ``.tsv.1``. Fields are far longer than csv's default limit, which is raised.
* LXMERT's 10-field TSV (``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
  boxes, features``; height before width; ids int64, confidences float32) is recognised by its field count.
* Per-image npz, MILVLG bottom-up-attention.pytorch: keys ``x`` (n, D), ``bbox`` (n, 4), ``num_bbox``,
  ``image_h``, ``image_w``; the pickled ``info`` is never loaded (``allow_pickle=False``).
* Per-image npz, ImageCaptioning.pytorch: ``<id>.npz`` key ``feat`` (n, D), optional ``<box_dir>/<id>.npy``
  boxes; no image size (recorded as 0 = unknown) and, without a box file, boxes are NaN (unknown).

Each reader yields ``(image_id, RegionFeatures)``; object/attribute ids a format lacks are -1 with score 0.
"""
from __future__ import annotations

import base64
import csv
import os
import sys
from typing import Iterator

import numpy as np

from glied.errors import InputError
from glied.records import RegionFeatures

TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
LXMERT_FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features"]


def _raise_field_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _b64(s: str, dtype, n: int, path: str, iid: str, name: str) -> np.ndarray:
    try:
        a = np.frombuffer(base64.b64decode(s), dtype=dtype)
    except (ValueError, TypeError):
        raise InputError(f"{path}: image {iid}: field {name} is not valid base64") from None
    if n and a.size % n:
        raise InputError(f"{path}: image {iid}: field {name} has {a.size} values, "
                         f"not a multiple of {n} boxes")
    return a.reshape(n, -1) if n else a.reshape(0, 0)


def _unknown(n: int) -> dict:
    return {"obj_ids": np.full(n, -1, np.int64), "obj_scores": np.zeros(n, np.float32),
            "attr_ids": np.full(n, -1, np.int64), "attr_scores": np.zeros(n, np.float32)}


def expand_tsv_parts(path: str) -> list[str]:
    """``x.tsv`` -> [x.tsv] if it exists, else its parts [x.tsv.0, x.tsv.1, ...] in numeric order."""
    if os.path.isfile(path):
        return [path]
    parts, k = [], 0
    while os.path.isfile(f"{path}.{k}"):
        parts.append(f"{path}.{k}")
        k += 1
    if not parts:
        raise InputError(f"{path}: no such TSV file (nor parts {path}.0, {path}.1, ...)")
    return parts


def read_tsv(path: str) -> Iterator[tuple[str, RegionFeatures]]:
    """Rows of one bottom-up (6-field) or LXMERT (10-field) TSV file as (image_id, RegionFeatures)."""
    _raise_field_limit()
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        rows = enumerate(csv.reader(f, delimiter="\t"), 1)
        while True:
            try:
                lineno, row = next(rows, (0, None))
            except (UnicodeDecodeError, csv.Error) as e:
                raise InputError(f"{path}: not a readable TSV ({e})") from None
            if row is None:
                return
            if not row:
                continue
            if len(row) == len(TSV_FIELDS):
                d = dict(zip(TSV_FIELDS, row))
                iid, w, h = d["image_id"], d["image_w"], d["image_h"]
            elif len(row) == len(LXMERT_FIELDS):
                d = dict(zip(LXMERT_FIELDS, row))
                iid, w, h = d["img_id"], d["img_w"], d["img_h"]
            else:
                raise InputError(f"{path}: line {lineno} has {len(row)} tab-separated fields; expected "
                                 f"the 6 of a bottom-up TSV ({', '.join(TSV_FIELDS)}) or LXMERT's 10")
            try:
                n = int(d["num_boxes"])
                w, h = int(float(w)), int(float(h))
                if n < 0 or w < 0 or h < 0:
                    raise ValueError
            except (ValueError, OverflowError):
                raise InputError(f"{path}: line {lineno}: num_boxes/image size are not non-negative numbers "
                                 f"(is this a TSV with a header line?)") from None
            if len(row) == len(TSV_FIELDS):
                extra = _unknown(n)
            else:
                extra = {k: _b64(d[f], dt, n, path, iid, f).reshape(n) for k, f, dt in (
                    ("obj_ids", "objects_id", np.int64), ("obj_scores", "objects_conf", np.float32),
                    ("attr_ids", "attrs_id", np.int64), ("attr_scores", "attrs_conf", np.float32))}
            boxes = _b64(d["boxes"], np.float32, n, path, iid, "boxes")
            feats = _b64(d["features"], np.float32, n, path, iid, "features")
            if boxes.shape != (n, 4):
                raise InputError(f"{path}: image {iid}: boxes have shape {boxes.shape}, expected ({n}, 4)")
            yield str(iid), RegionFeatures(boxes=boxes, features=feats, image_w=w, image_h=h, **extra)


def write_tsv(path: str, items) -> int:
    """Write (image_id, RegionFeatures) items as a bottom-up TSV (float32 base64, rows end \\r\\n)."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, delimiter="\t", fieldnames=TSV_FIELDS)
        for iid, r in items:
            w.writerow({"image_id": iid, "image_w": int(r.image_w), "image_h": int(r.image_h),
                        "num_boxes": len(r),
                        "boxes": base64.b64encode(
                            np.ascontiguousarray(r.boxes, np.float32).tobytes()).decode(),
                        "features": base64.b64encode(
                            np.ascontiguousarray(r.features, np.float32).tobytes()).decode()})
            n += 1
    return n


def read_npz_dir(folder: str, box_dir: str | None = None) -> Iterator[tuple[str, RegionFeatures]]:
    """Per-image npz files of ``folder`` (MILVLG or ImageCaptioning layout), sorted by file name."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz"))
    if not names:
        raise InputError(f"{folder}: no .npz files (expected one per image: MILVLG or ImageCaptioning "
                         f"layout)")
    for name in names:
        p = os.path.join(folder, name)
        iid = name[:-4]
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: unreadable npz ({e})") from None
        try:
            iid, r = _npz_entry(z, p, iid, box_dir)
        except (ValueError, TypeError, KeyError, OSError) as e:      # object arrays, bad shapes, bad zips
            raise InputError(f"{p}: unusable npz ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             f"expected numeric arrays x+bbox (MILVLG) or feat (ImageCaptioning)") from None
        yield iid, r


def _npz_entry(z, p: str, iid: str, box_dir: str | None) -> tuple[str, RegionFeatures]:
    """One per-image npz (open ``z``) -> (id, RegionFeatures); ValueError/TypeError on odd arrays."""
    with z:
        keys = set(z.files)
        if {"x", "bbox"} <= keys:
            boxes = np.asarray(z["bbox"], np.float32).reshape(-1, 4)
            n = boxes.shape[0]
            x = np.asarray(z["x"], np.float32)
            if x.shape[0] != n and x.ndim == 2 and x.shape[1] == n:
                x = x.T                                      # stored as (D, n)
            w = int(z["image_w"]) if "image_w" in keys else 0
            h = int(z["image_h"]) if "image_h" in keys else 0
        elif "feat" in keys:
            x = np.asarray(z["feat"], np.float32)
            x = x.reshape(-1, x.shape[-1])
            n = x.shape[0]
            bp = os.path.join(box_dir, iid + ".npy") if box_dir else None
            if bp and os.path.isfile(bp):
                boxes = np.asarray(np.load(bp, allow_pickle=False), np.float32).reshape(-1, 4)
                if boxes.shape[0] != n:
                    raise InputError(f"{bp}: {boxes.shape[0]} boxes but {p} has {n} features")
            else:
                boxes = np.full((n, 4), np.nan, np.float32)
            w = h = 0
        else:
            raise InputError(f"{p}: unknown npz layout (keys {sorted(keys)}); expected x+bbox (MILVLG) "
                             f"or feat (ImageCaptioning)")
    if x.ndim != 2 or x.shape[0] != n:
        raise InputError(f"{p}: features of shape {x.shape} for {n} boxes")
    return iid, RegionFeatures(boxes=boxes, features=x, image_w=w, image_h=h, **_unknown(n))


def sniff_source(path: str) -> str:
    """'tsv' | 'npz' for an import source path (a TSV file or its part stem, or a folder of npz)."""
    if os.path.isdir(path):
        if any(n.endswith(".npz") for n in os.listdir(path)):
            return "npz"
        raise InputError(f"{path}: a folder without .npz files; give TSV files or a folder of per-image npz")
    return "tsv"
