"""COCO-format detection data with per-box attributes, for training and evaluating the small bottom-up model.

Input contract (``instances.json``, as ``glied make-shapes`` writes it; any COCO detection json works):
    images[]:      {id, file_name (relative to the images directory), width, height, [split]}
    categories[]:  {id, name}; category ids map to contiguous class indices 0..C-1 in ascending id order
                   (background is index C, last, as in the bottom-up model)
    attributes[]:  optional {id 0..A-1, name, [type]}; without it, attribute names are the ids as strings
    annotations[]: {id, image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd,
                    attribute_ids [0-based, -1 = padding]}
                   or Visual Genome-style ``attribute`` (1-based, 0 = none)

Crowd boxes are dropped from training (COCOeval still sees them through the raw json). The split of an image
comes from its ``split`` field when present, otherwise from a Karpathy ``captions.json`` (``cocoid`` -> split,
``restval`` counts as train).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glied.datasets.images import load_image
from glied.errors import InputError

SPLITS = ("train", "val", "test")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools)


@dataclass
class DetectionRecord:
    """Ground truth of one image.

    Attributes:
        image_id: COCO image id.
        path: image file.
        width, height: image size in pixels, as the json states it (checked against the file when loaded).
        boxes: (N, 4) float32 x1, y1, x2, y2 in original pixels (continuous convention, x2 = x + w).
        classes: (N,) int64 contiguous class index 0..C-1.
        attributes: (N, L) int64 0-based attribute ids, -1 padded (L >= 1).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    attributes: np.ndarray


@dataclass
class DetectionDataset:
    """Parsed annotations: the records of the chosen split plus the class and attribute vocabularies."""

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]  # contiguous class index -> COCO category id
    attribute_names: list[str]
    attribute_types: list[str] = field(default_factory=list)  # "" where the json gives no type
    coco: dict = field(default_factory=dict, repr=False)  # raw json restricted to the split (COCOeval)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> DetectionRecord:
        return self.records[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def attribute_groups(self) -> dict[str, list[int]]:
        """Attribute ids per type (e.g. {"colour": [0..7], "size": [8, 9]}); {} when the json has no types."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.attribute_types):
            if t:
                groups.setdefault(t, []).append(i)
        return groups

    @classmethod
    def load(cls, annotations: str | Path, images_dir: str | Path, split: str | None = None,
             split_file: str | Path | None = None, check_files: bool = True) -> "DetectionDataset":
        """Read and validate ``annotations``; keep the images of ``split`` (all images when None).

        Raises InputError naming the file and the fix for: unreadable json, unknown category or image ids,
        boxes outside their image or empty, attribute ids out of range, missing image files, an unknown split.
        """
        ann_path = Path(annotations)
        coco = _read_json(ann_path, "annotations")
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.get(key), list):
                raise InputError(f"{ann_path}: not a COCO detection file (no '{key}' list)")
        if not coco["categories"]:
            raise InputError(f"{ann_path}: 'categories' is empty")
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        category_ids = [int(c["id"]) for c in cats]
        class_names = [str(c.get("name", c["id"])) for c in cats]
        cat_index = {cid: k for k, cid in enumerate(category_ids)}

        attrs = sorted(coco.get("attributes") or [], key=lambda a: a["id"])
        if attrs and [int(a["id"]) for a in attrs] != list(range(len(attrs))):
            raise InputError(f"{ann_path}: attribute ids must be 0..A-1 without gaps")
        attribute_names = [str(a.get("name", a["id"])) for a in attrs]
        attribute_types = [str(a.get("type", "")) for a in attrs]

        images = coco["images"]
        if split is not None:
            images = _select_split(images, split, split_file, ann_path)
        images_root = Path(images_dir)
        if check_files and not images_root.is_dir():
            raise InputError(f"images directory {images_root} does not exist; pass --images DIR holding the "
                             f"files named in {ann_path}")
        by_image: dict[int, list[dict]] = {int(im["id"]): [] for im in images}
        all_ids = {int(im["id"]) for im in coco["images"]}
        max_attr = -1
        for a in coco["annotations"]:
            iid = int(a["image_id"])
            if iid not in all_ids:
                raise InputError(f"{ann_path}: annotation {a.get('id')} refers to unknown image id {iid}")
            if iid in by_image:
                by_image[iid].append(a)
        records = []
        for im in images:
            iid = int(im["id"])
            w, h = int(im["width"]), int(im["height"])
            path = images_root / im["file_name"]
            if check_files and not path.is_file():
                raise InputError(f"image file {path} (image id {iid} of {ann_path}) is missing; "
                                 f"check --images")
            boxes, classes, attr_lists = [], [], []
            for a in by_image[iid]:
                if a.get("iscrowd", 0):
                    continue
                if int(a["category_id"]) not in cat_index:
                    raise InputError(f"{ann_path}: annotation {a.get('id')} has unknown category_id "
                                     f"{a['category_id']}")
                x, y, bw, bh = (float(v) for v in a["bbox"])
                if bw <= 0 or bh <= 0 or x < -BOX_TOLERANCE or y < -BOX_TOLERANCE \
                        or x + bw > w + BOX_TOLERANCE or y + bh > h + BOX_TOLERANCE:
                    raise InputError(f"{ann_path}: annotation {a.get('id')} box {a['bbox']} is empty or "
                                     f"outside its {w}x{h} image {im['file_name']}; fix or remove it")
                boxes.append([max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)])
                classes.append(cat_index[int(a["category_id"])])
                ids = _attribute_ids(a)
                max_attr = max([max_attr, *ids])
                attr_lists.append(ids)
            width = max([1, *(len(x) for x in attr_lists)])
            attributes = np.full((len(attr_lists), width), -1, dtype=np.int64)
            for k, ids in enumerate(attr_lists):
                attributes[k, :len(ids)] = ids
            records.append(DetectionRecord(
                image_id=iid, path=path, width=w, height=h,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                classes=np.asarray(classes, dtype=np.int64), attributes=attributes))
        if attribute_names and max_attr >= len(attribute_names):
            raise InputError(f"{ann_path}: attribute id {max_attr} is out of range (the file lists "
                             f"{len(attribute_names)} attributes)")
        if not attribute_names and max_attr >= 0:
            attribute_names = [str(i) for i in range(max_attr + 1)]
            attribute_types = [""] * len(attribute_names)
        keep = {r.image_id for r in records}
        sub = dict(coco, images=images,
                   annotations=[a for a in coco["annotations"] if int(a["image_id"]) in keep])
        return cls(records=records, class_names=class_names, category_ids=category_ids,
                   attribute_names=attribute_names, attribute_types=attribute_types, coco=sub,
                   source=str(ann_path))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} is not valid JSON ({e})") from None


def _attribute_ids(ann: dict) -> list[int]:
    """0-based attribute ids of one annotation: ``attribute_ids`` (0-based) or VG ``attribute`` (1-based)."""
    if "attribute_ids" in ann:
        ids = [int(v) for v in ann["attribute_ids"] if int(v) >= 0]
    elif "attribute" in ann:
        ids = [int(v) - 1 for v in ann["attribute"] if int(v) > 0]
    else:
        ids = []
    return ids


def _select_split(images: list[dict], split: str, split_file: str | Path | None,
                  ann_path: Path) -> list[dict]:
    """Images whose split is ``split``: their own ``split`` field, else the Karpathy captions file."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split_file is not None:
        karpathy = _read_json(Path(split_file), "split")
        try:
            of = {int(im["cocoid"]): im["split"] for im in karpathy["images"]}
        except (KeyError, TypeError, ValueError):
            raise InputError(f"split file {split_file} is not a Karpathy captions json with cocoid and split "
                             f"per image") from None
        of = {k: ("train" if v == "restval" else v) for k, v in of.items()}
        return [im for im in images if of.get(int(im["id"])) == split]
    if images and all("split" in im for im in images):
        return [im for im in images if ("train" if im["split"] == "restval" else im["split"]) == split]
    raise InputError(f"{ann_path} has no 'split' per image; pass --split-file captions.json (Karpathy "
                     f"format) to choose the {split} images")


def read_image(record: DetectionRecord) -> np.ndarray:
    """BGR uint8 (H, W, 3) of a record (EXIF-oriented, through :func:`glied.datasets.images.load_image`,
    which refuses truncated files); InputError when unreadable or of another size than the json says."""
    img = load_image(record.path, min_side=1)
    if img.shape[0] != record.height or img.shape[1] != record.width:
        raise InputError(f"image {record.path} is {img.shape[1]}x{img.shape[0]} but the annotations say "
                         f"{record.width}x{record.height}")
    return img


class ImageCache:
    """Decoded images of a training set kept in memory (up to ``max_bytes``; later images are read each time),
    so that epochs after the first skip the JPEG decoding. ``cache(record)`` -> BGR uint8 (H, W, 3), as
    :func:`read_image`; callers must not modify the array in place (``hflip`` and the transform copy)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._images: dict[Path, np.ndarray] = {}

    def __call__(self, record: DetectionRecord) -> np.ndarray:
        img = self._images.get(record.path)
        if img is None:
            img = read_image(record)
            if self.nbytes + img.nbytes <= self.max_bytes:
                img.flags.writeable = False
                self._images[record.path] = img
                self.nbytes += img.nbytes
        return img


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a BGR image (H, W, 3) and its boxes (N, 4) x1y1x2y2 (continuous convention: x -> W - x)."""
    w = img.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return np.ascontiguousarray(img[:, ::-1]), flipped


def make_batch(records: list[DetectionRecord], transform, flips: list[bool] | None = None,
               size_divisor: int = 16, load=read_image):
    """Load, optionally mirror, transform and zero-pad a batch for training.

    ``transform`` is the model's own (``model.transform``): BGR uint8 (H, W, 3) -> ((1, 3, h, w) float tensor,
    info with ``scale_xy`` = (sx, sy) from original to input pixels; a plain (sx, sy) pair works too).
    ``load`` reads a record's image (``read_image``, or an :class:`ImageCache`).
    Returns ``images`` (B, 3, Hp, Wp) padded to a multiple of ``size_divisor``, ``sizes`` [(h, w)] of each
    image inside the batch, and ``targets`` [{"boxes" (G, 4) in input pixels, "classes" (G,),
    "attributes" (G, L)}].
    """
    import torch

    tensors, sizes, targets = [], [], []
    for k, rec in enumerate(records):
        img, boxes = load(rec), rec.boxes
        if flips is not None and flips[k]:
            img, boxes = hflip(img, boxes)
        x, info = transform(img)  # (1, 3, h, w)
        sx, sy = (float(v) for v in getattr(info, "scale_xy", info))
        tensors.append(x[0])
        sizes.append((int(x.shape[2]), int(x.shape[3])))
        scaled = torch.from_numpy(boxes * np.array([sx, sy, sx, sy], dtype=np.float32))
        targets.append({"boxes": scaled, "classes": torch.from_numpy(rec.classes),
                        "attributes": torch.from_numpy(rec.attributes)})
    hp = -(-max(h for h, _ in sizes) // size_divisor) * size_divisor
    wp = -(-max(w for _, w in sizes) // size_divisor) * size_divisor
    images = tensors[0].new_zeros((len(tensors), 3, hp, wp))  # (B, 3, Hp, Wp)
    for k, x in enumerate(tensors):
        images[k, :, : x.shape[1], : x.shape[2]] = x
    return images, sizes, targets
