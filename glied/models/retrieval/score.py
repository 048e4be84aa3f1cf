"""Scores and loss of the retrieval models.

* :func:`mrsw_scores` — TERAN's "MrSw" region–word alignment (Messina et al., "Fine-grained Visual Textual
  Alignment for Cross-Modal Retrieval using Transformer Encoders", ACM TOMM 2021): the cosine matrix between
  every region and every word of a pair, the max over regions for each word, summed over words.
* :func:`hinge_triplet_loss` — the VSE++ hinge triplet loss (Faghri et al. 2018) in both directions with the
  hardest negative of the batch (or the sum over all negatives, VSE∞'s one-epoch warm-up).
"""
from __future__ import annotations

import torch


def mrsw_scores(images: torch.Tensor, image_mask: torch.Tensor, texts: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
    """Region–word alignment score of every image against every sentence.

    Args:
        images: (Ni, R, D) L2-normalised region vectors; image_mask (Ni, R) bool, True = a region that counts.
        texts: (Nt, L, D) L2-normalised word vectors; text_mask (Nt, L) bool, True = a word that counts.
    Returns:
        (Ni, Nt): for each pair, sum over the sentence's words of the word's best cosine with any region.
    """
    ni, r, d = images.shape
    nt, length, _ = texts.shape
    cos = images.reshape(ni * r, d) @ texts.reshape(nt * length, d).t()        # (Ni*R, Nt*L)
    cos = cos.view(ni, r, nt, length)                                          # (Ni, R, Nt, L)
    cos = cos.masked_fill(~image_mask.view(ni, r, 1, 1), float("-inf"))
    best = cos.amax(dim=1)                                                     # (Ni, Nt, L)
    best = best.masked_fill(~text_mask.view(1, nt, length), 0.0)
    return best.sum(dim=2)                                                     # (Ni, Nt)


def mrsw_pairs(images: torch.Tensor, image_mask: torch.Tensor, texts: torch.Tensor,
               text_mask: torch.Tensor) -> torch.Tensor:
    """MrSw score of P given pairs, row p of ``images`` (P, R, D) with row p of ``texts`` (P, L, D) -> (P,)."""
    cos = torch.einsum("prd,pld->prl", images, texts)                           # (P, R, L)
    cos = cos.masked_fill(~image_mask.unsqueeze(2), float("-inf"))
    best = cos.amax(dim=1).masked_fill(~text_mask, 0.0)                         # (P, L)
    return best.sum(dim=1)


def hardest_negatives(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, B) score matrix whose diagonal holds the matching pairs: the index of the highest-scoring
    non-matching sentence for each image (B,) and of the highest-scoring non-matching image for each
    sentence (B,)."""
    b = scores.shape[0]
    off = scores.masked_fill(torch.eye(b, dtype=torch.bool, device=scores.device), float("-inf"))
    return off.argmax(dim=1), off.argmax(dim=0)


def hinge_triplet_loss(scores: torch.Tensor, margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """VSE++ loss of a (B, B) image x sentence score matrix with the matching pairs on the diagonal.

    For each image i: [margin + s(i, c) - s(i, i)]+ over negatives c (sentence retrieval), and for each
    sentence c: [margin + s(j, c) - s(c, c)]+ over negative images j (image retrieval). ``hardest``: only the
    hardest negative of each row/column counts (its index is :func:`hardest_negatives`); otherwise all are
    summed. Returns the sum over the batch (a scalar), as VSE++ and TERAN do.
    """
    b = scores.shape[0]
    if b < 2:
        return scores.sum() * 0.0
    pos = scores.diagonal()
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    cost_sentence = (margin + scores - pos.view(b, 1)).clamp(min=0).masked_fill(eye, 0.0)  # (B, B) row = image
    cost_image = (margin + scores - pos.view(1, b)).clamp(min=0).masked_fill(eye, 0.0)     # (B, B) col = sentence
    if hardest:
        neg_c, neg_i = hardest_negatives(scores)
        idx = torch.arange(b, device=scores.device)
        return cost_sentence[idx, neg_c].sum() + cost_image[neg_i, idx].sum()
    return cost_sentence.sum() + cost_image.sum()
