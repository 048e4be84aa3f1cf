"""Building blocks of the retrieval models: box geometry, GPO pooling, region and transformer encoders.

GPO is the generalised pooling operator of VSE∞ (Chen et al., "Learning the Best Pooling Strategy for Visual
Semantic Embedding", CVPR 2021): each feature dimension is sorted over the set (regions or words), and the
sorted values are averaged with weights that a small bidirectional GRU computes from sin/cos encodings of the
sorted positions, so the pooling (mean, max, top-k, ...) is learned and depends on the set size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def normalised_boxes(boxes: torch.Tensor, image_wh: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) pixel boxes x1, y1, x2, y2 and (B, 2) image width, height -> (B, R, 5) TERAN box features
    x1/w, y1/h, x2/w, y2/h and the box area over the image area."""
    wh = image_wh.to(boxes.dtype).clamp(min=1).view(-1, 1, 2)                  # (B, 1, 2)
    xy = boxes.view(*boxes.shape[:2], 2, 2) / wh.unsqueeze(2)                  # (B, R, 2, 2)
    size = (xy[:, :, 1] - xy[:, :, 0]).clamp(min=0)                            # (B, R, 2)
    area = (size[..., 0] * size[..., 1]).unsqueeze(-1)                         # (B, R, 1)
    return torch.cat([xy.reshape(*boxes.shape[:2], 4), area], dim=-1)          # (B, R, 5)


def sincos_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sin/cos position encodings (Vaswani et al. 2017); ``dim`` even."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)               # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class GPO(nn.Module):
    """Generalised pooling: (B, K, D) features with a (B, K) mask -> (B, D).

    The weights of the K sorted positions come from a bidirectional GRU (``hidden``) over ``pe_dim`` sin/cos
    encodings of the positions of the real entries only, then a linear score and a softmax at temperature 0.1;
    padding gets no weight and never enters the sort, so a padded set pools exactly like the unpadded one.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32):
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) mask of real entries (a prefix of each row) -> (B, K, 1) pooling weights, 0 on padding."""
        b, k = mask.shape
        lengths = mask.sum(1).clamp(min=1)                                      # (B,)
        pe = sincos_positions(k, self.pe_dim).to(mask.device).expand(b, k, self.pe_dim)
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=k)  # (B, K, 2H)
        h = out.shape[-1] // 2
        scores = self.score((out[..., :h] + out[..., h:]) / 2)                  # (B, K, 1)
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return torch.softmax(scores / 0.1, dim=1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # GPO assigns weights by sorted rank, so the real entries must be a prefix: move them to the front
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)       # (B, K) real entries first
        mask = mask.gather(1, order)
        features = features.gather(1, order.unsqueeze(-1).expand_as(features))
        ranked = features.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        ranked = ranked.sort(dim=1, descending=True).values                     # (B, K, D) per dimension
        ranked = ranked.masked_fill(~mask.unsqueeze(-1), 0.0)
        return (ranked * self.weights(mask)).sum(dim=1)                         # (B, D)


class RowMLP(nn.Module):
    """Linear-BatchNorm-ReLU-Linear applied to the real rows only (padding never enters the batch statistics)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(),
                                 nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.net[-1].out_features)            # (B, K, Dout)
        out[mask] = self.net(x[mask])                                           # (N_real, Dout)
        return out


def transformer(d: int, layers: int, heads: int, ff: int, dropout: float) -> nn.Module:
    """A stack of post-norm transformer-encoder layers (batch first), or the identity for ``layers`` 0."""
    if layers == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def encode(stack: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run a :func:`transformer` stack over (B, K, D) with (B, K) mask of real entries."""
    if isinstance(stack, nn.Identity):
        return x
    return stack(x, src_key_padding_mask=~mask)
