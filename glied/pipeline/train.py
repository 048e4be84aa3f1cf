"""`glied train`: cross-entropy with teacher forcing, then self-critical training with a CIDEr-D reward.

Recipe (defaults of :class:`DecoderTrainConfig`; the paper leaves optimiser and schedule open, see
docs/architecture.md):
  * XE: Adam(0.9, 0.98), lr 5e-4 with linear warm-up over ``warmup_steps`` iterations, x``lr_decay`` every
    ``lr_decay_every`` epochs; gradient norm clipped at 2.0; all captions of an image in one batch row
    (or ``captions_per_image`` drawn at random per epoch).
  * SCST: Adam at ``scst_lr``; ``scst_samples`` multinomial samples per image drawn without gradients;
    baseline ``greedy`` (own greedy decode, no_grad, eval mode) or ``mean`` (mean of the other samples).
    The sampled sequences are re-scored with ONE teacher-forced pass with gradients, so an SCST step holds
    no more activation memory than an XE step with the same number of sequences. Dropout is off during
    SCST (eval mode), so the re-scored log-probabilities are exactly those of the sampling policy.
  * after every epoch: greedy decoding of the val split, CIDEr-D (val-split df, prepared tokens) ->
    metrics.csv, TensorBoard events (if installed), last.pt, and best.pt when val CIDEr-D improves;
    xe.pt keeps the model at the end of the cross-entropy stage (for XE-vs-SCST comparisons).

Exact resume: the checkpoint holds the training settings (restored by ``--resume``; a conflicting flag is
refused, see :func:`glied.checkpoint.resume_settings`), model, optimiser, progress (epochs done per stage,
iteration), best score and history; shuffling (DistributedSampler seeded with seed + epoch) and the torch RNG (re-seeded
from seed, epoch and rank at each epoch start) are functions of the epoch, so a resumed run repeats the
uninterrupted one. Distributed: under ``torchrun`` (WORLD_SIZE > 1) it uses DistributedDataParallel
(gloo on CPU, nccl on GPU); ``batch_size`` is per process; rank 0 validates and writes.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from glied.datasets import identity as idn
from glied.datasets.captions import CaptionDataset, FeatureSource, collate, model_inputs
from glied.errors import ConfigError, InputError
from glied.fileio import write_atomic, write_json_atomic
from glied.models.beam import greedy, sample
from glied.models.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from glied.models.glied import EOS, PAD, GliedConfig, GliedDecoder, MODEL_PRESETS, count_parameters, token_mask
from glied.models.scst import CiderReward, scst_loss, self_critical_advantage, target_logprobs


@dataclass(frozen=True)
class DecoderTrainConfig:
    model: str = "glied"
    stage: str = "both"  # xe | scst | both
    epochs: int = 15  # XE epochs
    scst_epochs: int = 10
    batch_size: int = 50  # images per process; each carries all its captions
    lr: float = 5e-4
    warmup_steps: int = 200
    lr_decay: float = 0.8
    lr_decay_every: int = 3
    captions_per_image: Optional[int] = None  # XE: captions drawn per image and epoch (None: all)
    scst_lr: float = 5e-5
    scst_samples: int = 5
    scst_baseline: str = "greedy"  # greedy | mean
    grad_clip: float = 2.0
    d_model: int = 512
    d_embed: int = 256
    n_heads: int = 8
    layers: int = 1  # decoder passes (GliedConfig.layers)
    region_sum: bool = False  # add the summed projected regions to every input word (GliedConfig.region_sum)
    dropout: float = 0.1
    label_smoothing: float = 0.0
    max_attrs: Optional[int] = None
    box_geometry: bool = False  # give the decoder each region's box position and size (new models only)
    coverage: bool = False  # mark the regions named so far in the region attentions (GliedConfig.coverage)
    box_fourier: int = 0  # frequencies of the sin/cos box encoding (GliedConfig.box_fourier; needs box_geometry)
    val_beam: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.model not in MODEL_PRESETS:
            names = ", ".join(sorted(MODEL_PRESETS))
            raise ConfigError(f"unknown model {self.model!r}; choose one of {names}")
        if self.stage not in ("xe", "scst", "both"):
            raise ConfigError(f"unknown stage {self.stage!r}: use xe, scst or both")
        if self.scst_baseline not in ("greedy", "mean"):
            raise ConfigError(f"unknown SCST baseline {self.scst_baseline!r}: use greedy or mean")
        if self.batch_size < 1 or self.epochs < 0 or self.scst_epochs < 0:
            raise ConfigError("batch size must be >= 1 and epoch counts >= 0")
        if (self.epochs if self.stage != "scst" else 0) + (self.scst_epochs if self.stage != "xe" else 0) == 0:
            raise ConfigError(f"nothing to train: stage {self.stage} with {self.epochs} cross-entropy and "
                              f"{self.scst_epochs} self-critical epochs; give --epochs/--scst-epochs >= 1")
        for k in ("lr", "scst_lr", "grad_clip"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{k} must be a positive finite number, not {v!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{self.n_heads} attention heads do not divide d_model {self.d_model}; choose "
                              f"--heads among the divisors of --d-model (e.g. 8 for 512)")
        if self.coverage and self.layers != 1:
            raise ConfigError(f"--coverage works with one decoder pass, not --layers {self.layers}")
        if self.box_fourier and not self.box_geometry:
            raise ConfigError("--box-fourier encodes the box geometry: give --box-geometry as well")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderTrainConfig":
        """Settings from a dict (a checkpoint's ``train_config`` or the flags given); ConfigError on a key
        that is not a setting."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown decoder training settings {unknown}")
        return cls(**d)


def _open_features(features: str | os.PathLike | FeatureSource) -> tuple[FeatureSource, str]:
    if isinstance(features, (str, os.PathLike)):
        from glied.datasets.cache import FeatureCache  # imported lazily
        return FeatureCache.open(features), str(features)
    return features, getattr(features, "path", type(features).__name__)


def _dist_setup(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_at(cfg: DecoderTrainConfig, phase: str, epoch_in_phase: int, step: int) -> float:
    """The learning-rate schedule: a pure function of (phase, epoch, iteration)."""
    if phase == "scst":
        return cfg.scst_lr
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    return cfg.lr * warm * cfg.lr_decay ** (epoch_in_phase // max(cfg.lr_decay_every, 1))


def _make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)


class _Logger:
    """metrics.csv (rewritten from the checkpoint's history on resume) + optional TensorBoard events."""

    def __init__(self, out: Path, history: list[dict]) -> None:
        self.path = out / "metrics.csv"
        self.rows = list(history)
        self._write()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed: skip silently
            self.tb = None

    def _write(self) -> None:
        if not self.rows:
            return
        keys = list(self.rows[0])
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows(self.rows)
        write_atomic(self.path, write)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._write()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"{row['phase']}/{k}", v, row["epoch"])
            self.tb.flush()


def _xe_step(ddp_model, batch: dict, device: str) -> tuple[torch.Tensor, dict]:
    _, loss = ddp_model(*model_inputs(batch, device), batch["captions"].to(device))
    return loss, {"loss": float(loss.detach())}


def _scst_step(ddp_model, module: GliedDecoder, batch: dict, device: str, cfg: DecoderTrainConfig,
               reward: CiderReward, itow: list[str], max_len: int) -> tuple[torch.Tensor, dict]:
    inputs = model_inputs(batch, device)
    n = cfg.scst_samples
    img = batch["index"].numpy()  # (B,) dataset rows = rows of the reward index
    with torch.no_grad():
        mem = module.encode(*inputs)
        seqs = sample(module, mem, n, max_len)  # (B*n, T)
        greedy_r = None
        if cfg.scst_baseline == "greedy":
            greedy_r = reward(greedy(module, mem, max_len, keep_logits=False)[0], img, itow)  # (B,)
    r = reward(seqs, np.repeat(img, n), itow)  # (B*n,)
    adv = torch.as_tensor(self_critical_advantage(r, n, cfg.scst_baseline, greedy_r), dtype=torch.float32,
                          device=device)
    b, t = len(img), seqs.shape[1]
    caps = seqs.masked_fill(seqs == EOS, PAD).view(b, n, t)  # words only, as teacher-forcing captions
    logits, _ = ddp_model(*inputs, caps)  # (B*n, T+1, V), one pass with gradients
    targets = F.pad(seqs, (0, 1), value=PAD)  # (B*n, T+1)
    logp = target_logprobs(module.word_logprobs(logits), targets)  # (B*n, T+1)
    loss = scst_loss(logp, token_mask(targets), adv)
    return loss, {"loss": float(loss.detach()), "reward": float(r.mean()),
                  "baseline": float(greedy_r.mean()) if greedy_r is not None else float(r.mean())}


def train(data: str | os.PathLike, features: str | os.PathLike | FeatureSource, out: str | os.PathLike,
          cfg: DecoderTrainConfig | dict | None = None, *, resume: bool = False, init: Optional[str] = None,
          device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train a decoder into ``out`` (last.pt, best.pt, xe.pt, metrics.csv, train_config.json).

    Returns a summary dict: out, best_val_cider, progress, model (preset name), rank, world_size and
    ``decoder`` (the trained module of this process).

    ``cfg``: the settings: a :class:`DecoderTrainConfig` (every field counts as given), a dict of only the
    settings the user gave (the CLI; the rest are defaults), or None. With ``resume`` the run's stored
    settings are restored and the given ones checked against them (:func:`glied.checkpoint.resume_settings`:
    a conflicting setting is refused, the epoch counts may be raised).
    ``init``: a checkpoint whose weights start the run (e.g. an XE model for ``stage="scst"``).
    """
    from glied.checkpoint import resume_settings
    from glied.datasets.prepared import PreparedData
    from glied.pipeline.evaluate import predict_split

    out = Path(out)
    ckpt = None
    if resume:
        if not (out / "last.pt").is_file():
            raise InputError(f"{out}: nothing to resume (no last.pt); drop --resume to start a new run")
        ckpt = load_checkpoint(out / "last.pt")
    elif (out / "last.pt").is_file():
        raise InputError(f"{out}: already holds a run (last.pt); pass --resume to continue it or choose "
                         "a new --out")
    given = cfg.to_dict() if isinstance(cfg, DecoderTrainConfig) else dict(cfg or {})
    if ckpt is not None:
        defaults = DecoderTrainConfig().to_dict()
        stored = {**defaults, **{k: v for k, v in ckpt.get("train_config", {}).items() if k in defaults}}
        given = resume_settings(stored, given, where=ckpt["path"], flags={"n_heads": "--heads"})
    cfg = DecoderTrainConfig.from_dict(given)
    cfg.validate()
    rank, world = _dist_setup(device)
    prep = PreparedData.load(data)
    source, source_name = _open_features(features)
    identity = idn.for_decoder(source.manifest)
    max_len = int(prep.labels.shape[1])

    start = ckpt if ckpt is not None else (load_checkpoint(init) if init else None)
    # a continued model reads its features the way it was trained; a new one as cfg says
    geometry = bool(start["config"].get("box_geometry", False)) if start is not None else cfg.box_geometry
    train_ds = CaptionDataset(prep, source, "train", cfg.max_attrs, where=source_name,
                              captions_per_image=cfg.captions_per_image, box_geometry=geometry)
    val_ds = CaptionDataset(prep, source, "val", cfg.max_attrs, where=source_name, box_geometry=geometry)
    if start is not None:
        idn.check_trained_on(source.manifest, start["feature_identity"], where=source_name, model=str(start["path"]))
        if list(start["vocab"]) != list(prep.vocab):
            raise ConfigError(f"{start['path']}: vocabulary differs from {data}/vocab.json; use the prepared "
                              "data "
                              "the model was trained with")
        mcfg = GliedConfig.from_dict(start["config"])
    else:
        feature_dim = int(train_ds[0]["regions"].shape[1])
        mcfg = GliedConfig.preset(cfg.model, vocab_size=len(prep.vocab), feature_dim=feature_dim,
                                  d_model=cfg.d_model, d_embed=cfg.d_embed, n_heads=cfg.n_heads,
                                  layers=cfg.layers, region_sum=cfg.region_sum,
                                  dropout=cfg.dropout, label_smoothing=cfg.label_smoothing,
                                  max_positions=max(64, max_len + 2), box_geometry=geometry,
                                  box_fourier=cfg.box_fourier, coverage=cfg.coverage)
    torch.manual_seed(cfg.seed)  # initial weights are a function of the seed
    model = GliedDecoder(mcfg).to(device)
    progress = {"xe_done": 0, "scst_done": 0, "step": 0}
    best, history = float("-inf"), []
    if start is not None:
        model.load_state_dict(start["model"])
    if ckpt is not None:
        progress, best, history = dict(ckpt["progress"]), float(ckpt["best_cider"]), list(ckpt["history"])
    xe_epochs = cfg.epochs if cfg.stage != "scst" else progress["xe_done"]
    scst_epochs = cfg.scst_epochs if cfg.stage != "xe" else 0
    if cfg.stage == "scst" and start is None:
        raise ConfigError("--stage scst needs a cross-entropy model: pass --init CHECKPOINT or --resume")

    ddp_model = model
    if world > 1:
        ids = None if device == "cpu" else [device]
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    phase = "xe" if progress["xe_done"] < xe_epochs else "scst"
    opt, opt_phase = _make_optimizer(model, cfg.lr if phase == "xe" else cfg.scst_lr), phase
    if ckpt is not None and ckpt.get("optimizer_phase") == phase:
        opt.load_state_dict(ckpt["optimizer"])

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", {"train": cfg.to_dict(), "model": mcfg.to_dict(),
                                                      "world_size": world}, indent=1)
        logger = _Logger(out, history)
    reward = None
    itow = list(prep.vocab)
    refs_val = [[" ".join(s) for s in prep.images[i]["sentences"]] for i in val_ds.indices]
    from glied.models.cider import CiderD
    val_scorer = CiderD(refs_val)
    if rank == 0:
        log(f"train: {cfg.model} ({count_parameters(model) / 1e6:.2f}M parameters), "
            f"{len(train_ds)} train / {len(val_ds)} val images, world {world}, "
            f"XE {xe_epochs} + SCST {scst_epochs} "
            f"epochs, starting at XE {progress['xe_done']} / SCST {progress['scst_done']}")

    while progress["xe_done"] < xe_epochs or progress["scst_done"] < scst_epochs:
        phase = "xe" if progress["xe_done"] < xe_epochs else "scst"
        if phase == "scst" and reward is None:
            reward = CiderReward([prep.images[i]["sentences"] for i in train_ds.indices])
        if phase != opt_phase:  # fresh Adam state for the RL stage
            opt, opt_phase = _make_optimizer(model, cfg.scst_lr), phase
        epoch_in_phase = progress["xe_done"] if phase == "xe" else progress["scst_done"]
        epoch = progress["xe_done"] + progress["scst_done"]
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=0)
        t0, sums, count = time.perf_counter(), {}, 0
        model.train(phase == "xe")
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, phase, epoch_in_phase, progress["step"])
            if phase == "xe":
                loss, stats = _xe_step(ddp_model, batch, device)
            else:
                loss, stats = _scst_step(ddp_model, model, batch, device, cfg, reward, itow, max_len)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            progress["step"] += 1 if phase == "xe" else 0
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        progress["xe_done" if phase == "xe" else "scst_done"] += 1
        if rank == 0:
            seqs = predict_split(model, val_ds, cfg.val_beam, cfg.batch_size, device, max_len)
            texts = [prep.decode(s) for s in seqs]
            val_cider = float(val_scorer.score(texts, np.arange(len(texts))).mean())
            means = {k: round(v / max(count, 1), 6) for k, v in sums.items()}
            row = {"epoch": epoch + 1, "phase": phase, **means,
                   "val_cider": round(val_cider, 6), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2)}
            row.setdefault("reward", "")
            row.setdefault("baseline", "")
            cols = ("epoch", "phase", "loss", "reward", "baseline", "val_cider", "lr", "seconds")
            row = {k: row[k] for k in cols}
            logger.log(row)
            log(f"epoch {epoch + 1} {phase}: loss {row['loss']:.4f} val CIDEr-D {val_cider:.4f} "
                f"({row['seconds']:.1f} s) e.g. \"{texts[0]}\"")
            state = {"format": FORMAT, "version": VERSION, "config": mcfg.to_dict(), "vocab": itow,
                     "feature_identity": identity, "model": model.state_dict(), "train_config": cfg.to_dict(),
                     "optimizer": opt.state_dict(), "optimizer_phase": phase,
                     "progress": dict(progress), "best_cider": max(best, val_cider), "history": logger.rows,
                     "val_cider": val_cider}
            save_checkpoint(state, out / "last.pt")
            if phase == "xe" and progress["xe_done"] == xe_epochs:
                save_checkpoint(state, out / "xe.pt")  # the model at the end of cross-entropy training
            if val_cider > best:
                best = val_cider
                save_checkpoint(state, out / "best.pt")
        if world > 1:
            dist.barrier()
    summary = {"out": str(out), "best_val_cider": best, "progress": progress, "model": cfg.model,
               "rank": rank,
               "world_size": world, "decoder": model}
    if rank == 0 and logger.tb is not None:
        logger.tb.close()
    return summary

