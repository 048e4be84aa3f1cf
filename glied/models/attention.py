"""Multi-head attention and the G(y; z) sub-layer of GLIED (Liu et al., IJCAI 2019, slides eq. 1-2).

A(Q, K, V)_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V,  H(Q, K, V) = [A_1; ...; A_h] W_k.
G(y; z) = LayerNorm(z + Dropout(y)): residual, dropout and layer norm, no position-wise FFN (the slides show
none).

Keys and values can be projected once (:meth:`MultiHeadAttention.project_kv`) and reused, which is how the
decoder caches the region/attribute memories per image and the causal context keys/values across decoding
steps.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


#: from this many (batch x heads) rows on, attention of up to 8 queries per row runs as matmul-softmax-matmul instead
#: of the fused kernel (2 threads, fp32, 36 keys: equal at 8 x 8 rows, 6-15% faster at 50 x 8 and 150 x 8 rows with
#: 1-5 queries; slower below 8 x 8)
MATMUL_ATTENTION_ROWS = 128


class MultiHeadAttention(nn.Module):
    """H(Q, K, V) with ``n_heads`` heads of size ``d_model // n_heads``.

    Masks are boolean with True = attend. A query whose keys are all masked gets a zero output (never NaN), so
    an image with no attribute words is valid input.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_k).transpose(1, 2)  # (B, h, N, d_k)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d_model) -> keys, values each (B, h, N, d_k) (one fused projection)."""
        w, b = fused_linear(self.w_k, self.w_v)
        return split_heads(F.linear(kv, w, b), 2, self.n_heads)

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of projected, pre-scaled queries (fast path of incremental decoding).

        Args:
            q: (B, h, Tq, d_k) queries already multiplied by 1/sqrt(d_k).
            k, v: (B, h, N, d_k), any strides (e.g. views of a fused projection, or a prefix of a buffer).
            bias: mask broadcastable to (B, h, Tq, N): bool (True = attend) or additive float (0 or -inf), or None.
        Returns:
            (B, Tq, h * d_k) heads concatenated, before the output projection.
        """
        p = self.attn_dropout.p if self.training else 0.0
        b, h, tq, dk = q.shape
        if p == 0.0 and tq <= 8 and b * h >= MATMUL_ATTENTION_ROWS:
            # a decoding step (one query per row, or per beam) over many rows: two batched GEMMs beat the fused
            # kernel
            scores = torch.matmul(q, k.transpose(-1, -2))  # (B, h, Tq, N)
            if bias is not None:
                scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
            out = torch.matmul(torch.softmax(scores, -1), v)  # (B, h, Tq, d_k)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)  # (B, h, Tq, d_k)
        return out.transpose(1, 2).reshape(b, tq, h * dk)

    def weights(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention weights (B, h, Tq, N) of raw queries q (B, Tq, d_model) over pre-projected keys k; masked
        keys get 0, and a query with no key gets all zeros (never NaN). ``bias`` (broadcastable to
        (B, h, Tq, N)), when given, is added to the scores."""
        qh = self._split(self.w_q(q))  # (B, h, Tq, d_k)
        scores = torch.matmul(qh, k.transpose(-1, -2)) / math.sqrt(self.d_k)  # (B, h, Tq, N)
        if bias is not None:
            scores = scores + bias
        if mask is None:
            return F.softmax(scores, dim=-1)
        m = mask.unsqueeze(-3) if mask.dim() == 3 else mask  # (B, 1, Tq, N) or (Tq, N)
        scores = scores.masked_fill(~m, float("-inf"))
        return F.softmax(scores, dim=-1).masked_fill(~m, 0.0)  # rows with no key -> zeros, not NaN

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention with pre-projected keys/values.

        Args:
            q: (B, Tq, d_model) raw queries (projected here).
            k, v: (B, h, N, d_k) from :meth:`project_kv`.
            mask: bool, broadcastable to (B, Tq, N) (e.g. (B, 1, N) padding or (Tq, N) causal); True = attend.
            bias: float added to the scores, broadcastable to (B, h, Tq, N), or None.
        Returns:
            (B, Tq, d_model).
        """
        b, tq, _ = q.shape
        attn = self.attn_dropout(self.weights(q, k, mask, bias))  # (B, h, Tq, N)
        out = torch.matmul(attn, v)  # (B, h, Tq, d_k)
        out = out.transpose(1, 2).reshape(b, tq, self.d_model)  # (B, Tq, d_model)
        return self.w_o(out)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """H(q, kv, kv): q (B, Tq, D), kv (B, N, D), mask as in :meth:`attend`. Returns (B, Tq, D)."""
        k, v = self.project_kv(kv)
        return self.attend(q, k, v, mask)


class Residual(nn.Module):
    """G(y; z) = LayerNorm(z + Dropout(y)) (post-LN, as in the original Transformer)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.dropout(y))


def split_heads(x: torch.Tensor, parts: int, n_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * D) fused projections -> ``parts`` tensors (B, h, N, D / h), each contiguous (read at every
    decoding step: strided views of the fused projection made each step's attention 2-3x slower)."""
    b, n, d = x.shape
    x = x.view(b, n, parts, n_heads, d // (parts * n_heads)).permute(2, 0, 3, 1, 4).contiguous()  # (P, B, h, N, dk)
    return tuple(x.unbind(0))


def fused_linear(*layers: nn.Linear, scales: Optional[tuple[float, ...]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (sum of out features, in) and bias of several Linear layers that read the same input, stacked so
    one GEMM computes all of them; ``scales`` multiplies each layer's rows (e.g. 1/sqrt(d_k) for queries)."""
    scales = scales or (1.0,) * len(layers)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.cat([layer.weight * s if s != 1.0 else layer.weight for layer, s in zip(layers, scales)])
        b = torch.cat([layer.bias * s if s != 1.0 else layer.bias for layer, s in zip(layers, scales)])
        return w, b
    return derived(layers[0], ("stack", tuple(map(id, layers)), scales), layers, build)


def derived(owner: nn.Module, key: Any, sources: Sequence[nn.Module], build: Callable[[], Any],
            reuses_first: int = 0) -> Any:
    """``build()``, a value computed from the parameters of ``sources`` (fused or folded weights).

    Under autograd it is rebuilt at every call, so gradients flow to the parameters; without autograd it is
    cached on ``owner`` and rebuilt only when a parameter changed (in-place updates bump its version counter,
    moving it changes its storage). A value that costs more than it saves per call is only built once the
    parameters were seen unchanged ``reuses_first`` more times (None until then), so a model being trained
    never builds it."""
    if torch.is_grad_enabled():
        return build()
    versions = tuple((id(t), t._version, t.data_ptr()) for m in sources for t in m.parameters())
    cache = owner.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        hit = cache[key] = [versions, None, 0]
    else:
        hit[2] += 1
    if hit[1] is None and hit[2] >= reuses_first:
        hit[1] = build()
    return hit[1]


#: low-precision GEMMs pay a fixed cost per call that a small one does not win back: a linear layer runs in the
#: low precision only when (rows x output features) reaches this (bf16 on a CPU with AMX, 2 threads: the
#: 512 -> 10,001 word layer gains from 2 rows, a 512 -> 1,536 projection from 8; smaller ones lose)
LOW_PRECISION_MIN_OUTPUTS = 12_288


class LowPrecisionLinear:
    """Linear layers with their weights copied once to a low precision (e.g. bf16) for inference.

    ``__call__(x, weight, bias)`` is ``F.linear`` in fp32 when autograd is on or the GEMM is small (see
    :data:`LOW_PRECISION_MIN_OUTPUTS`), else the same product computed from the low-precision copies (made on
    first use and remade when the weight changes in place or is replaced) and returned in ``x``'s dtype.
    The bias is added in ``x``'s dtype. Results differ from fp32 by the rounding of the inputs, the weights
    and the product to the low precision.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._copies: dict[int, tuple[Any, int, torch.Tensor]] = {}

    def _low(self, w: torch.Tensor) -> torch.Tensor:
        try:
            version = w._version
        except RuntimeError:  # made under torch.inference_mode (a fused weight): never updated in place
            version = -1
        hit = self._copies.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == version:
            return hit[2]
        low = w.detach().to(self.dtype)
        self._copies = {k: v for k, v in self._copies.items() if v[0]() is not None}  # forget freed weights
        self._copies[id(w)] = (weakref.ref(w), version, low)
        return low

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if torch.is_grad_enabled() or rows * weight.shape[0] < LOW_PRECISION_MIN_OUTPUTS:
            return F.linear(x, weight, bias)
        out = F.linear(x.to(self.dtype), self._low(weight)).to(x.dtype)
        return out if bias is None else out.add_(bias)


def sinusoid_table(n_positions: int, d_model: int) -> torch.Tensor:
    """Fixed sinusoidal positional encodings (Vaswani et al. 2017): (n_positions, d_model) float32."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    i = torch.arange(0, d_model, 2, dtype=torch.float32)[None, :]
    angle = pos / torch.pow(10000.0, i / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table
