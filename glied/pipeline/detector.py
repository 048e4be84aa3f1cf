"""``glied train-detector`` / ``glied evaluate-detector``: train the small bottom-up model on COCO-format
boxes with attributes (the shapes world), and measure box mAP@0.5 and attribute accuracy.

A run directory holds ``checkpoint.pt`` (model + optimiser + config + vocabularies, rewritten atomically after
every epoch), ``config.json`` (the same settings, readable), ``log.jsonl`` (one line per logged step and
epoch) and, after evaluation, ``metrics_<split>.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from glied.errors import ConfigError, InputError
from glied.fileio import write_json_atomic

CHECKPOINT = "checkpoint.pt"
PRESETS = ("small",)
# Settings on top of BottomUpConfig.small for training from scratch on the shapes world (measured; see
# docs/architecture.md, "Detector on the shapes world"): input 256 so that a small shape spans 2-3 res4
# cells, a deeper but narrow backbone with the stride in the 3x3 conv (the caffe stride-in-1x1 skips 3/4 of the pixels with no spatial mixing, which hurts
# when nothing is pretrained), and base width 8 so that the per-RoI res5 stays cheap on a CPU.
SHAPES_SMALL = {"base_width": 8, "min_size": 256, "max_size": 256, "stride_in_1x1": False,
                "stage_blocks": (2, 2, 2, 1), "caffe_maxpool": False}


def model_config_for(preset: str, num_classes: int, num_attributes: int, input_size: int | None = None,
                     model_overrides: dict | None = None) -> dict:
    """The model config dict of a named preset sized to the data's classes and attributes."""
    from glied.extractors.bottomup.config import BottomUpConfig

    if preset not in PRESETS:
        raise ConfigError(f"unknown detector config {preset!r}; trainable presets: {', '.join(PRESETS)}")
    kwargs = {**SHAPES_SMALL, **(model_overrides or {})}
    if input_size is not None:
        kwargs.update(min_size=input_size, max_size=input_size)
    return BottomUpConfig.small(num_classes, num_attributes, **kwargs).to_dict()


def train_detector(annotations: str, images: str, out: str, *, preset: str = "small",
                   epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                   resume: bool = False, seed: int | None = None,
                   split: str | None = "train", split_file: str | None = None, input_size: int | None = None,
                   max_images: int | None = None, threads: int | None = None,
                   overrides: dict | None = None, model_overrides: dict | None = None,
                   log: Callable[[str], None] = print, model=None) -> dict:
    """Train a detector into the run directory ``out``; returns a summary dict (epochs, iterations, seconds).

    ``split`` selects the training images (their ``split`` field or the Karpathy ``split_file``); None trains
    on every image. ``overrides`` sets other DetectorTrainConfig fields (e.g. roi_batch_per_image);
    ``model_overrides`` BottomUpConfig fields on top of the preset. ``threads`` sets torch's intra-op threads
    (on a CPU shared with other jobs, 1 thread can be several times faster than 2).
    ``model`` injects a ready module (tests); otherwise it is built from the preset (or, with ``resume``, from
    the checkpoint). ``epochs``, ``batch_size``, ``lr``, ``seed``, ``input_size`` and ``overrides``: None or
    absent = the defaults, or with ``resume`` the run's stored settings; a given value that conflicts with
    the stored one is refused (:func:`glied.checkpoint.resume_settings`).
    """
    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from glied.extractors.bottomup.data import DetectionDataset, ImageCache, make_batch
    from glied.extractors.bottomup.training import DetectorTrainConfig, lr_at
    from glied.extractors.bottomup.weights import (checkpoint_vocab, load_checkpoint, model_from_checkpoint,
                                                   save_checkpoint)

    run = Path(out)
    ckpt_path = run / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{ckpt_path} already exists; pass --resume to continue it or choose another --out")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")

    if split is not None:
        try:
            data = DetectionDataset.load(annotations, images, split=split, split_file=split_file)
        except InputError as e:
            if "no 'split' per image" not in str(e):
                raise
            log(f"note: {annotations} has no splits and no --split-file was given; training on every image")
            data = DetectionDataset.load(annotations, images)
    else:
        data = DetectionDataset.load(annotations, images)
    if max_images is not None:
        data.records = data.records[:max_images]
    if len(data) == 0:
        raise InputError(f"{annotations}: no images in split {split!r} to train on")
    vocab = {"class_names": data.class_names, "category_ids": data.category_ids,
             "attribute_names": data.attribute_names, "attribute_types": data.attribute_types}

    given = {**(overrides or {}), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    state = None
    if resume:
        from glied.checkpoint import resume_settings

        state = load_checkpoint(ckpt_path)
        if "optimizer" not in state:
            raise ConfigError(f"{ckpt_path} holds no training state (optimizer); start a new run instead")
        old = checkpoint_vocab(state)
        if old["class_names"] != vocab["class_names"] or old["attribute_names"] != vocab["attribute_names"]:
            raise ConfigError(f"{ckpt_path} was trained on other classes or attributes than {annotations}")
        tcfg = DetectorTrainConfig.from_dict(resume_settings(state["extra"]["train_config"], given,
                                                             where=str(ckpt_path)))
        resume_settings({"input_size": state["config"]["min_size"]}, {"input_size": input_size},
                        where=str(ckpt_path))
        model_cfg = state["config"]
        model = model if model is not None else model_from_checkpoint(state).train()
    else:
        tcfg = DetectorTrainConfig.from_dict({k: v for k, v in given.items() if v is not None})
        if model is None:
            model_cfg = model_config_for(preset, data.num_classes, data.num_attributes, input_size,
                                         model_overrides)
            from glied.extractors.bottomup.config import BottomUpConfig
            from glied.extractors.bottomup.model import BottomUpDetector

            torch.manual_seed(tcfg.seed)
            model = BottomUpDetector(BottomUpConfig.from_dict(model_cfg))
        else:
            model_cfg = model.cfg.to_dict()
    tcfg.validate()
    from glied.extractors.precision import resolve_precision

    precision = resolve_precision(tcfg.precision, "cpu")
    log(f"training in {precision.describe()}")
    if precision.warning:
        log(f"warning: {precision.warning}")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", {"model": model_cfg, "train": tcfg.to_dict(), "vocab": vocab,
                                      "annotations": str(Path(annotations).resolve()), "images": len(data)},
                      indent=2)

    # channels-last activations: the same maths, faster convolutions, batch norms and pooling on CPUs (res5
    # included: its pooled RoI maps are converted once per chunk); decoded photos stay in memory across epochs
    model.to(memory_format=torch.channels_last)
    model.roi_heads.channels_last = True
    load = ImageCache()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start_epoch, it, history = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        extra = state["extra"]
        start_epoch, it, history = extra["epoch"], extra["iteration"], list(extra["history"])
    iters_per_epoch = -(-len(data) // tcfg.batch_size)
    total = tcfg.epochs * iters_per_epoch
    model.train()
    t_start = time.perf_counter()
    with open(run / "log.jsonl", "a") as logf:
        for epoch in range(start_epoch, tcfg.epochs):
            rng = np.random.default_rng([tcfg.seed, epoch])
            gen = torch.Generator().manual_seed(tcfg.seed * 1000 + epoch)
            order = rng.permutation(len(data))
            flips = rng.random(len(data)) < tcfg.hflip_prob
            sums: dict[str, float] = {}
            t_epoch = time.perf_counter()
            for b in range(iters_per_epoch):
                idx = order[b * tcfg.batch_size: (b + 1) * tcfg.batch_size]
                imgs, sizes, targets = make_batch([data.records[i] for i in idx], model.transform,
                                                  [bool(flips[i]) for i in idx], load=load)
                imgs = imgs.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(it, total, tcfg)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.precision == "bf16"):
                    losses = model.losses(imgs, sizes, targets, tcfg, gen)
                loss = sum(losses.values())
                losses = {k: v.detach() for k, v in losses.items()}
                if not torch.isfinite(loss):
                    raise ConfigError(f"training diverged at iteration {it} (loss {loss.item()}); "
                                      f"lower the learning rate (--lr)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                optimizer.step()
                it += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if it % tcfg.log_every == 0 or b == iters_per_epoch - 1:
                    rec = {"epoch": epoch + 1, "iter": it, "lr": optimizer.param_groups[0]["lr"],
                           "loss": loss.item(), **{k: round(float(v), 4) for k, v in losses.items()}}
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    log(f"epoch {epoch + 1}/{tcfg.epochs} iter {it}/{total} loss {loss.item():.3f} "
                        + " ".join(f"{k} {float(v):.3f}" for k, v in losses.items()))
            seconds = time.perf_counter() - t_epoch
            summary = {"epoch": epoch + 1, "iter": it, "seconds": round(seconds, 1),
                       "precision": precision.precision, "images_per_s": round(len(data) / seconds, 2),
                       **{k: round(v / iters_per_epoch, 4) for k, v in sums.items()}}
            history.append(summary)
            save_checkpoint(ckpt_path, model, classes=vocab["class_names"], attributes=vocab["attribute_names"],
                            optimizer=optimizer,
                            extra={"name": preset, "category_ids": list(vocab["category_ids"]),
                                   "attribute_types": list(vocab["attribute_types"]),
                                   "train_config": tcfg.to_dict(), "epoch": epoch + 1, "iteration": it,
                                   "history": history})
            logf.write(json.dumps(summary) + "\n")  # an epoch line in the log means its checkpoint is saved
            logf.flush()
            log(f"epoch {epoch + 1} done in {seconds:.1f} s ({summary['images_per_s']} images/s); "
                f"saved {ckpt_path}")
    return {"run": str(run), "epochs": tcfg.epochs, "iterations": it, "images": len(data),
            "seconds": round(time.perf_counter() - t_start, 1), "history": history}


def evaluate_detector_run(run: str, annotations: str, images: str, *, split: str | None = "test",
                          split_file: str | None = None, batch_size: int = 8, max_images: int | None = None,
                          log: Callable[[str], None] = print) -> dict:
    """Evaluate ``run/checkpoint.pt`` on a split; writes and returns ``run/metrics_<split>.json``'s dict."""
    from glied.extractors.bottomup.data import DetectionDataset
    from glied.extractors.bottomup.evaluation import evaluate_detector
    from glied.extractors.bottomup.weights import checkpoint_vocab, load_checkpoint, model_from_checkpoint

    state = load_checkpoint(run)
    ckpt_path = Path(state["path"])
    vocab = checkpoint_vocab(state)
    data = DetectionDataset.load(annotations, images, split=split, split_file=split_file)
    if max_images is not None:
        data.records = data.records[:max_images]
        keep = {r.image_id for r in data.records}
        data.coco = dict(data.coco, images=[im for im in data.coco["images"] if int(im["id"]) in keep],
                         annotations=[a for a in data.coco["annotations"] if int(a["image_id"]) in keep])
    if len(data) == 0:
        raise InputError(f"{annotations}: no images in split {split!r} to evaluate")
    if data.class_names != vocab["class_names"] or data.attribute_names != vocab["attribute_names"]:
        raise ConfigError(f"{ckpt_path} was trained on other classes or attributes than {annotations}")
    model = model_from_checkpoint(state)
    t0 = time.perf_counter()
    metrics = evaluate_detector(model, data, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    metrics.update({"split": split or "all", "seconds": round(seconds, 1),
                    "images_per_s": round(len(data) / seconds, 2), "checkpoint": str(ckpt_path),
                    "epochs_trained": state.get("extra", {}).get("epoch")})
    out_dir = ckpt_path.parent
    write_json_atomic(out_dir / f"metrics_{split or 'all'}.json", metrics, indent=2)
    per_type = " ".join(f"{k[5:-4]} {v:.4f}" for k, v in metrics.items()
                        if k.startswith("attr_") and k.endswith("_acc") and k != "attr_acc")
    log(f"{len(data)} {split or 'all'} images: box mAP@0.5 {metrics['map50']:.4f} "
        f"(mAP {metrics['map']:.4f}), attribute accuracy {metrics['attr_acc']:.4f} ({per_type})"
        + f", box recall {metrics['box_recall']:.4f}")
    return metrics
