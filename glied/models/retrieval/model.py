"""The two retrieval models over cached bottom-up regions, one frozen config each.

* :class:`TeranModel` — TERAN (Messina et al., ACM TOMM 2021): regions concatenated with their normalised
  boxes (x1, y1, x2, y2, area) through an MLP, with an all-zero "CLS" region in slot 0; transformer-encoder
  layers, a linear map to the joint space and more layers; the text side is a word encoder, a linear map and
  its own transformer layers. Every region and word vector is L2-normalised; an image–sentence pair scores
  :func:`mrsw_scores` (the CLS region and, for BERT, [CLS] / [SEP] excluded).
* :class:`VseModel` — a VSE∞-style dual encoder (Chen et al., CVPR 2021): regions through a linear map plus a
  residual MLP, words through the text encoder and a linear map, GPO pooling on both sides and L2
  normalisation — one vector per image and per sentence, so a search is one matrix product.

Both take cached features ``(B, R, F)``, pixel boxes ``(B, R, 4)``, image sizes ``(B, 2)`` and a region mask
``(B, R)``, and token ids ``(N, L)`` with a mask, and return an :class:`Embedding` — vectors ``(N, T, D)``
with a ``(N, T)`` mask of the entries that count in the score (VSE: T = 1). ``forward`` is the training loss
(:func:`hinge_triplet_loss` over the batch's pairs); ``scores`` compares embeddings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from glied.errors import ConfigError
from glied.models.retrieval.layers import GPO, RowMLP, encode, normalised_boxes, transformer
from glied.models.retrieval.score import hinge_triplet_loss, mrsw_scores
from glied.models.retrieval.text import build_text


class Embedding(NamedTuple):
    """vectors (N, T, D) L2-normalised; mask (N, T) bool: the entries that take part in the score."""

    vectors: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:  # number of items, not the tuple's fields
        return self.vectors.shape[0]


@dataclass(frozen=True)
class VseConfig:
    """VSE∞ dual encoder. Defaults are the paper's region + BiGRU model (joint space 1024)."""

    feature_dim: int
    vocab_size: int
    embed_dim: int = 1024
    word_dim: int = 300
    text_encoder: str = "gru"            # "gru" or a local BERT-family model folder
    bert_layers: Optional[int] = None
    gpo_dim: int = 32
    region_drop: float = 0.2             # training: each region dropped with this probability (VSE∞: 20%)
    boxes: bool = False                  # also feed each region's normalised box, as TERAN does (not in VSE∞)
    margin: float = 0.2
    model: str = "vse"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TeranConfig:
    """TERAN. Defaults are the paper's (MrSw, visual transformer at 2048, joint space 1024)."""

    feature_dim: int
    vocab_size: int
    visual_dim: int = 2048               # region MLP (F + 5 -> visual_dim -> visual_dim) and first visual layers
    visual_layers: int = 4
    embed_dim: int = 1024                # the joint space
    shared_layers: int = 2               # layers after the linear map to embed_dim, on each side
    heads: int = 4
    ff_dim: int = 2048
    dropout: float = 0.1
    word_dim: int = 300
    text_encoder: str = "gru"
    bert_layers: Optional[int] = 6
    margin: float = 0.2
    model: str = "teran"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RetrievalConfig = Union[VseConfig, TeranConfig]
MODELS = ("vse", "teran")
# "small": sizes for the synthetic shapes world and tests on a CPU; "paper": the published sizes
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vse": {"paper": {}, "small": {"embed_dim": 256, "word_dim": 128}},
    "teran": {"paper": {}, "small": {"visual_dim": 256, "visual_layers": 2, "embed_dim": 256, "shared_layers": 1,
                                     "ff_dim": 512, "word_dim": 128}},
}


def config_from_dict(d: dict[str, Any]) -> RetrievalConfig:
    """Rebuild a config saved with ``to_dict()``."""
    cls = {"vse": VseConfig, "teran": TeranConfig}.get(d.get("model", ""))
    if cls is None:
        raise ConfigError(f"unknown retrieval model {d.get('model')!r}; expected one of {', '.join(MODELS)}")
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def make_config(model: str, preset: str, **kw) -> RetrievalConfig:
    """A config of ``model`` ("vse" | "teran") with a size ``preset`` ("paper" | "small") and overrides."""
    if model not in MODELS:
        raise ConfigError(f"unknown retrieval model {model!r}; choose one of {', '.join(MODELS)}")
    if preset not in PRESETS[model]:
        raise ConfigError(f"unknown size preset {preset!r}; choose one of {', '.join(PRESETS[model])}")
    cls = VseConfig if model == "vse" else TeranConfig
    return replace(cls(**kw), **PRESETS[model][preset])


class RetrievalModel(nn.Module):
    """Shared interface: embed_images, embed_texts, scores, forward (loss)."""

    config: RetrievalConfig

    def embed_images(self, features: torch.Tensor, boxes: torch.Tensor, image_wh: torch.Tensor,
                     mask: torch.Tensor) -> Embedding:
        raise NotImplementedError

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> Embedding:
        raise NotImplementedError

    def scores(self, images: Embedding, texts: Embedding) -> torch.Tensor:
        """(Ni, Nt) similarity of every image with every sentence."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, image_wh: torch.Tensor, mask: torch.Tensor,
                ids: torch.Tensor, ids_mask: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        """Hinge triplet loss of a batch of B matching (image, sentence) pairs, row b with row b."""
        s = self.scores(self.embed_images(features, boxes, image_wh, mask), self.embed_texts(ids, ids_mask))
        return hinge_triplet_loss(s, self.config.margin, hardest=hardest)


class VseModel(RetrievalModel):
    def __init__(self, config: VseConfig):
        super().__init__()
        self.config = c = config
        d_in = c.feature_dim + (5 if c.boxes else 0)
        self.fc = nn.Linear(d_in, c.embed_dim)
        self.mlp = RowMLP(d_in, c.embed_dim // 2, c.embed_dim)
        self.image_pool = GPO(c.gpo_dim, c.gpo_dim)
        self.text, self.is_bert = build_text(c.text_encoder, c.vocab_size, c.word_dim, c.embed_dim, c.bert_layers)
        self.text_proj = nn.Linear(self.text.out_dim, c.embed_dim) if self.is_bert else nn.Identity()
        self.text_pool = GPO(c.gpo_dim, c.gpo_dim)

    def embed_images(self, features, boxes, image_wh, mask) -> Embedding:
        features = features.float()
        if self.config.boxes:
            features = torch.cat([features, normalised_boxes(boxes.float(), image_wh)], dim=-1)  # (B, R, F+5)
        if self.training and self.config.region_drop > 0:
            keep = torch.rand(mask.shape, device=mask.device) >= self.config.region_drop
            keep[:, 0] |= ~(keep & mask).any(1)              # never drop every region of an image
            mask = mask & keep
        x = self.fc(features) + self.mlp(features, mask)                         # (B, R, D)
        v = F.normalize(self.image_pool(x, mask), dim=-1)                        # (B, D)
        return Embedding(v.unsqueeze(1), torch.ones(v.shape[0], 1, dtype=torch.bool, device=v.device))

    def embed_texts(self, ids, mask) -> Embedding:
        w = self.text_proj(self.text(ids, mask))                                 # (N, L, D)
        v = F.normalize(self.text_pool(w, mask), dim=-1)                         # (N, D)
        return Embedding(v.unsqueeze(1), torch.ones(v.shape[0], 1, dtype=torch.bool, device=v.device))

    def scores(self, images: Embedding, texts: Embedding) -> torch.Tensor:
        return images.vectors[:, 0] @ texts.vectors[:, 0].t()                   # (Ni, Nt) cosine


class TeranModel(RetrievalModel):
    def __init__(self, config: TeranConfig):
        super().__init__()
        self.config = c = config
        self.region_mlp = nn.Sequential(nn.Linear(c.feature_dim + 5, c.visual_dim), nn.ReLU(),
                                        nn.Linear(c.visual_dim, c.visual_dim))
        self.visual = transformer(c.visual_dim, c.visual_layers, c.heads, c.ff_dim, c.dropout)
        self.visual_proj = nn.Linear(c.visual_dim, c.embed_dim)
        self.visual_top = transformer(c.embed_dim, c.shared_layers, c.heads, c.ff_dim, c.dropout)
        self.text, self.is_bert = build_text(c.text_encoder, c.vocab_size, c.word_dim, c.embed_dim, c.bert_layers)
        self.text_proj = nn.Linear(self.text.out_dim, c.embed_dim)
        self.text_top = transformer(c.embed_dim, c.shared_layers, c.heads, c.ff_dim, c.dropout)

    def embed_images(self, features, boxes, image_wh, mask) -> Embedding:
        b = features.shape[0]
        x = torch.cat([features.float(), normalised_boxes(boxes.float(), image_wh)], dim=-1)  # (B, R, F+5)
        x = torch.cat([x.new_zeros(b, 1, x.shape[-1]), x], dim=1)              # (B, 1+R, F+5) slot 0: CLS
        full = torch.cat([mask.new_ones(b, 1), mask], dim=1)                    # (B, 1+R)
        h = encode(self.visual, self.region_mlp(x), full)                       # (B, 1+R, Dv)
        h = encode(self.visual_top, self.visual_proj(h), full)                  # (B, 1+R, D)
        scored = full.clone()
        scored[:, 0] = False                                                    # CLS is not a region
        return Embedding(F.normalize(h, dim=-1), scored)

    def embed_texts(self, ids, mask) -> Embedding:
        h = encode(self.text_top, self.text_proj(self.text(ids, mask)), mask)  # (N, L, D)
        scored = mask.clone()
        if self.is_bert:                                                        # drop [CLS] and [SEP]
            scored[:, 0] = False
            last = mask.sum(1) - 1                                              # (N,)
            scored[torch.arange(len(ids)), last] = False
        return Embedding(F.normalize(h, dim=-1), scored)

    def scores(self, images: Embedding, texts: Embedding) -> torch.Tensor:
        return mrsw_scores(images.vectors, images.mask, texts.vectors, texts.mask)


def build_retrieval_model(config: RetrievalConfig) -> RetrievalModel:
    """The model of a config (weights freshly initialised)."""
    return VseModel(config) if isinstance(config, VseConfig) else TeranModel(config)
