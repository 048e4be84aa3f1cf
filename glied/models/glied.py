"""The GLIED decoder and its cross-modal fully-attentive base model (Liu et al., IJCAI 2019).

Equations follow the paper's slides (FACTS.md §1.2); G(y; z) = LayerNorm(z + Dropout(y)) with no FFN.

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

Each of the three distilling parts has its own switch in :class:`GliedConfig`, so base, single additions and
full GLIED are the same code. Choices the paper leaves open (FACTS §1.6), made here:
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

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from glied.errors import ConfigError
from glied.models.attention import MultiHeadAttention, Residual, sinusoid_table

PAD, BOS, EOS, UNK = 0, 1, 2, 3

#: named ablations: (global_visual, global_attribute, local_distilling)
MODEL_PRESETS: dict[str, tuple[bool, bool, bool]] = {
    "glied": (True, True, True),
    "base": (False, False, False),
    "base+gvd": (True, False, False),  # + global visual distilling
    "base+gad": (False, True, False),  # + global attribute distilling
    "base+gld": (False, False, True),  # + global aspect vector and local cross-modal distilling
}


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

    def __post_init__(self) -> None:
        """ConfigError (one line for the CLI) on sizes the model cannot be built with."""
        for k in ("vocab_size", "d_model", "d_embed", "n_heads", "feature_dim", "max_positions"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {k} must be a positive integer, not {v!r}")
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


@dataclass
class Memory:
    """Per-image encoder output, computed once and reused at every decoding step.

    ``kv`` holds pre-projected (keys, values), each (B, h, N, d_k), for every cross attention; ``region_mask``
    (B, R) and ``attr_mask`` (B, K) are bool, True = real entry.
    """

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    region_mask: torch.Tensor
    attr_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.region_mask.shape[0])

    def index_select(self, index: torch.Tensor) -> "Memory":
        """Rows ``index`` (e.g. ``arange(B).repeat_interleave(k)`` to expand for k beams/captions)."""
        kv = {n: (k.index_select(0, index), v.index_select(0, index)) for n, (k, v) in self.kv.items()}
        return Memory(kv, self.region_mask.index_select(0, index), self.attr_mask.index_select(0, index))

    def repeat(self, n: int) -> "Memory":
        """Each image repeated n times in a row: (B, ...) -> (B*n, ...)."""
        if n == 1:
            return self
        rows = torch.arange(self.batch_size, device=self.region_mask.device).repeat_interleave(n)  # (B*n,)
        return self.index_select(rows)


#: decoding state: causal context-attention keys and values of the steps so far, each (B, h, t, d_k)
State = tuple[torch.Tensor, torch.Tensor]


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
        self.drop = nn.Dropout(p)
        self.register_buffer("pos_table", sinusoid_table(c.max_positions, d), persistent=False)
        if c.global_visual:
            self.h_vd, self.g_vd = MultiHeadAttention(d, h, p), Residual(d, p)
        if c.global_attribute:
            self.h_ad, self.g_ad = MultiHeadAttention(d, h, p), Residual(d, p)
        self.h_x, self.g_x = MultiHeadAttention(d, h, p), Residual(d, p)
        self.h_v = MultiHeadAttention(d, h, p)
        if c.local_distilling:
            self.g_v = Residual(d, p)
            self.h_vl, self.h_al = MultiHeadAttention(d, h, p), MultiHeadAttention(d, h, p)
        else:
            self.h_a = MultiHeadAttention(d, h, p)
        self.g_c = Residual(d, p)
        self.word = nn.Linear(d, c.vocab_size)  # W^c

    # ----------------------------------------------------------------------------------------- encoding
    def encode(self, regions: torch.Tensor, region_mask: torch.Tensor, attr_ids: torch.Tensor,
               attr_probs: torch.Tensor, attr_mask: torch.Tensor) -> Memory:
        """Embed regions and attribute words, run global visual distilling and project every cross-attention's
        keys/values once per image. Returns a :class:`Memory` for B images."""
        c = self.config
        region_mask, attr_mask = region_mask.bool(), attr_mask.bool()
        I = self.drop(F.relu(self.region_proj(regions.float())))  # (B, R, D)
        A = self.embed_proj(self.embed(attr_ids))  # (B, K, D)
        if self.prob_proj is not None:
            A = A + self.prob_proj(attr_probs.float().unsqueeze(-1))  # (B, K, D)
        A = self.drop(A)
        rmask = region_mask[:, None, :]  # (B, 1, R)
        I_tilde = self.g_vd(self.h_vd(I, I, rmask), I) if c.global_visual else I  # (B, R, D)
        kv = {"v": self.h_v.project_kv(I_tilde)}
        if c.global_attribute:
            kv["ad"] = self.h_ad.project_kv(A)
        if c.local_distilling:
            kv["vl"], kv["al"] = self.h_vl.project_kv(I), self.h_al.project_kv(A)
        else:
            kv["a"] = self.h_a.project_kv(A)
        return Memory(kv, region_mask, attr_mask)

    # ----------------------------------------------------------------------------------------- decoding
    def _embed_words(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (N, T) -> (N, T, D) with positions start..start+T-1."""
        t = tokens.shape[1]
        if start + t > self.config.max_positions:
            raise ValueError(f"caption position {start + t} exceeds max_positions "
                             f"{self.config.max_positions}")
        x = self.embed_proj(self.embed(tokens)) + self.pos_table[start:start + t]
        return self.drop(x)

    def _after_context(self, t_tilde: torch.Tensor, ctx: torch.Tensor, mem: Memory,
                       few_rows: bool = False) -> torch.Tensor:
        """From the context-attention output to logits: (N, T, D) -> (N, T, V)."""
        c = self.config
        rmask, amask = mem.region_mask[:, None, :], mem.attr_mask[:, None, :]
        x_tilde = self.g_x(ctx, t_tilde)
        if c.local_distilling:
            c_g = self.g_v(self.h_v.attend(x_tilde, *mem.kv["v"], rmask), x_tilde)
            local = self.h_vl.attend(c_g, *mem.kv["vl"], rmask) + self.h_al.attend(c_g, *mem.kv["al"], amask)
            c_tilde = self.g_c(local, c_g)
        else:
            both = (self.h_v.attend(x_tilde, *mem.kv["v"], rmask)
                    + self.h_a.attend(x_tilde, *mem.kv["a"], amask))
            c_tilde = self.g_c(both, x_tilde)
        if few_rows and c_tilde.shape[0] * c_tilde.shape[1] <= 8:
            # decoding a handful of rows: W (V, D) @ c^T is several times faster on CPU than c @ W^T (the
            # BLAS picks a packing GEMM for 2..8 rows); same values up to float rounding
            flat = c_tilde.reshape(-1, c_tilde.shape[-1])  # (N*T, D)
            return torch.addmm(self.word.bias[:, None], self.word.weight, flat.T).T.reshape(
                *c_tilde.shape[:-1], -1)  # (N, T, V)
        return self.word(c_tilde)

    def _pivot(self, x: torch.Tensor, mem: Memory) -> torch.Tensor:
        """Global attribute distilling t̃ = G(H_ad(x, A, A), x), or x itself when switched off."""
        if not self.config.global_attribute:
            return x
        return self.g_ad(self.h_ad.attend(x, *mem.kv["ad"], mem.attr_mask[:, None, :]), x)

    def decode(self, mem: Memory, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced (uncached) decoding of whole sequences: tokens (N, T) starting with <bos>, mem for N
        rows. Returns logits (N, T, V); position t sees tokens 0..t only."""
        t = tokens.shape[1]
        t_tilde = self._pivot(self._embed_words(tokens, 0), mem)  # (N, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
        ctx = self.h_x(t_tilde, t_tilde, causal)
        return self._after_context(t_tilde, ctx, mem)

    def step(self, mem: Memory, token: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, State]:
        """One incremental decoding step.

        Args:
            mem: memory for N rows; token: (N,) the current input word; state: None at the first step, else
                the (keys, values) returned by the previous step.
        Returns:
            logits (N, V) for the next word, and the new state (keys/values extended by this step).
        """
        pos = 0 if state is None else state[0].shape[2]
        t_tilde = self._pivot(self._embed_words(token[:, None], pos), mem)  # (N, 1, D)
        k_new, v_new = self.h_x.project_kv(t_tilde)  # (N, h, 1, d_k)
        if state is not None:
            k_new = torch.cat([state[0], k_new], 2)  # (N, h, t+1, d_k)
            v_new = torch.cat([state[1], v_new], 2)  # (N, h, t+1, d_k)
        ctx = self.h_x.attend(t_tilde, k_new, v_new)
        return self._after_context(t_tilde, ctx, mem, few_rows=True)[:, 0], (k_new, v_new)

    def region_attention(self, mem: Memory, seqs: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention over the raw regions I while writing given sequences, for pictures.

        seqs (N, T) generated words (as from :meth:`generate`); mem for N rows. Returns (N, T, R): at step t the
        weights of the local visual distilling H_vl(c_g, I, I) (GLIED), or of the visual attention H_v (base).
        """
        c = self.config
        tokens = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs[:, :-1]], 1)  # (N, T) inputs
        t = tokens.shape[1]
        t_tilde = self._pivot(self._embed_words(tokens, 0), mem)  # (N, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
        x_tilde = self.g_x(self.h_x(t_tilde, t_tilde, causal), t_tilde)
        rmask = mem.region_mask[:, None, :]  # (N, 1, R)
        if c.local_distilling:
            c_g = self.g_v(self.h_v.attend(x_tilde, *mem.kv["v"], rmask), x_tilde)
            w = self.h_vl.weights(c_g, mem.kv["vl"][0], rmask)  # (N, h, T, R)
        else:
            w = self.h_v.weights(x_tilde, mem.kv["v"][0], rmask)  # (N, h, T, R)
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
    def word_logprobs(logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over words for decoding: <pad> and <bos> can never be generated. (..., V)."""
        logits = logits.float().clone()
        logits[..., PAD] = float("-inf")
        logits[..., BOS] = float("-inf")
        return F.log_softmax(logits, -1)

    def sequence_logprobs(self, mem: Memory, seqs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of given sequences (for SCST). seqs (N, T) generated words (ending in <eos> then
        <pad>); mem for N rows. Returns (N, T) log p(seqs[:, t] | prefix), 0 after the first <eos>."""
        inputs = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs[:, :-1]], 1)  # (N, T)
        logp = self.word_logprobs(self.decode(mem, inputs)).gather(2, seqs.unsqueeze(2)).squeeze(2)  # (N, T)
        logp = logp.masked_fill(seqs == PAD, 0.0)
        return logp * token_mask(seqs)

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
