"""RoI head: RoIPool 14x14 on res4 -> res5 (per RoI, stride 1, dilation 2) -> mean pool -> 2048-d features,
then the box predictor (classes with background LAST, class-specific deltas) and the attribute head.

RoIPool is torchvision's (max pooling with caffe's quantised bins, spatial scale 1/16), not RoIAlign.
res5 runs in chunks of ``cfg.res5_chunk`` RoIs: the maths is per RoI, and small chunks keep the working set in
cache (about 2x faster on CPU than one batch of 300).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from glied.extractors.bottomup.backbone import make_res5
from glied.extractors.bottomup.config import BottomUpConfig


class BoxPredictor(nn.Module):
    """feat (K, D) -> class logits (K, C+1) (background = index C, last), box deltas (K, 4C) (no bg column)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, 4 * num_classes)

    def forward(self, feat: torch.Tensor):
        return self.cls_score(feat), self.bbox_pred(feat)


class AttributeHead(nn.Module):
    """Attribute logits (K, A+1) ("no attribute" = index A, last) from the feature and a class index:
    embedding(cls_idx) (E) concatenated AFTER the feature -> fc (hidden) + ReLU -> logits.
    At test time cls_idx is the argmax over all C+1 class logits (background included), as in the port;
    in training the ground-truth class is fed."""

    def __init__(self, dim: int, num_classes: int, num_attributes: int, embed_dim: int, hidden: int):
        super().__init__()
        self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Linear(dim + embed_dim, hidden)
        self.score = nn.Linear(hidden, num_attributes + 1)

    def forward(self, feat: torch.Tensor, cls_idx: torch.Tensor) -> torch.Tensor:
        x = torch.cat([feat, self.cls_embedding(cls_idx).to(feat.dtype)], dim=1)   # (K, D + E)
        return self.score(F.relu(self.fc(x)))                                      # (K, A + 1)


class RoIHeads(nn.Module):
    def __init__(self, cfg: BottomUpConfig):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32     # res5's dtype (set by BottomUpDetector.optimise_for_inference)
        self.channels_last = False
        self.res5 = make_res5(cfg)
        self.box_predictor = BoxPredictor(cfg.feature_dim, cfg.num_classes)
        self.attr_head = AttributeHead(cfg.feature_dim, cfg.num_classes, cfg.num_attributes,
                                       cfg.attr_embed_dim, cfg.attr_hidden)
        self.res5_gemm = None     # a GemmRes5 (the fast fp32 path; set by BottomUpDetector.optimise_for_inference)

    def pool(self, res4: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """res4 (B, C4, Hf, Wf), rois (K, 5) [batch_idx, x1, y1, x2, y2] in input pixels -> (K, C4, P, P)."""
        r = self.cfg.pooler_resolution
        # float32 always: RoIPool has no CPU bf16 kernel, and box coordinates must not be rounded to 8 bits
        return roi_pool(res4.float(), rois.float(), (r, r), 1.0 / self.cfg.feature_stride)

    def features(self, res4: torch.Tensor, rois: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Pool + res5 + mean over the PxP map, chunk by chunk: rois (K, 5) on res4 (B, C4, Hf, Wf) -> (K, D)."""
        return self.features_many([res4], [rois], chunk)[0]

    def features_many(self, res4s: list, rois: list, chunk: int | None = None) -> list:
        """Region features of several images at once: res4s[i] (1 or B, C4, Hf_i, Wf_i) with rois[i] (K_i, 5)
        [batch_idx, x1, y1, x2, y2] -> [(K_i, D) float32]. The RoIs of all images go through res5 together, in
        chunks of ``chunk`` RoIs that may span images (res5 is per RoI, so the grouping does not change the
        maths); only one chunk of pooled maps is alive at a time."""
        chunk = chunk or self.cfg.res5_chunk
        res4s = [r.float().contiguous() for r in res4s]   # RoIPool reads float32 NCHW; convert once, not per chunk
        sizes = [int(r.shape[0]) for r in rois]
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        outs = []
        for s in range(0, starts[-1], chunk):
            e = min(s + chunk, starts[-1])
            pooled = [self.pool(res4s[i], rois[i][max(s, starts[i]) - starts[i]:min(e, starts[i + 1]) - starts[i]])
                      for i in range(len(rois)) if starts[i] < e and starts[i + 1] > s]
            pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=0)    # (k, C4, P, P)
            outs.append(self.res5_mean(pooled))                                     # (k, D)
        if not outs:
            empty = res4s[0].new_zeros((0, self.cfg.feature_dim)) if res4s else torch.zeros(0, self.cfg.feature_dim)
            return [empty for _ in rois]
        return list(torch.cat(outs, dim=0).split(sizes))

    def res5_mean(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled maps (k, C4, P, P) float32 -> res5 -> mean over the P x P map: (k, D) float32."""
        if self.res5_gemm is not None:
            return self.res5_gemm(pooled)
        pooled = pooled.to(self.compute_dtype).contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return self.res5(pooled).float().mean(dim=(2, 3))

    def predict(self, feat: torch.Tensor):
        """feat (K, D) -> cls_logits (K, C+1), box_deltas (K, 4C), attr_logits (K, A+1), all float32; the attribute
        head is conditioned on the argmax over all C+1 logits (background included)."""
        feat = feat.float()
        cls_logits, deltas = self.box_predictor(feat)
        attr_logits = self.attr_head(feat, cls_logits.argmax(dim=1))
        return cls_logits.float(), deltas.float(), attr_logits.float()
