"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward.

reward(w) = CIDEr-D(w) against the image's training references, with document frequencies from the TRAIN split
(as in ImageCaptioning.pytorch's ``coco-train-idxs``), and an ``<eos>`` token appended to every reference and
every candidate, so that finishing a sentence properly is part of the reward.

Baselines:
  * ``greedy`` (Rennie et al.): the reward of the model's own greedy decode, run without gradients in eval
    mode;
  * ``mean`` (Luo 2020, "new self-critical"): for n samples per image, each sample's baseline is the mean
    reward of the other n-1 samples (no greedy pass).
The loss is -(r - b) * mean over tokens of log p, tokens up to and including the first <eos>.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from glied.models.beam import decode_text
from glied.models.cider import CiderD
from glied.tokens import PAD


class CiderReward:
    """CIDEr-D reward over a fixed set of images (indexed once).

    Args:
        refs: per image, its reference sentences as token lists.
        append_eos: add ``<eos>`` to references and candidates.
    """

    def __init__(self, refs: Sequence[Sequence[Sequence[str]]], append_eos: bool = True) -> None:
        self.suffix = " <eos>" if append_eos else ""
        self.scorer = CiderD([[" ".join(r) + self.suffix for r in rs] for rs in refs])

    def __call__(self, seqs: torch.Tensor, image_index: np.ndarray, itow: list[str]) -> np.ndarray:
        """seqs (N, T) word ids; image_index (N,) into the refs. Returns (N,) CIDEr-D."""
        texts = [t + self.suffix for t in decode_text(seqs, itow)]
        return self.scorer.score(texts, image_index)


def self_critical_advantage(sample_reward: np.ndarray, n_samples: int, baseline: str,
                            greedy_reward: np.ndarray | None = None) -> np.ndarray:
    """Advantages (B*n,) of consecutive groups of n samples per image.

    baseline "greedy": r - r_greedy (greedy_reward (B,)); "mean": r - mean of the other n-1 samples.
    """
    r = sample_reward.reshape(-1, n_samples)  # (B, n)
    if baseline == "greedy":
        if greedy_reward is None:
            raise ValueError("greedy baseline needs greedy_reward")
        adv = r - greedy_reward.reshape(-1, 1)
    elif baseline == "mean":
        if n_samples < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        adv = r - (r.sum(1, keepdims=True) - r) / (n_samples - 1)
    else:
        raise ValueError(f"unknown SCST baseline {baseline!r} (greedy or mean)")
    return adv.reshape(-1)


def target_logprobs(word_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of each target word: word_logprobs (N, T, V), targets (N, T) -> (N, T), 0 where the target is
    <pad>. The one log-probability gathering of self-critical training (and of the tests that re-score beams)."""
    logp = word_logprobs.gather(2, targets.unsqueeze(2)).squeeze(2)  # (N, T)
    return logp.masked_fill(targets == PAD, 0.0)


def scst_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE loss: logprobs (N, T) of the sampled tokens, mask (N, T) real tokens, advantage (N,)."""
    return -(logprobs * mask * advantage[:, None]).sum() / mask.sum().clamp(min=1.0)
