"""Attribute-word extraction with a trained MIL detector: top-k words per image and per-cell word maps."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from glied.errors import ConfigError, WeightsError
from glied.extractors.mil.checkpoint import load_checkpoint
from glied.extractors.mil.config import MilConfig
from glied.extractors.mil.model import MilNet, MilTransform, weights_fingerprint
from glied.records import AttributeWords

NAME = "mil-fang2015"
# GLIED's Fig. 1(c) shows 49 attribute words for one image; the selection rule is not published, so by default
# we keep the 50 most probable words (capped at the vocabulary size).
DEFAULT_TOP_K = 50


class AttributeExtractor:
    """A trained MIL detector ready for inference.

    ``predict(images)`` takes BGR uint8 numpy images (H, W, 3) of any size (the transform shipped with the model
    resizes them) and returns, per image, an :class:`AttributeWords` with the ``top_k`` most probable words,
    best first (``word_ids`` index ``vocab``; ``probs`` are noisy-OR probabilities p(w|I)).
    """

    def __init__(self, model: MilNet, vocab: list[str], *, top_k: int = DEFAULT_TOP_K, batch_size: int = 32,
                 fingerprint: str | None = None):
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (got {top_k})")
        self.model = model.eval()
        self.cfg: MilConfig = model.cfg
        self.vocab = list(vocab)
        self.top_k = min(int(top_k), len(self.vocab))
        self.batch_size = batch_size
        self.transform = MilTransform(self.cfg)
        self.device = model.head.weight.device
        self._fingerprint = fingerprint or weights_fingerprint(model.state_dict())

    def identity(self) -> dict:
        """What produced the words: stored in the feature-cache manifest."""
        return {"name": NAME, "config": self.cfg.to_dict(), "weights_fingerprint": self._fingerprint,
                "vocab": list(self.vocab), "top_k": self.top_k}

    @torch.inference_mode()
    def _run(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """-> (probs (B, V), cell logits (B, V, h, w), content sizes), batch by batch."""
        probs, maps, valid = [], [], []
        for s in range(0, len(images), self.batch_size):
            x, v = self.transform(list(images[s:s + self.batch_size]))  # (b, 3, S, S) uint8
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            logits = self.model.cell_logits(x)  # (b, V, h, w)
            log_p, _ = self.model.image_log_probs(logits)  # (b, V)
            probs.append(log_p.exp().float().cpu())
            maps.append(logits.float().cpu())
            valid.extend(v)
        if not probs:
            h = w = 0
            return torch.zeros(0, len(self.vocab)), torch.zeros(0, len(self.vocab), h, w), []
        return torch.cat(probs), torch.cat(maps), valid

    def _crop(self, cell_logits: torch.Tensor, valid: tuple[int, int]) -> np.ndarray:
        """(V, h, w) logits -> (V, h', w') cell probabilities over the cells that cover image content."""
        s = self.cfg.input_size
        h, w = cell_logits.shape[-2:]
        hh = max(1, min(h, int(np.ceil(h * valid[0] / s))))
        ww = max(1, min(w, int(np.ceil(w * valid[1] / s))))
        return torch.sigmoid(cell_logits[:, :hh, :ww]).numpy().astype(np.float32)

    def probs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, V) float32 probabilities of every vocabulary word."""
        return self._run(images)[0].numpy()

    def extract(self, images: Sequence[np.ndarray], *, word_map: bool = False) -> list[AttributeWords]:
        """Top-k words per image, best first; with ``word_map=True`` each record also carries the per-cell
        probability map (V, h, w) (cells covering padding cropped away)."""
        probs, logits, valid = self._run(images)
        top_p, top_i = probs.topk(self.top_k, dim=1)  # (B, k), sorted descending
        out = []
        for b in range(probs.shape[0]):
            wm = self._crop(logits[b], valid[b]) if word_map else None
            out.append(AttributeWords(word_ids=top_i[b].numpy().astype(np.int64),
                                      probs=top_p[b].numpy().astype(np.float32), word_map=wm))
        return out

    def word_maps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image, (V, h, w) float32 sigmoid probability of each word at each map cell (where it fired)."""
        _, logits, valid = self._run(images)
        return [self._crop(logits[b], valid[b]) for b in range(logits.shape[0])]

    def word_index(self, word: str) -> int:
        try:
            return self.vocab.index(word)
        except ValueError:
            raise ConfigError(f"{word!r} is not in the MIL vocabulary ({len(self.vocab)} words)") from None


def load_attribute_extractor(run_or_checkpoint: str | Path, *, device: str = "cpu", top_k: int = DEFAULT_TOP_K,
                             batch_size: int = 32) -> AttributeExtractor:
    """Load a trained MIL detector from a run folder (its ``model.pt``) or a checkpoint file.

    Args:
        run_or_checkpoint: the ``--out`` folder of ``glied train-attributes`` or a ``.pt`` file.
        device: torch device string.
        top_k: words kept per image (default 50, close to the 49 words of GLIED's Fig. 1(c); capped at the
            vocabulary size).
        batch_size: images per forward pass.

    Raises:
        WeightsError: missing or damaged checkpoint, or one whose tensors do not fit its config.
    """
    ckpt = load_checkpoint(run_or_checkpoint)
    try:
        cfg = MilConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{ckpt['path']}: bad model config in checkpoint ({e}); retrain it") from None
    model = MilNet(cfg)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{ckpt['path']}: weights do not fit the stored config "
                           f"({str(e).splitlines()[0]}); retrain it") from None
    if len(ckpt["vocab"]) != cfg.vocab_size:
        raise WeightsError(f"{ckpt['path']}: vocabulary has {len(ckpt['vocab'])} words but the model "
                           f"{cfg.vocab_size}; retrain it")
    model.to(device, memory_format=torch.channels_last)
    return AttributeExtractor(model, list(ckpt["vocab"]), top_k=top_k, batch_size=batch_size,
                              fingerprint=weights_fingerprint(ckpt["state_dict"]))
