"""Training loop of the MIL word detector: plain Adam, flips, noisy-OR BCE, a checkpoint after every epoch.

Differences from Fang et al.'s Caffe recipe (SGD, lr 1.56e-5, momentum 0.99, 240k single-image iterations,
conv1-2 frozen, fc8 lr x10, loss weight 20) are deliberate: Adam with a cosine decay over mini-batches trains
the small shapes-world model in minutes; the loss and labels are Fang's.

Known limitation (measured on the shapes world, small preset, from random weights): colour and size words are
learned in the first epoch (AP ~0.99 / ~0.92) but shape words stay near their label prior for at least
~6000 steps. The same trunk learns shapes within ~150 steps on single-object crops, and within ~600 when
colour words are trained alongside, so the easy words appear to starve the shape features while the bag
ambiguity of multi-object images dilutes their signal. Fang start from ImageNet weights; the ResNet presets
accept a local ``--backbone-weights`` file for that, and ``--init-from DETECTOR`` starts from the bottom-up
detector's trunk (:mod:`glied.extractors.mil.init_from`): on the demo's shapes world, with its own detector,
shape-word mAP 0.87 after 2 epochs (from scratch: 0.43).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from glied.errors import ConfigError
from glied.fileio import write_json_atomic
from glied.extractors.mil.checkpoint import LAST_FILE, MODEL_FILE, load_checkpoint, save_checkpoint
from glied.extractors.mil.config import MilConfig, MilTrainConfig
from glied.extractors.mil.data import ImageBank
from glied.extractors.mil.evaluate import word_metrics
from glied.extractors.mil.init_from import copy_trunk
from glied.extractors.mil.model import MilNet, MilTransform, load_backbone_weights


@dataclass
class TrainSet:
    """Images with image-level labels: ``paths[i]`` has multi-hot ``labels[i]`` (V,) over ``vocab``."""

    paths: list[Path]
    labels: np.ndarray
    vocab: list[str]


@torch.inference_mode()
def predict_probs(model: MilNet, bank: ImageBank, indices: Sequence[int] | None = None,
                  batch_size: int = 64) -> np.ndarray:
    """(N, V) noisy-OR probabilities of the bank's images (all, or ``indices``), in eval mode."""
    was = model.training
    model.eval()
    idx = list(range(len(bank))) if indices is None else list(indices)
    out = []
    device = model.head.weight.device
    for s in range(0, len(idx), batch_size):
        x = bank.batch(idx[s:s + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        log_p, _ = model.image_log_probs(model.cell_logits(x))  # (B, V)
        out.append(log_p.exp().float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.cfg.vocab_size), np.float32)


def _random_zoom(x: torch.Tensor, min_area: float, g: torch.Generator) -> torch.Tensor:
    """One random square crop of area fraction in [min_area, 1] for the whole batch, resized back: (B, 3, S, S)."""
    s = x.shape[-1]
    side = int(round(s * math.sqrt(min_area + (1 - min_area) * float(torch.rand(1, generator=g)))))
    if side >= s:
        return x
    y0, x0 = (int(v) for v in torch.randint(0, s - side + 1, (2,), generator=g))
    crop = x[:, :, y0:y0 + side, x0:x0 + side].float()  # (B, 3, side, side)
    return torch.nn.functional.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)


def _check_resume(ckpt: dict, cfg: MilConfig, tcfg: MilTrainConfig, vocab: list[str], path: Path) -> None:
    if ckpt["vocab"] != vocab:
        raise ConfigError(f"{path}: --resume with a different vocabulary (other data or --vocab-size); use a new "
                          "--out folder or the original settings")
    if ckpt["config"] != cfg.to_dict():
        raise ConfigError(f"{path}: --resume with a different model config ({ckpt['config']} vs {cfg.to_dict()}); "
                          "use a new --out folder or the original --config/--input-size")
    old = MilTrainConfig.from_dict(ckpt.get("train_config", {}))
    for key in ("batch_size", "lr", "seed", "flip", "pos_weight", "weight_decay", "freeze_stages", "trunk_lr_mult"):
        if getattr(old, key) != getattr(tcfg, key):
            raise ConfigError(f"{path}: --resume with a different {key} ({getattr(old, key)} -> "
                              f"{getattr(tcfg, key)}); use the original value or a new --out folder")


def train_mil(train: TrainSet, out_dir: str | Path, cfg: MilConfig, tcfg: MilTrainConfig, *,
              val: TrainSet | None = None, resume: bool = False, device: str = "cpu",
              label_stats: dict | None = None, trunk_init: "DetectorTrunk | None" = None,  # noqa: F821
              log: Callable[[str], None] = print) -> dict:
    """Train a MIL detector on ``train``; write ``out_dir/last.pt`` each epoch and ``out_dir/model.pt`` at the end.

    Args:
        train: training images and labels (``cfg.vocab_size`` must equal ``len(train.vocab)``).
        out_dir: the run folder.
        cfg, tcfg: model and training configs.
        val: optional held-out set; its mAP is logged after every epoch.
        resume: continue from ``out_dir/last.pt`` (settings must match) up to ``tcfg.epochs``.
        label_stats: counts to store in the checkpoint (e.g. images without vocabulary words).
        trunk_init: a detector's trunk (:func:`glied.extractors.mil.init_from.load_detector_trunk`) copied into
            the ``bottomup`` trunk before training (not on resume: the weights then come from ``last.pt``).

    Returns:
        summary dict: epochs, seconds, final train loss, per-epoch history, val mAP if any.
    """
    out = Path(out_dir)
    if cfg.vocab_size != len(train.vocab):
        raise ConfigError(f"model vocab_size {cfg.vocab_size} != {len(train.vocab)} vocabulary words")
    if len(train.paths) == 0:
        raise ConfigError("no training image left (empty train split, or every image dropped)")
    torch.manual_seed(tcfg.seed)
    model = MilNet(cfg).to(device, memory_format=torch.channels_last)  # NHWC convs: faster on CPU
    labels = torch.from_numpy(train.labels.astype(np.float32))
    freq = train.labels.mean(0)
    model.init_head_bias(freq)
    if tcfg.backbone_weights:
        n = load_backbone_weights(model, tcfg.backbone_weights)
        log(f"initialised the trunk from {tcfg.backbone_weights} ({n} tensors)")
    if trunk_init is not None and not resume:
        n = copy_trunk(model, trunk_init)
        log(f"initialised the trunk from {trunk_init.source['path']} ({n} tensors)")
    frozen = model.freeze_trunk_stages(tcfg.freeze_stages)
    if frozen:
        log(f"trunk stages kept fixed: {', '.join(frozen)}")
    head = [p for n_, p in model.named_parameters() if not n_.startswith("trunk.")]
    trunk = [p for n_, p in model.named_parameters() if n_.startswith("trunk.") and p.requires_grad]
    groups = [{"params": head, "lr_mult": 1.0}]
    if trunk and tcfg.trunk_lr_mult > 0:
        groups.append({"params": trunk, "lr_mult": tcfg.trunk_lr_mult})
    else:
        for p_ in trunk:
            p_.requires_grad_(False)
    opt = torch.optim.Adam(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    n = len(train.paths)
    steps_per_epoch = math.ceil(n / tcfg.batch_size)
    total_steps = steps_per_epoch * tcfg.epochs
    start_epoch, history = 0, []
    last = out / LAST_FILE
    if resume:
        if not last.is_file():
            raise ConfigError(f"{last}: nothing to resume from; drop --resume to start a new run")
        ckpt = load_checkpoint(last)
        _check_resume(ckpt, cfg, tcfg, train.vocab, last)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        log(f"resuming {last} after epoch {start_epoch}")
    elif (out / MODEL_FILE).exists() or last.exists():
        raise ConfigError(f"{out}: already holds a MIL run; pass --resume to continue it or choose a new --out")

    bank = ImageBank(train.paths, MilTransform(cfg))
    val_bank = ImageBank(val.paths, MilTransform(cfg)) if val is not None and len(val.paths) else None
    model.train()
    t_start = time.perf_counter()
    for epoch in range(start_epoch, tcfg.epochs):
        g = torch.Generator().manual_seed(tcfg.seed * 1000003 + epoch)
        perm = torch.randperm(n, generator=g)
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total_steps))  # cosine to 5% of lr
            for group in opt.param_groups:
                group["lr"] = group["lr_mult"] * tcfg.lr * decay
            idx = perm[b * tcfg.batch_size:(b + 1) * tcfg.batch_size]
            x = bank.batch(idx.tolist()).to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
            if tcfg.flip:
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1).to(device), x.flip(-1), x)
            if tcfg.crop_scale < 1.0:
                x = _random_zoom(x, tcfg.crop_scale, g)
            _, loss = model(x, labels[idx].to(device), pos_weight=tcfg.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        rec = {"epoch": epoch + 1, "loss": loss_sum / seen, "seconds": time.perf_counter() - t0}
        if val_bank is not None:
            rec["val_mAP"] = word_metrics(predict_probs(model, val_bank), val.labels, val.vocab, (5,))["mAP"]
        history.append(rec)
        log(f"epoch {epoch + 1}/{tcfg.epochs}: loss {rec['loss']:.4f}"
            + (f", val mAP {rec['val_mAP']:.4f}" if "val_mAP" in rec else "") + f" ({rec['seconds']:.1f} s)")
        state = {"config": cfg.to_dict(), "train_config": tcfg.to_dict(), "vocab": list(train.vocab),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "epoch": epoch + 1, "history": history, "label_stats": label_stats or {}}
        save_checkpoint(last, {**state, "optimizer": opt.state_dict()})
    final = {"config": cfg.to_dict(), "train_config": tcfg.to_dict(), "vocab": list(train.vocab),
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "epoch": tcfg.epochs, "history": history, "label_stats": label_stats or {}}
    save_checkpoint(out / MODEL_FILE, final)
    summary = {"epochs": tcfg.epochs, "seconds_this_run": time.perf_counter() - t_start,
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "val_mAP": history[-1].get("val_mAP") if history else None, "n_train": n,
               "vocab_size": len(train.vocab)}
    write_json_atomic(out / "train_log.json", summary, indent=1)
    return summary
