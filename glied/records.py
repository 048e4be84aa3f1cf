"""Typed per-image records passed between stages and stored in the feature cache.

These are plain numpy containers with no torch dependency, so the cache, the extractors and the decoder can
all share them without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RegionFeatures:
    """Regions of one image, as the bottom-up detector returns them.

    Attributes:
        boxes: (R, 4) float32, x1, y1, x2, y2 in original-image pixels.
        features: (R, D) float32 (or float16 when read from a float16 cache), D = 2048 for R101-C4.
        obj_ids: (R,) int64 object class index (0-based, background excluded).
        obj_scores: (R,) float32 probability of that class.
        attr_ids: (R,) int64 attribute index (0-based, "no attribute" excluded).
        attr_scores: (R,) float32 probability of that attribute.
        image_w, image_h: size of the original image in pixels (after EXIF orientation).
    """

    boxes: np.ndarray
    features: np.ndarray
    obj_ids: np.ndarray
    obj_scores: np.ndarray
    attr_ids: np.ndarray
    attr_scores: np.ndarray
    image_w: int
    image_h: int

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class AttributeWords:
    """Image-level attribute words from the MIL detector, best first.

    Attributes:
        word_ids: (K,) int64 indices into the attribute vocabulary (stored in the cache manifest).
        probs: (K,) float32 noisy-OR probabilities p(w | I), descending.
        word_map: optional (V, h, w) float32 per-cell probabilities, kept for visualisation.
    """

    word_ids: np.ndarray
    probs: np.ndarray
    word_map: Optional[np.ndarray] = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.word_ids.shape[0])
