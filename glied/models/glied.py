"""The GLIED decoder and its cross-modal fully-attentive base model (Liu et al., IJCAI 2019).

Equations follow the paper's slides (docs/architecture.md, "The GLIED decoder");
G(y; z) = LayerNorm(z + Dropout(y)) with no FFN.

    I  = ReLU(W_r r) regions (2048 -> 512);  A = W_e E[a] + W_p p  attribute words + MIL probabilities
    x  = W_e E[w] + PE(t)                    input word (E is ONE 256-d table shared by words and attributes)
    GLIED:
      Ĩ  = G(H_vd(I, I, I), I)                              global visual distilling   (once per image)
      t̃  = G(H_ad(x, A, A), x)                              global attribute distilling (word as pivot)
      x̃  = G(H_x(t̃, T̃, T̃), t̃)                              causal context attention
      c_g = G(H_v(x̃, Ĩ, Ĩ), x̃)                              global aspect vector
      c̃  = G(H_vl(c_g, I, I) + H_al(c_g, A, A), c_g)         local cross-modal distilling
    base:  Ĩ = I, t̃ = x, c̃ = G(H_v(x̃, I, I) + H_a(x̃, A, A), x̃)
    y ~ softmax(W^c c̃)
    ``layers`` = L > 1 (not in the slides): passes 2..L repeat context attention and the cross-modal part with
    their own weights, each on the c̃ of the pass before (x̃ = G(H_x(c̃, C̃, C̃), c̃), then c_g and c̃ as above);
    y ~ softmax(W^c c̃ of pass L).
    ``region_sum`` (not in the slides): x = W_e E[w] + PE(t) + W_s sum_r I_r, the regions' sum telling every step
    how many regions there are (attention's weighted means cannot count).
    ``box_fourier`` = F > 0 (not in the slides): I = ReLU(W_r r + W_b [sin, cos](pi 2^k b)), b the box centre and
    size, k < F, so attention can single out a position.
    ``coverage`` (not in the slides): beta_t(r) = sigmoid(W_q x̃_t . W_k I_r) marks the regions the words up to t
    name; kappa_t = sum_{s<=t} beta_s; head h of H_v (and H_vl) adds w_h kappa_t(r) to its scores.

Each of the three distilling parts has its own switch in :class:`GliedConfig`, so base, single additions and
full GLIED are the same code. Choices the paper leaves open (docs/architecture.md), made here:
  * one shared 256->512 projection W_e for words and attributes (the table is shared, so is its projection);
  * regions: Linear 2048->512 + ReLU + dropout, no normalisation;
  * fixed sinusoidal positional encoding added to input words (no parameters);
  * MIL probabilities enter as an added learned projection W_p p (Linear 1->512) on each attribute embedding,
    so a top-k list that includes absent words is told how confident each word is (``attr_probs=False``
    drops it);
  * W^c is a separate 512->V layer (no weight tying: the table is 256-d); label smoothing is a config value,
  0 by   default; dropout 0.1; post-LN.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from glied.datasets.captions import GEOMETRY_DIMS
from glied.errors import ConfigError
from glied.models.attention import (LowPrecisionLinear, MultiHeadAttention, Residual, derived, fused_linear,
                                    sinusoid_table, split_heads)
from glied.models.presets import MODEL_PRESETS  # noqa: F401 - the named ablations, re-exported here
from glied.tokens import BOS, EOS, PAD, UNK  # noqa: F401 - the special token ids, re-exported here


@dataclass(frozen=True)
class GliedConfig:
    """Everything needed to rebuild a decoder; saved in every checkpoint."""

    vocab_size: int
    d_model: int = 512
    d_embed: int = 256
    n_heads: int = 8
    dropout: float = 0.1
    feature_dim: int = 2048
    max_positions: int = 64
    global_visual: bool = True
    global_attribute: bool = True
    local_distilling: bool = True
    attr_probs: bool = True
    label_smoothing: float = 0.0
    box_geometry: bool = False  # region rows end with 5 box-geometry columns (glied.datasets.captions)
    # passes of context attention + cross-modal attention (the slides show one); pass n >= 2 reads the c~ of
    # pass n-1, so a step can see where earlier steps looked (docs/architecture.md, "The GLIED decoder")
    layers: int = 1
    # add W_s sum_r I_r, the sum of the projected regions, to every input word: unlike attention's weighted
    # means it grows with the number of regions, so the decoder can tell how many objects there are
    region_sum: bool = False
    # > 0: also encode each region's box centre and size as sin/cos at this many octave frequencies, projected
    # and added to W_r r before the ReLU, so attention can single out a position ("the next object to the
    # right"), which keys linear in the box coordinates cannot; needs ``box_geometry``
    box_fourier: int = 0
    # coverage (not in the slides): a pointer marks, at every step, the regions the words so far have named
    # (sigmoid(q_t . k_r), summed over the steps: kappa_t(r)); every head of the region attentions adds
    # w_h kappa_t(r) to its scores, so the decoder can tell named objects from the ones still to name
    coverage: bool = False

    def __post_init__(self) -> None:
        """ConfigError (one line for the CLI) on sizes the model cannot be built with."""
        for k in ("vocab_size", "d_model", "d_embed", "n_heads", "feature_dim", "max_positions", "layers"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {k} must be a positive integer, not {v!r}")
        if not isinstance(self.box_fourier, int) or isinstance(self.box_fourier, bool) or self.box_fourier < 0:
            raise ConfigError(f"model config: box_fourier must be a non-negative integer, not {self.box_fourier!r}")
        if self.box_fourier and not self.box_geometry:
            raise ConfigError("model config: box_fourier encodes the box geometry columns; it needs box_geometry "
                              "(--box-geometry)")
        if self.coverage and self.layers != 1:
            raise ConfigError(f"model config: coverage works with one decoder pass, not layers={self.layers}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model config: {self.n_heads} heads do not divide d_model {self.d_model} "
                              f"(choose --heads among the divisors of --d-model, e.g. 8 for 512)")
        for k in ("dropout", "label_smoothing"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"model config: {k} must be in [0, 1), not {v!r}")

    @classmethod
    def preset(cls, name: str, **kw: Any) -> "GliedConfig":
        """A config for one of :data:`MODEL_PRESETS` (``glied``, ``base``, ``base+gvd``, ...)."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        gv, ga, gl = MODEL_PRESETS[name]
        try:
            return cls(global_visual=gv, global_attribute=ga, local_distilling=gl, **kw)
        except TypeError as e:
            raise ConfigError(f"model config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GliedConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected a mapping, not {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GliedConfig fields {sorted(unknown)} (a checkpoint of another glied "
                              f"version?)")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"model config: {e}") from None

    def replace(self, **kw: Any) -> "GliedConfig":
        return replace(self, **kw)


def box_fourier_features(geometry: torch.Tensor, n: int) -> torch.Tensor:
    """(..., 5) box-geometry columns (:func:`glied.datasets.captions.region_matrix`) -> (..., 8n): sin and cos
    of the box centre x, y and width, height (each in [0, 1]) at the frequencies pi * 2^k, k = 0..n-1."""
    x1, y1, x2, y2 = geometry[..., :4].unbind(-1)
    v = torch.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], -1)  # (..., 4)
    freqs = math.pi * 2.0 ** torch.arange(n, dtype=v.dtype, device=v.device)  # (n,)
    angles = (v[..., None] * freqs).flatten(-2)  # (..., 4n)
    return torch.cat([angles.sin(), angles.cos()], -1)  # (..., 8n)


@dataclass
class Memory:
    """Per-image encoder output, computed once and reused at every decoding step.

    ``kv`` holds pre-projected (keys, values), each (B, h, N, d_k) contiguous, for every cross attention (the
    values of an image with no real key are zero); ``region_mask`` (B, R) and ``attr_mask`` (B, K) are bool,
    True = real entry; ``region_keys`` / ``attr_keys`` are the same masks as (B, 1, 1, N) for the fused attention
    kernel (an image with no real key attends everywhere, to zero values), or None when every entry is real.
    """

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    region_mask: torch.Tensor
    attr_mask: torch.Tensor
    region_keys: Optional[torch.Tensor] = None
    attr_keys: Optional[torch.Tensor] = None
    group: int = 1  # decoding rows per image (beams, samples) sharing these tensors: see :meth:`shared`
    words: Optional[torch.Tensor] = None  # (B, 1, D) added to every input word (GliedConfig.region_sum)
    pointer_keys: Optional[torch.Tensor] = None  # (B, R, d_k) coverage pointer keys, pre-scaled (coverage)

    @property
    def batch_size(self) -> int:
        """Decoding rows: images x ``group``."""
        return int(self.region_mask.shape[0]) * self.group

    def shared(self, n: int) -> "Memory":
        """Each image's memory serving n consecutive decoding rows (B images -> B*n rows) without copying it:
        :meth:`GliedDecoder.step` attends with the n rows' queries together over the one copy (beam search and
        sampling read the memory n times less). Use :meth:`repeat` for a memory with B*n rows of its own."""
        m = self.materialized()
        return m if n == 1 else replace(m, group=n)

    def materialized(self) -> "Memory":
        """The same memory with one row per decoding row (a copy when ``group`` > 1)."""
        if self.group == 1:
            return self
        return replace(self, group=1).repeat(self.group)

    def word_bias(self) -> Optional[torch.Tensor]:
        """``words`` for every decoding row, (N, 1, D), or None."""
        if self.words is None or self.group == 1:
            return self.words
        return self.words.repeat_interleave(self.group, 0)  # (B*g, 1, D)

    def index_select(self, index: torch.Tensor) -> "Memory":
        """Rows ``index`` (e.g. ``arange(B).repeat_interleave(k)`` to expand for k beams/captions)."""
        if self.group != 1:
            return self.materialized().index_select(index)
        kv = {n: (k.index_select(0, index), v.index_select(0, index)) for n, (k, v) in self.kv.items()}

        def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index)
        return Memory(kv, self.region_mask.index_select(0, index), self.attr_mask.index_select(0, index),
                      rows(self.region_keys), rows(self.attr_keys), words=rows(self.words),
                      pointer_keys=rows(self.pointer_keys))

    def repeat(self, n: int) -> "Memory":
        """Each image repeated n times in a row: (B, ...) -> (B*n, ...)."""
        if n == 1:
            return self
        rows = torch.arange(self.batch_size, device=self.region_mask.device).repeat_interleave(n)  # (B*n,)
        return self.index_select(rows)


class KVCache:
    """Decoding state: the causal context-attention keys and values of the steps so far, for every pass.

    One preallocated buffer ``kv`` (2 L, N, h, capacity, d_k) (pass l's keys at [2l], values at [2l + 1]); each
    step writes its keys/values in place at position ``length``, so nothing grows by concatenation. Keys and
    values so far are views whose (N, h) dimensions merge into one, so attention reads them without copying.
    ``coverage`` (N, R) is the summed pointer weights of the steps so far (``GliedConfig.coverage``), or None.
    """

    def __init__(self, kv: torch.Tensor, length: int = 0, coverage: Optional[torch.Tensor] = None) -> None:
        self.kv, self.length, self.coverage = kv, length, coverage

    @classmethod
    def empty(cls, n: int, n_heads: int, d_k: int, capacity: int, like: torch.Tensor,
              layers: int = 1) -> "KVCache":
        return cls(like.new_empty(2 * layers, n, n_heads, capacity, d_k))

    @property
    def layers(self) -> int:
        return int(self.kv.shape[0]) // 2

    @property
    def capacity(self) -> int:
        return int(self.kv.shape[3])

    def append(self, kv_new: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's keys/values (N, 2, h, d_k) of pass ``layer``; returns that pass's keys and values so
        far, each (N, h, t, d_k). A step appends every pass in order; the last pass's append completes it."""
        t = self.length
        if t >= self.capacity:
            raise ValueError(f"decoding state holds {self.capacity} steps; step {t + 1} does not fit")
        self.kv[2 * layer:2 * layer + 2, :, :, t] = kv_new.transpose(0, 1)  # (2, N, h, d_k)
        if layer == self.layers - 1:
            self.length = t + 1
        return self.kv[2 * layer, :, :, :t + 1], self.kv[2 * layer + 1, :, :, :t + 1]

    def index_select(self, index: torch.Tensor) -> "KVCache":
        """The state of rows ``index`` (beam search reordering)."""
        cov = None if self.coverage is None else self.coverage.index_select(0, index)
        return KVCache(self.kv.index_select(1, index), self.length, cov)


#: decoding state passed between steps
State = KVCache


def _key_mask(mask: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(B, N) bool -> (attention mask (B, 1, 1, N) or None when all keys are real, rows with any key (B,)).

    A row without any real key may attend everywhere: its values are zeroed, so its output is zero (as in
    :meth:`MultiHeadAttention.weights`)."""
    has_key = mask.any(1)  # (B,)
    if bool(mask.all()):
        return None, has_key
    return (mask | ~has_key[:, None])[:, None, None, :], has_key  # (B, 1, 1, N)


def _zero_rows(v: torch.Tensor, has_key: torch.Tensor, keys: Optional[torch.Tensor]) -> torch.Tensor:
    """Values (B, h, N, d_k) with the rows of images without any real key zeroed (``keys`` None: all real)."""
    return v if keys is None else v * has_key[:, None, None, None].to(v.dtype)


def _add_pass_modules(m: nn.Module, c: GliedConfig, suffix: str) -> None:
    """The modules of one decoder pass, set on ``m``: context attention H_x with its G, then H_v, and G_v, H_vl,
    H_al (local distilling) or H_a (base), and G_c; its cross attentions read the memory entries named with
    ``suffix`` ("v" + suffix, ...)."""
    d, h, p = c.d_model, c.n_heads, c.dropout
    m.suffix = suffix
    m.h_x, m.g_x = MultiHeadAttention(d, h, p), Residual(d, p)
    m.h_v = MultiHeadAttention(d, h, p)
    if c.local_distilling:
        m.g_v = Residual(d, p)
        m.h_vl, m.h_al = MultiHeadAttention(d, h, p), MultiHeadAttention(d, h, p)
    else:
        m.h_a = MultiHeadAttention(d, h, p)
    m.g_c = Residual(d, p)


class DecoderPass(nn.Module):
    """Pass n >= 2 of a decoder with ``layers`` > 1: context attention over the previous pass's outputs and the
    cross-modal part, with weights of its own (the first pass's modules live on :class:`GliedDecoder` itself,
    under the same names)."""

    def __init__(self, c: GliedConfig, index: int) -> None:
        super().__init__()
        _add_pass_modules(self, c, str(index))


class GliedDecoder(nn.Module):
    """GLIED (or an ablation) over cached region features and attribute words.

    Inputs everywhere (batch of B images, R regions, K attribute words):
        regions (B, R, feature_dim) float; region_mask (B, R) bool, True = real region;
        attr_ids (B, K) long caption-vocabulary ids (OOV -> <unk>); attr_probs (B, K) float;
        attr_mask (B, K) bool.
    Caption vocabulary: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>.
    """

    def __init__(self, config: GliedConfig) -> None:
        super().__init__()
        c = self.config = config
        d, h, p = c.d_model, c.n_heads, c.dropout
        self.embed = nn.Embedding(c.vocab_size, c.d_embed, padding_idx=PAD)  # shared: words and attributes
        self.embed_proj = nn.Linear(c.d_embed, d)
        self.prob_proj = nn.Linear(1, d) if c.attr_probs else None
        self.region_proj = nn.Linear(c.feature_dim, d)
        self.sum_proj = nn.Linear(d, d) if c.region_sum else None  # W_s
        self.drop = nn.Dropout(p)
        self.register_buffer("pos_table", sinusoid_table(c.max_positions, d), persistent=False)
        if c.global_visual:
            self.h_vd, self.g_vd = MultiHeadAttention(d, h, p), Residual(d, p)
        if c.global_attribute:
            self.h_ad, self.g_ad = MultiHeadAttention(d, h, p), Residual(d, p)
        _add_pass_modules(self, c, "")  # the first pass; its memory entries: "v", "vl", "al" / "a"
        self.stack = nn.ModuleList(DecoderPass(c, i) for i in range(2, c.layers + 1))  # passes 2..L
        self.word = nn.Linear(d, c.vocab_size)  # W^c
        # W_b (built last, so the other layers' initial weights do not depend on it)
        self.box_proj = nn.Linear(8 * c.box_fourier, d) if c.box_fourier else None
        if c.coverage:  # the pointer's query/key projections and each region attention's per-head weights w_h
            self.ptr_q, self.ptr_k = nn.Linear(d, d // h), nn.Linear(d, d // h)
            self.cov_v = nn.Parameter(torch.zeros(h))
            self.cov_vl = nn.Parameter(torch.zeros(h)) if c.local_distilling else None
        self._low: Optional[LowPrecisionLinear] = None  # see set_decoding_precision

    def set_decoding_precision(self, dtype: Optional[torch.dtype]) -> "GliedDecoder":
        """Run the large GEMMs of inference (encoding and decoding steps, never under autograd) with weights
        copied to ``dtype`` (e.g. torch.bfloat16 on a CPU with native bf16: docs/decoding.md), or in fp32
        (None, the default). Attention, layer norms and decoding state stay fp32. Returns self."""
        self._low = None if dtype in (None, torch.float32) else LowPrecisionLinear(dtype)
        return self

    @property
    def passes(self) -> list[nn.Module]:
        """The decoder's passes in order: itself (the first pass's modules) and then ``stack``."""
        return [self, *self.stack]

    @property
    def decoding_precision(self) -> torch.dtype:
        return torch.float32 if self._low is None else self._low.dtype

    def _lin(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F.linear, or its low-precision form after :meth:`set_decoding_precision`."""
        return F.linear(x, weight, bias) if self._low is None else self._low(x, weight, bias)

    # ----------------------------------------------------------------------------------------- encoding
    def encode(self, regions: torch.Tensor, region_mask: torch.Tensor, attr_ids: torch.Tensor,
               attr_probs: torch.Tensor, attr_mask: torch.Tensor) -> Memory:
        """Embed regions and attribute words, run global visual distilling and project every cross-attention's
        keys/values once per image. Returns a :class:`Memory` for B images.

        Projections that read the same input run as one GEMM (fused weights); without autograd the attribute
        embedding W_e E[a] + W_p p is folded into the key/value projections that read it (exact up to float
        rounding), so attribute keys/values cost one 256-wide GEMM, or a table lookup once the weights were
        seen unchanged (decoding batch after batch)."""
        c = self.config
        h = c.n_heads
        region_mask, attr_mask = region_mask.bool(), attr_mask.bool()
        region_keys, has_region = _key_mask(region_mask)
        attr_keys, has_attr = _key_mask(attr_mask)
        regions = regions.to(self.region_proj.weight.dtype)
        I = self._lin(regions, self.region_proj.weight, self.region_proj.bias)  # (B, R, D)
        if self.box_proj is not None:
            boxes = box_fourier_features(regions[..., -GEOMETRY_DIMS:], c.box_fourier)  # (B, R, 8F)
            I = I + self._lin(boxes, self.box_proj.weight, self.box_proj.bias)
        I = self.drop(F.relu(I))  # (B, R, D)
        # every projection of I in one GEMM: [queries, keys, values of H_vd] + [keys, values of H_vl] per pass
        passes = self.passes
        from_I = ([self.h_vd.w_q, self.h_vd.w_k, self.h_vd.w_v] if c.global_visual else []) + (
            [lin for p in passes for lin in (p.h_vl.w_k, p.h_vl.w_v)] if c.local_distilling else [])
        kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if from_I:
            scales = (self.h_vd.d_k ** -0.5, 1.0, 1.0) if c.global_visual else ()
            scales += (1.0, 1.0) * len(passes) if c.local_distilling else ()
            parts = split_heads(self._lin(I, *fused_linear(*from_I, scales=scales)), len(from_I), h)  # (B, h, R, dk)
            if c.local_distilling:
                vl = parts[len(parts) - 2 * len(passes):]
                for i, p in enumerate(passes):
                    kv["vl" + p.suffix] = (vl[2 * i], _zero_rows(vl[2 * i + 1], has_region, region_keys))
        if c.global_visual:
            q, k, v = parts[:3]
            ctx = self.h_vd.attend_one(q, k, _zero_rows(v, has_region, region_keys), region_keys)  # (B, R, D)
            I_tilde = self.g_vd(self._lin(ctx, self.h_vd.w_o.weight, self.h_vd.w_o.bias), I)  # (B, R, D)
        else:
            I_tilde = I
        # every pass's H_v keys/values in one GEMM
        w, b = fused_linear(*[lin for p in passes for lin in (p.h_v.w_k, p.h_v.w_v)])
        parts = split_heads(self._lin(I_tilde, w, b), 2 * len(passes), h)  # (B, h, R, dk) each
        for i, p in enumerate(passes):
            kv["v" + p.suffix] = (parts[2 * i], _zero_rows(parts[2 * i + 1], has_region, region_keys))
        # attribute keys/values: H_ad and H_al of every pass (GLIED) or H_a of every pass (base)
        names = (["ad"] if c.global_attribute else []) + [
            ("al" if c.local_distilling else "a") + p.suffix for p in passes]
        heads = ([self.h_ad] if c.global_attribute else []) + [
            p.h_al if c.local_distilling else p.h_a for p in passes]
        parts = split_heads(self._attr_kv(heads, attr_ids, attr_probs), 2 * len(heads), h)  # (B, h, K, dk)
        for i, n in enumerate(names):
            kv[n] = (parts[2 * i], _zero_rows(parts[2 * i + 1], has_attr, attr_keys))
        pointer_keys = None
        if c.coverage:
            scale = self.ptr_k.out_features ** -0.5
            pointer_keys = F.linear(I, *fused_linear(self.ptr_k, scales=(scale,)))  # (B, R, dp)
        words = None
        if self.sum_proj is not None:
            total = (I * region_mask[..., None].to(I.dtype)).sum(1, keepdim=True)  # (B, 1, D)
            words = self._lin(total, self.sum_proj.weight, self.sum_proj.bias)  # (B, 1, D)
        return Memory(kv, region_mask, attr_mask, region_keys, attr_keys, words=words, pointer_keys=pointer_keys)

    def _attr_kv(self, heads: list[MultiHeadAttention], attr_ids: torch.Tensor,
                 attr_probs: torch.Tensor) -> torch.Tensor:
        """Keys and values of A = W_e E[a] + W_p p for the attention blocks ``heads``: (B, K, 2 * len(heads) * D)."""
        layers = [lin for m in heads for lin in (m.w_k, m.w_v)]
        p = attr_probs.to(self.embed_proj.weight.dtype).unsqueeze(-1)  # (B, K, 1)
        if torch.is_grad_enabled() or self.training:  # dropout on A, or gradients: the plain form
            A = self.embed_proj(self.embed(attr_ids))  # (B, K, D)
            if self.prob_proj is not None:
                A = A + self.prob_proj(p)
            return F.linear(self.drop(A), *fused_linear(*layers))

        def fold() -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
            w, b = fused_linear(*layers)  # (n*D, D)
            bias_in = self.embed_proj.bias + (self.prob_proj.bias if self.prob_proj is not None else 0.0)
            w_p = w @ self.prob_proj.weight[:, 0] if self.prob_proj is not None else None  # (n*D,)
            return w @ self.embed_proj.weight, torch.addmv(b, w, bias_in), w_p  # (n*D, d_embed), (n*D,)

        sources = [self.embed_proj, *layers] + ([self.prob_proj] if self.prob_proj is not None else [])
        key = tuple(map(id, layers))
        w, b, w_p = derived(self.embed_proj, ("attr_kv", key), sources, fold)
        # a model decoding batch after batch with the same weights: every word's keys/values as one table
        # (V, n*D), so attribute keys/values are a lookup; never built while the weights keep changing
        table = derived(self.embed_proj, ("attr_table", key), [self.embed, *sources],
                        lambda: F.linear(self.embed.weight, w, b), reuses_first=1)
        if table is not None:
            out = F.embedding(attr_ids, table)  # (B, K, n*D)
        else:
            out = self._lin(self.embed(attr_ids), w, b)  # (B, K, n*D)
        return out if w_p is None else out.addcmul_(p, w_p)

    # ----------------------------------------------------------------------------------------- decoding
    def _embed_words(self, tokens: torch.Tensor, start: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (N, T) -> (N, T, D) with positions start..start+T-1, plus ``bias`` (N, 1, D) when given."""
        t = tokens.shape[1]
        if start + t > self.config.max_positions:
            raise ValueError(f"caption position {start + t} exceeds max_positions "
                             f"{self.config.max_positions}")
        pos = self.pos_table[start:start + t]  # (T, D)
        if bias is not None:
            pos = pos + bias  # (N, T, D)
        if not (torch.is_grad_enabled() or self.training):
            # decoding batch after batch with the same weights: W_e E[w] of every word as one table (V, D)
            table = derived(self.embed_proj, ("word_table",), [self.embed, self.embed_proj],
                            lambda: F.linear(self.embed.weight, self.embed_proj.weight, self.embed_proj.bias),
                            reuses_first=1)
            if table is not None:
                return F.embedding(tokens, table) + pos
        return self.drop(self.embed_proj(self.embed(tokens)) + pos)

    def _pass(self, p: nn.Module, y: torch.Tensor, causal: torch.Tensor, mem: Memory) -> torch.Tensor:
        """One pass over whole sequences: its input y (N, T, D) (t̃, or the previous pass's c̃) -> c̃ (N, T, D)."""
        c, s = self.config, p.suffix
        rmask, amask = mem.region_mask[:, None, :], mem.attr_mask[:, None, :]
        x_tilde = p.g_x(p.h_x(y, y, causal), y)
        bias_v, bias_vl = self._coverage_bias(x_tilde, mem)
        if c.local_distilling:
            c_g = p.g_v(p.h_v.attend(x_tilde, *mem.kv["v" + s], rmask, bias_v), x_tilde)
            local = (p.h_vl.attend(c_g, *mem.kv["vl" + s], rmask, bias_vl)
                     + p.h_al.attend(c_g, *mem.kv["al" + s], amask))
            return p.g_c(local, c_g)
        both = (p.h_v.attend(x_tilde, *mem.kv["v" + s], rmask, bias_v)
                + p.h_a.attend(x_tilde, *mem.kv["a" + s], amask))
        return p.g_c(both, x_tilde)

    def _coverage_bias(self, x_tilde: torch.Tensor, mem: Memory
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Teacher-forced coverage: the score biases w_h kappa_t(r) (N, h, T, R) of H_v and of H_vl from x̃
        (N, T, D) (mem with one row per decoding row), or None where there is no coverage.

        beta_t(r) = sigmoid(q_t . k_r) marks the regions the words up to step t name (0 on padding regions);
        kappa_t = sum_{s<=t} beta_s, a cumulative sum over the steps, since x̃ depends on the words alone."""
        if not self.config.coverage:
            return None, None
        q = self.ptr_q(x_tilde)  # (N, T, dp)
        beta = torch.sigmoid(torch.matmul(q, mem.pointer_keys.transpose(1, 2)))  # (N, T, R)
        kappa = (beta * mem.region_mask[:, None, :].to(beta.dtype)).cumsum(1)[:, None]  # (N, 1, T, R)
        vl = None if self.cov_vl is None else kappa * self.cov_vl[:, None, None]
        return kappa * self.cov_v[:, None, None], vl

    def _pivot(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        """Global attribute distilling t̃ = G(H_ad(x, A, A), x), or x itself when switched off."""
        if not self.config.global_attribute:
            return x
        return self.g_ad(self.h_ad.attend(x, *mem.kv["ad"], mem.attr_mask[:, None, :]), x)

    def decode(self, mem: Memory, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced (uncached) decoding of whole sequences: tokens (N, T) starting with <bos>, mem for N
        rows. Returns logits (N, T, V); position t sees tokens 0..t only."""
        mem = mem.materialized()
        t = tokens.shape[1]
        y = self._pivot(self._embed_words(tokens, 0, mem.words), mem)  # t̃ (N, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
        for p in self.passes:
            y = self._pass(p, y, causal, mem)  # c̃ (N, T, D)
        return self.word(y)

    def init_state(self, n: int, capacity: int, like: torch.Tensor) -> KVCache:
        """An empty decoding state for n rows and up to ``capacity`` steps (dtype/device of ``like``)."""
        c = self.config
        return KVCache.empty(n, c.n_heads, c.d_model // c.n_heads, capacity, like, layers=c.layers)

    def step(self, mem: Memory, token: torch.Tensor, state: Optional[KVCache]) -> tuple[torch.Tensor, KVCache]:
        """One incremental decoding step.

        Args:
            mem: memory for N rows; token: (N,) the current input word; state: None at the first step (a state
                for ``max_positions`` steps is made), else the state returned by the previous step (or
                :meth:`init_state`).
        Returns:
            logits (N, V) for the next word, and the state, extended in place by this step.

        Same values as :meth:`decode` up to float rounding; projections reading the same input are fused into
        one GEMM, queries are pre-scaled by 1/sqrt(d_k), and the two attentions of local cross-modal
        distilling share one query and one output GEMM.
        """
        c = self.config
        n, h, dk = token.shape[0], c.n_heads, c.d_model // c.n_heads
        scale = dk ** -0.5
        x = self._embed_words(token[:, None], 0 if state is None else state.length, mem.word_bias())  # (N, 1, D)
        if state is None:
            state = self.init_state(n, c.max_positions, x)
        t_tilde = x
        if c.global_attribute:
            q = self._lin(x, *fused_linear(self.h_ad.w_q, scales=(scale,))).view(n, h, 1, dk)
            ctx = self._attend_memory(self.h_ad, q, mem, "ad", mem.attr_keys)  # (N, 1, D)
            t_tilde = self.g_ad(self._lin(ctx, self.h_ad.w_o.weight, self.h_ad.w_o.bias), x)  # (N, 1, D)
        y = t_tilde
        for i, p in enumerate(self.passes):
            qkv = self._lin(y, *fused_linear(p.h_x.w_q, p.h_x.w_k, p.h_x.w_v, scales=(scale, 1.0, 1.0)))
            qkv = qkv.view(n, 3, h, dk)  # (N, 3, h, dk)
            keys, values = state.append(qkv[:, 1:], i)  # (N, h, t+1, dk) each
            ctx = p.h_x.attend_one(qkv[:, 0, :, None], keys, values)  # (N, 1, D)
            x_tilde = p.g_x(self._lin(ctx, p.h_x.w_o.weight, p.h_x.w_o.bias), y)  # (N, 1, D)
            if c.coverage:  # kappa_t = kappa_{t-1} + beta_t
                beta = self._step_coverage(x_tilde, mem)  # (N, R)
                state.coverage = beta if state.coverage is None else state.coverage + beta
            y = self._step_cross(p, x_tilde, mem, state.coverage)  # c̃ (N, 1, D)
        return self._lin(y[:, 0], self.word.weight, self.word.bias), state  # (N, V)

    def _step_coverage(self, x_tilde: torch.Tensor, mem: Memory) -> torch.Tensor:
        """One step's pointer weights beta_t (N, R) from x̃ (N, 1, D) (:meth:`_coverage_bias`), for a shared memory
        too (``mem.group`` rows per image)."""
        keys = mem.pointer_keys  # (B, R, dp)
        q = F.linear(x_tilde[:, 0], self.ptr_q.weight, self.ptr_q.bias)  # (N, dp)
        b, r, dp = keys.shape
        beta = torch.sigmoid(torch.matmul(q.view(b, -1, dp), keys.transpose(1, 2)))  # (B, g, R)
        return (beta * mem.region_mask[:, None, :].to(beta.dtype)).view(-1, r)  # (N, R)

    @staticmethod
    def _covered(keys: Optional[torch.Tensor], kappa: Optional[torch.Tensor], w: Optional[torch.Tensor],
                 group: int) -> Optional[torch.Tensor]:
        """The mask or bias of one step's region attention: the key mask ``keys`` (B, 1, 1, R) or None, plus
        w_h kappa(r) when coverage (N, R) is given: (B, h, g, R) float, -inf on padding."""
        if kappa is None or w is None:
            return keys
        n, r = kappa.shape
        bias = kappa.view(n // group, 1, group, r) * w[:, None, None]  # (B, h, g, R)
        return bias if keys is None else bias.masked_fill(~keys, float("-inf"))

    def _step_cross(self, p: nn.Module, x_tilde: torch.Tensor, mem: Memory,
                    kappa: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cross-modal part of one pass at one decoding step: x̃ (N, 1, D) -> c̃ (N, 1, D); ``kappa`` (N, R)
        the coverage so far (``GliedConfig.coverage``) or None."""
        c, s = self.config, p.suffix
        n, h = x_tilde.shape[0], c.n_heads
        dk = c.d_model // h
        scale = dk ** -0.5
        g = mem.group
        cov_v, cov_vl = (self.cov_v, self.cov_vl) if kappa is not None else (None, None)
        if c.local_distilling:
            q = self._lin(x_tilde, *fused_linear(p.h_v.w_q, scales=(scale,))).view(n, h, 1, dk)
            ctx = self._attend_memory(p.h_v, q, mem, "v" + s,
                                      self._covered(mem.region_keys, kappa, cov_v, g))  # (N, 1, D)
            c_g = p.g_v(self._lin(ctx, p.h_v.w_o.weight, p.h_v.w_o.bias), x_tilde)
            query, pair = c_g, (("vl" + s, p.h_vl, self._covered(mem.region_keys, kappa, cov_vl, g)),
                                ("al" + s, p.h_al, mem.attr_keys))
        else:
            query, pair = x_tilde, (("v" + s, p.h_v, self._covered(mem.region_keys, kappa, cov_v, g)),
                                    ("a" + s, p.h_a, mem.attr_keys))
        # H_1(query, ...) + H_2(query, ...) as one query GEMM and one output GEMM over both heads' outputs
        (n1, m1, keys1), (n2, m2, keys2) = pair
        q = self._lin(query, *fused_linear(m1.w_q, m2.w_q, scales=(scale, scale))).view(n, 2, h, 1, dk)
        both = torch.cat([self._attend_memory(m1, q[:, 0], mem, n1, keys1),
                          self._attend_memory(m2, q[:, 1], mem, n2, keys2)], -1)  # (N, 1, 2D)
        return p.g_c(self._lin(both, *self._sum_of_outputs(m1, m2)), query)  # (N, 1, D)

    @staticmethod
    def _attend_memory(module: MultiHeadAttention, q: torch.Tensor, mem: Memory, name: str,
                       keys: Optional[torch.Tensor]) -> torch.Tensor:
        """One step's pre-scaled queries q (N, h, 1, d_k) over the memory's keys/values ``name`` -> (N, 1, D).
        With a shared memory (``mem.group`` = g rows per image) the g rows of an image attend as g queries of
        one row over its single copy."""
        k, v = mem.kv[name]
        g = mem.group
        if g == 1:
            return module.attend_one(q, k, v, keys)
        n, h, _, dk = q.shape
        qg = q.reshape(n // g, g, h, dk).transpose(1, 2)  # (B, h, g, dk)
        return module.attend_one(qg, k, v, keys).reshape(n, 1, h * dk)  # (B, g, D) -> (N, 1, D)

    def _sum_of_outputs(self, m1: MultiHeadAttention, m2: MultiHeadAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """W, b with [o1, o2] W^T + b = m1.w_o(o1) + m2.w_o(o2)."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([m1.w_o.weight, m2.w_o.weight], 1), m1.w_o.bias + m2.w_o.bias
        return derived(m1, ("sum_out", id(m2)), (m1.w_o, m2.w_o), build)

    def region_attention(self, mem: Memory, seqs: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention over the raw regions I while writing given sequences, for pictures.

        seqs (N, T) generated words (as from :meth:`generate`); mem for N rows. Returns (N, T, R): at step t the
        weights of the local visual distilling H_vl(c_g, I, I) (GLIED), or of the visual attention H_v (base), of
        the last pass.
        """
        c = self.config
        mem = mem.materialized()
        tokens = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs[:, :-1]], 1)  # (N, T) inputs
        t = tokens.shape[1]
        y = self._pivot(self._embed_words(tokens, 0, mem.words), mem)  # (N, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
        *before, p = self.passes
        for q in before:
            y = self._pass(q, y, causal, mem)
        x_tilde, s = p.g_x(p.h_x(y, y, causal), y), p.suffix
        rmask = mem.region_mask[:, None, :]  # (N, 1, R)
        bias_v, bias_vl = self._coverage_bias(x_tilde, mem)
        if c.local_distilling:
            c_g = p.g_v(p.h_v.attend(x_tilde, *mem.kv["v" + s], rmask, bias_v), x_tilde)
            w = p.h_vl.weights(c_g, mem.kv["vl" + s][0], rmask, bias_vl)  # (N, h, T, R)
        else:
            w = p.h_v.weights(x_tilde, mem.kv["v" + s][0], rmask, bias_v)  # (N, h, T, R)
        return w.mean(1)  # (N, T, R)

    # ----------------------------------------------------------------------------------------- training
    def forward(self, regions: torch.Tensor, region_mask: torch.Tensor, attr_ids: torch.Tensor,
                attr_probs: torch.Tensor, attr_mask: torch.Tensor,
                captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy.

        Args:
            captions: (B, S, L) word ids without <bos>/<eos>, 0-padded; S captions per image (an all-pad row
                is ignored).
        Returns:
            logits (B*S, L+1, V) and the mean token cross-entropy over real target tokens (words + <eos>).
        """
        b, s, l = captions.shape
        mem = self.encode(regions, region_mask, attr_ids, attr_probs, attr_mask).repeat(s)
        caps = captions.reshape(b * s, l)  # (B*S, L)
        lengths = (caps != PAD).sum(1)  # (B*S,)
        inputs = torch.cat([torch.full_like(caps[:, :1], BOS), caps], 1)  # (B*S, L+1)
        targets = torch.cat([caps, torch.zeros_like(caps[:, :1])], 1)  # (B*S, L+1)
        targets[torch.arange(b * s, device=caps.device), lengths] = EOS
        targets[lengths == 0] = PAD  # missing caption slots contribute nothing
        logits = self.decode(mem, inputs)  # (B*S, L+1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD,
                               label_smoothing=self.config.label_smoothing)
        return logits, loss

    @staticmethod
    def word_logprobs(logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Log-probabilities over words for decoding: <pad> and <bos> can never be generated. (..., V).
        ``inplace``: fp32 ``logits`` no longer needed by the caller are overwritten instead of copied."""
        logits = logits.float() if inplace else logits.float().clone()
        logits[..., PAD] = float("-inf")
        logits[..., BOS] = float("-inf")
        return torch.log_softmax(logits, -1, out=logits) if inplace else F.log_softmax(logits, -1)

    @staticmethod
    def greedy_words(logits: torch.Tensor) -> torch.Tensor:
        """The most probable word of every row, (N, V) -> (N,): ``word_logprobs(logits).argmax(-1)`` without the
        softmax (log-softmax is monotonic) and without copying the logits."""
        if (PAD, BOS) == (0, 1):  # the two words never generated lead the vocabulary: skip them
            return logits[:, 2:].max(-1).indices + 2  # max: the first maximum, as argmax, but faster on CPU
        return logits.index_fill(1, torch.tensor([PAD, BOS], device=logits.device), float("-inf")).max(-1).indices

    @torch.no_grad()
    def generate(self, regions: torch.Tensor, region_mask: torch.Tensor, attr_ids: torch.Tensor,
                 attr_probs: torch.Tensor, attr_mask: torch.Tensor, beam_size: int = 3,
                 max_len: int = 16) -> torch.Tensor:
        """Captions (B, <= max_len+1) of word ids ending in <eos> (then <pad>); beam 1 is greedy decoding."""
        from glied.models.beam import beam_search, greedy
        mem = self.encode(regions, region_mask, attr_ids, attr_probs, attr_mask)
        if beam_size == 1:
            return greedy(self, mem, max_len)[0]
        return beam_search(self, mem, beam_size, max_len)[0]


def token_mask(seqs: torch.Tensor) -> torch.Tensor:
    """(N, T) float mask of real tokens: every word up to and including the first <eos>."""
    is_end = (seqs == EOS) | (seqs == PAD)
    ended_before = torch.cumsum(is_end.long(), 1) - is_end.long()  # ends strictly before t
    return ((ended_before == 0) & (seqs != PAD)).float()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
