"""Prepared caption data: vocabulary, encoded captions, split lists and evaluation references.

``prepare(captions_json, out_dir)`` writes, into ``out_dir``::

    manifest.json       format, version, dataset, source path + sha256, images_root, config, counts
    vocab.json          {"itow": ["<pad>", "<bos>", "<eos>", "<unk>", word, ...]}
    images.json         [{"id", "file", "split", "source_split", "sentences": [[tok, ...], ...]}, ...]
    labels.npz          labels (S, max_length) int32 0-padded, lengths (S,), image_index (S,)
    refs_val.json, refs_test.json   COCO caption ground truth for pycocoevalcap

Vocabulary rule (ImageCaptioning.pytorch's): keep words seen **more than** ``count_threshold`` times in the
training split (train + restval); all others map to ``<unk>``. Captions longer than ``max_length`` are
truncated (counted in the manifest).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glied.datasets.karpathy import read_karpathy
from glied.errors import ConfigError, InputError
from glied.fileio import sha256_file, write_atomic, write_json_atomic
from glied.tokens import SPECIALS, UNK, ids_to_text

FORMAT = "glied-prepared"
VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    count_threshold: int = 5
    max_length: int = 16

    def validate(self) -> None:
        if self.count_threshold < 0:
            raise ConfigError(f"count threshold must be >= 0 (got {self.count_threshold})")
        if self.max_length < 1:
            raise ConfigError(f"max length must be >= 1 (got {self.max_length})")


def prepare(captions_json: str | os.PathLike, out_dir: str | os.PathLike, cfg: PrepareConfig = PrepareConfig(),
            images_root: str | os.PathLike | None = None) -> dict:
    """Turn a Karpathy-format file into prepared data in ``out_dir``; returns the manifest.

    ``images_root`` is the folder that ``filepath/filename`` resolve against (default: the captions file's
    folder). Every file is written atomically; the manifest is written last, so a directory with a manifest
    is complete.
    """
    cfg.validate()
    src = Path(captions_json)
    dataset, images, skipped = read_karpathy(src)
    train = [im for im in images if im.split == "train"]
    if not train:
        raise InputError(f"{src}: no image is in the train (or restval) split")
    counts = Counter(w for im in train for s in im.sentences for w in s)
    words = sorted((w for w, c in counts.items() if c > cfg.count_threshold), key=lambda w: (-counts[w], w))
    itow = SPECIALS + words
    wtoi = {w: i for i, w in enumerate(itow)}

    n_sent = sum(len(im.sentences) for im in images)
    labels = np.zeros((n_sent, cfg.max_length), np.int32)
    lengths = np.zeros(n_sent, np.int32)
    image_index = np.zeros(n_sent, np.int32)
    k = truncated = 0
    for i, im in enumerate(images):
        for s in im.sentences:
            ids = [wtoi.get(w, UNK) for w in s][: cfg.max_length]
            truncated += len(s) > cfg.max_length
            labels[k, : len(ids)] = ids
            lengths[k] = len(ids)
            image_index[k] = i
            k += 1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_manifest = out / "manifest.json"
    if old_manifest.exists():  # being rewritten: mark incomplete until the new manifest lands
        old_manifest.unlink()
    root = Path(images_root) if images_root is not None else src.parent
    write_json_atomic(out / "vocab.json", {"itow": itow})
    write_json_atomic(out / "images.json", [
        {"id": im.id, "file": im.file, "split": im.split, "source_split": im.source_split,
         "sentences": [list(s) for s in im.sentences]} for im in images])

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, labels=labels, lengths=lengths, image_index=image_index)
    write_atomic(out / "labels.npz", write_npz)
    for split in ("val", "test"):
        sel = [im for im in images if im.split == split]
        anns, ann_id = [], 0
        for im in sel:
            for raw in im.raws:
                anns.append({"image_id": im.id, "id": ann_id, "caption": raw})
                ann_id += 1
        write_json_atomic(out / f"refs_{split}.json", {
            "info": {"description": f"{dataset} {split} references"}, "licenses": [], "type": "captions",
            "images": [{"id": im.id} for im in sel], "annotations": anns})
    manifest = {
        "format": FORMAT, "version": VERSION, "dataset": dataset, "source": str(src.resolve()),
        "source_sha256": sha256_file(src), "images_root": str(root.resolve()), "config": asdict(cfg),
        "counts": {"images": {s: sum(im.split == s for im in images) for s in ("train", "val", "test")},
                   "sentences": n_sent, "vocab": len(itow), "truncated_sentences": int(truncated),
                   "empty_sentences_skipped": skipped["captions"], "images_without_captions": skipped["images"],
                   "train_tokens_unk": int(sum(c for w, c in counts.items() if w not in wtoi))},
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


class PreparedData:
    """Read-only view of a prepared directory (see the module docstring for the files)."""

    def __init__(self, root: Path, manifest: dict, vocab: list[str], images: list[dict], labels: np.ndarray,
                 lengths: np.ndarray, image_index: np.ndarray):
        self.root = root
        self.manifest = manifest
        self.vocab = vocab
        self.images = images
        self.labels = labels
        self.lengths = lengths
        self.image_index = image_index
        self.wtoi = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreparedData":
        """Open a prepared directory. Raises InputError naming the directory if it is missing or incomplete."""
        root = Path(path)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise InputError(f"{root}: not a prepared data directory (no manifest.json); "
                             "run `glied prepare CAPTIONS_JSON --out DIR` first")
        manifest = json.loads(mf.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise InputError(f"{mf}: format {manifest.get('format')} v{manifest.get('version')} is not "
                             f"{FORMAT} v{VERSION}; re-run `glied prepare`")
        try:
            vocab = json.loads((root / "vocab.json").read_text())["itow"]
            images = json.loads((root / "images.json").read_text())
            with np.load(root / "labels.npz") as z:
                labels, lengths, image_index = z["labels"], z["lengths"], z["image_index"]
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{root}: prepared data is incomplete or damaged ({e}); re-run `glied prepare`") from None
        return cls(root, manifest, vocab, images, labels, lengths, image_index)

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    def image_path(self, i: int) -> Path:
        return self.images_root / self.images[i]["file"]

    def split_indices(self, split: str) -> list[int]:
        """Indices into ``images`` of one split (train includes restval)."""
        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {split!r}: use train, val or test")
        return [i for i, im in enumerate(self.images) if im["split"] == split]

    def sentence_indices(self, image_indices: list[int]) -> np.ndarray:
        """Rows of ``labels`` belonging to the given images."""
        mask = np.isin(self.image_index, np.asarray(image_indices, dtype=np.int32))
        return np.nonzero(mask)[0]

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.wtoi.get(w, UNK) for w in tokens]

    def decode(self, ids) -> str:
        """Word ids to text, stopping at <eos> or <pad>, skipping <bos> (:func:`glied.tokens.ids_to_text`)."""
        return ids_to_text(ids, self.vocab)

    @property
    def refs_path(self) -> dict[str, Path]:
        return {s: self.root / f"refs_{s}.json" for s in ("val", "test")}
