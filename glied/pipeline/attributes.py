"""`glied train-attributes` and `glied evaluate-attributes`: the MIL word detector on prepared data.

Training reads the prepared data's TRAINING captions, builds the K-word vocabulary and the image-level labels
(:mod:`glied.extractors.mil.vocab`) and trains :class:`glied.extractors.mil.model.MilNet`; the val split, when
present, is scored after every epoch. Evaluation scores a run on a held-out split and writes a metrics json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from glied.datasets.prepared import PreparedData
from glied.errors import ConfigError, InputError
from glied.fileio import write_json_atomic

# Per-preset training defaults: (epochs, batch size, learning rate).
TRAIN_DEFAULTS = {"small": (8, 8, 1e-3), "resnet18": (10, 16, 1e-4), "resnet50": (10, 8, 1e-4),
                  "resnet101": (10, 8, 1e-4), "bottomup": (2, 8, 3e-3)}
# How a detector-initialised (bottomup) trunk trains by default: the detector's res5 runs over the map, the
# stem..res4 stay fixed, res5 fine-tunes at a tenth of the head's rate, and every cell also sees the map's mean
# feature. Measured on the demo's shapes world (3000 images, its 8-epoch detector, input 256, 2 epochs, test
# split): shape-word mAP 0.87 (0.80 with res5 fixed, 1 epoch; 0.43 when res2..res4 fine-tune at the head's
# rate without res5; from scratch 0.43); all-word mAP 0.61 with the scene mean, 0.60 without.
BOTTOMUP_DEFAULTS = {"freeze_stages": 4, "trunk_lr_mult": 0.1, "res5": True, "global_context": True}


def _images_root(prep: PreparedData, images: str | Path | None) -> Path:
    root = Path(images) if images is not None else prep.images_root
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found; pass --images DIR (the folder the prepared data's "
                         "image files are relative to)")
    return root


def _split_labels(prep: PreparedData, split: str, vocab: list[str], root: Path, policy: str):
    from glied.extractors.mil.vocab import build_labels

    idx = prep.split_indices(split)
    ls = build_labels([prep.images[i]["sentences"] for i in idx], vocab, empty_policy=policy)
    paths = [root / prep.images[idx[k]]["file"] for k in ls.keep]
    ids = [prep.images[idx[k]]["id"] for k in ls.keep]
    return ls, paths, ids


def train_attributes(data: str | Path, out: str | Path, *, images: str | Path | None = None,
                     config: str | None = None, epochs: int | None = None, batch_size: int | None = None,
                     lr: float | None = None, vocab_size: int | None = None, input_size: int | None = None,
                     stopwords: bool | None = None, empty_policy: str | None = None, resume: bool = False,
                     seed: int | None = None, backbone_weights: str | None = None,
                     init_from: str | Path | None = None, freeze_stages: int | None = None,
                     trunk_lr_mult: float | None = None, res5: bool | None = None,
                     global_context: bool | None = None, device: str = "cpu",
                     log: Callable[[str], None] = print) -> dict:
    """Train a MIL word detector on prepared data ``data`` into the run folder ``out``; returns a summary.

    Settings left None take the preset's defaults (``config``: "small", or "bottomup" with ``init_from``), or
    with ``resume`` the run's stored settings; a given one that conflicts with the stored one is refused
    (:func:`glied.checkpoint.resume_settings`; ``epochs`` may be raised).
    ``init_from``: a detector (the published bottom-up .pkl or a ``glied train-detector`` run) whose trunk
    becomes the MIL trunk (config ``bottomup``, see :mod:`glied.extractors.mil.init_from`); its path and sha256
    are kept in the checkpoint's training config. ``freeze_stages`` / ``trunk_lr_mult``: how that trunk trains;
    ``res5``: the trunk also runs the detector's res5 over the map; ``global_context``: each cell's logits also
    see the map's mean feature (None: ``BOTTOMUP_DEFAULTS`` with ``init_from``, else off).
    """
    import torch

    from glied.checkpoint import resume_settings
    from glied.extractors.mil.checkpoint import LAST_FILE, load_checkpoint
    from glied.extractors.mil.config import MilConfig, MilTrainConfig
    from glied.extractors.mil.train import TrainSet, train_mil
    from glied.extractors.mil.vocab import build_vocab

    prep = PreparedData.load(data)
    root = _images_root(prep, images)
    if config is not None and config not in TRAIN_DEFAULTS:
        raise ConfigError(f"unknown --config {config!r}; use one of {', '.join(TRAIN_DEFAULTS)}")
    stored = load_checkpoint(Path(out) / LAST_FILE) if resume and (Path(out) / LAST_FILE).is_file() else None
    if stored is None:
        config = config or ("bottomup" if init_from is not None else "small")
        if (config == "bottomup") != (init_from is not None):
            raise ConfigError(f"--config {config} {'needs' if init_from is None else 'cannot take'} --init-from: "
                              "the detector-initialised trunk is --config bottomup (the default with --init-from)")
        if init_from is not None:
            freeze_stages = BOTTOMUP_DEFAULTS["freeze_stages"] if freeze_stages is None else freeze_stages
            trunk_lr_mult = BOTTOMUP_DEFAULTS["trunk_lr_mult"] if trunk_lr_mult is None else trunk_lr_mult
            res5 = BOTTOMUP_DEFAULTS["res5"] if res5 is None else res5
            global_context = BOTTOMUP_DEFAULTS["global_context"] if global_context is None else global_context
        elif freeze_stages or res5 or trunk_lr_mult not in (None, 1.0):
            raise ConfigError("--freeze-stages, --trunk-lr-mult and --res5 shape a detector-initialised trunk; "
                              "pass --init-from DETECTOR")
    trunk = None
    if init_from is not None:  # on --resume too: its config must match the run's (the weights come from last.pt)
        from glied.extractors.mil.init_from import load_detector_trunk
        trunk = load_detector_trunk(init_from)
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        from glied.errors import WeightsError
        raise WeightsError(f"{backbone_weights}: backbone weights file not found; pass an existing torchvision "
                           "ResNet state dict, or leave --backbone-weights out to start from random weights")
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "vocab_size": vocab_size,
             "stopwords": stopwords, "empty_label_policy": empty_policy, "seed": seed,
             "backbone_weights": str(backbone_weights) if backbone_weights else None,
             "freeze_stages": freeze_stages, "trunk_lr_mult": trunk_lr_mult}
    if stored is not None:  # --resume: the run's own settings; a conflicting flag is refused
        where = stored["path"]
        tcfg = MilTrainConfig.from_dict(resume_settings(stored["train_config"], given, where=where,
                                                        flags={"empty_label_policy": "--empty-labels"}))
        scfg = stored["config"]
        resume_settings({"config": scfg["arch"], "input_size": scfg["input_size"]},
                        {"config": config, "input_size": input_size}, where=where)
        if trunk is not None and json.dumps(trunk.config, sort_keys=True) != json.dumps(scfg.get("trunk"),
                                                                                     sort_keys=True):
            raise ConfigError(f"{where}: --init-from {init_from} is not the detector this run's trunk came from; "
                              "drop the flag or start a new run")
        config, input_size = scfg["arch"], scfg["input_size"]
    else:
        d_epochs, d_batch, d_lr = TRAIN_DEFAULTS[config]
        tcfg = MilTrainConfig(**{**{k: v for k, v in given.items() if v is not None},
                                 "epochs": epochs or d_epochs, "batch_size": batch_size or d_batch,
                                 "lr": lr or d_lr, "init_from": trunk.source if trunk is not None else None})
    train_idx = prep.split_indices("train")
    if not train_idx:
        raise InputError(f"{data}: the prepared data has no training image")
    vocab = build_vocab([prep.images[i]["sentences"] for i in train_idx], tcfg.vocab_size,
                        stopwords=tcfg.stopwords, min_count=tcfg.min_count)
    tr, tr_paths, _ = _split_labels(prep, "train", vocab, root, tcfg.empty_label_policy)
    stats = {"train_images": len(train_idx), "train_kept": len(tr.keep), "no_captions": len(tr.no_captions),
             "no_vocab_word": len(tr.no_vocab_word), "empty_label_policy": tcfg.empty_label_policy}
    if tr.no_captions:
        log(f"warning: {len(tr.no_captions)} training image(s) have no caption and were dropped")
    if tr.no_vocab_word:
        what = "kept as all-negative examples" if tcfg.empty_label_policy == "keep" else "dropped"
        log(f"warning: {len(tr.no_vocab_word)} training image(s) have no vocabulary word in their captions; {what}")
    val_set = None
    if prep.split_indices("val"):
        va, va_paths, _ = _split_labels(prep, "val", vocab, root, "keep")
        val_set = TrainSet(va_paths, va.labels, vocab)
    if stored is not None:
        resume_settings({"res5": bool(stored["config"].get("trunk_res5")),
                         "global_context": bool(stored["config"].get("global_context"))},
                        {"res5": res5, "global_context": global_context}, where=stored["path"])
    cfg = (MilConfig.from_dict(stored["config"]) if stored is not None
           else MilConfig.preset(config, len(vocab), input_size=input_size, trunk=trunk.config if trunk else None,
                                 trunk_res5=res5 or None, global_context=global_context or None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if trunk is not None:
        log(f"MIL trunk from {trunk.source.get('kind')} {trunk.source.get('path')} (sha256 "
            f"{str(trunk.source.get('sha256'))[:12]}...)")
    log(f"MIL {config}: {len(vocab)} words, {len(tr_paths)} training images, input {cfg.input_size}, "
        f"{tcfg.epochs} epochs x batch {tcfg.batch_size}, lr {tcfg.lr}, {torch.get_num_threads()} threads")
    summary = train_mil(TrainSet(tr_paths, tr.labels, vocab), out, cfg, tcfg, val=val_set, resume=resume,
                        device=device, label_stats=stats, trunk_init=trunk if not resume else None, log=log)
    write_json_atomic(out / "config.json", {"data": str(Path(data).resolve()), "images_root": str(root),
                                            "model": cfg.to_dict(), "train": tcfg.to_dict(),
                                            "label_stats": stats}, indent=1)
    return summary | {"label_stats": stats, "out": str(out)}


def concept_groups(prep: PreparedData) -> dict[str, list[str]] | None:
    """The visual concept words of a shapes world, from the ``instances.json`` next to the captions file:
    {"concepts": all of them, "shape": the shape names, and one group per attribute type ("colour", "size")},
    or None for other datasets."""
    inst = Path(prep.manifest.get("source", "")).parent / "instances.json"
    if prep.manifest.get("dataset") != "shapes" or not inst.is_file():
        return None
    try:
        d = json.loads(inst.read_text())
        groups = {"shape": [c["name"] for c in d["categories"]]}
        for a in d.get("attributes", []):
            groups.setdefault(a.get("type") or "attribute", []).append(a["name"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"concepts": [w for ws in groups.values() for w in ws]} | groups


def _read_words(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: word list not found (one word per line, or a json list)")
    text = p.read_text()
    try:
        words = json.loads(text)
    except ValueError:
        words = text.split()
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise InputError(f"{p}: expected one word per line or a json list of strings")
    return words


def evaluate_attributes(run: str | Path, data: str | Path, *, split: str = "test",
                        top_ks: Sequence[int] = (5, 10, 50), images: str | Path | None = None,
                        words: str | Path | None = None,
                        out: str | Path | None = None, batch_size: int = 32, device: str = "cpu",
                        log: Callable[[str], None] = print) -> dict:
    """Score a trained run on ``split`` of prepared data; writes ``out`` (default RUN/metrics_<split>.json).

    Labels use the run's own vocabulary; images without captions are skipped, images whose captions have no
    vocabulary word count as all-negative. Besides the mAP over every vocabulary word (Fang's figure), a
    subset mAP is reported for ``words`` (a file: one word per line or a json list) and, for a shapes world,
    for its concept words (shape, colour and size names, together and per group): many shapes-world caption
    words ("we", "see", which pair a relation names, ...) are drawn at random by the caption grammar and cannot
    be predicted from the image.
    """
    from glied.extractors.mil.data import read_image
    from glied.extractors.mil.evaluate import word_metrics
    from glied.extractors.mil.inference import load_attribute_extractor

    prep = PreparedData.load(data)
    root = _images_root(prep, images)
    ext = load_attribute_extractor(run, device=device, batch_size=batch_size)
    ls, paths, _ = _split_labels(prep, split, ext.vocab, root, "keep")
    if not paths:
        raise InputError(f"{data}: no image with captions in the {split} split")
    probs, t_model = [], 0.0
    for s in range(0, len(paths), batch_size):
        batch = [read_image(p) for p in paths[s:s + batch_size]]
        t0 = time.perf_counter()
        probs.append(ext.probs(batch))
        t_model += time.perf_counter() - t0
    subsets = dict(concept_groups(prep) or {})
    if words is not None:
        subsets["words"] = _read_words(words)
    metrics = word_metrics(np.concatenate(probs), ls.labels, ext.vocab, top_ks, subsets)
    metrics = {"split": split, "run": str(run), "identity": {k: v for k, v in ext.identity().items() if k != "vocab"},
               "seconds_per_image": t_model / len(paths), "no_vocab_word_images": len(ls.no_vocab_word),
               "no_caption_images": len(ls.no_captions)} | metrics
    dest = Path(out) if out is not None else (Path(run) if Path(run).is_dir() else Path(run).parent) / f"metrics_{split}.json"
    write_json_atomic(dest, metrics, indent=1)
    metrics["written_to"] = str(dest)
    return metrics

