"""Image reading and an in-memory bank of preprocessed training images for the MIL detector."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from glied.datasets.images import load_image
from glied.errors import InputError
from glied.extractors.mil.model import MilTransform


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 (H, W, 3), EXIF-oriented, through :func:`glied.datasets.images.load_image` (which refuses
    truncated files). Raises InputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image not found; check the prepared data's images_root or pass --images DIR")
    return load_image(p, min_side=1)


class ImageBank:
    """Preprocessed images (uint8, (3, S, S)) by index, read on first use and kept in memory while the total
    stays under ``cache_bytes`` (then read again each time, so large datasets still work)."""

    def __init__(self, paths: Sequence[str | Path], transform: MilTransform, cache_bytes: int = 2 << 30):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        per_image = 3 * transform.size * transform.size
        self.cache_limit = max(0, cache_bytes // per_image)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> np.ndarray:
        arr = self._cache.get(i)
        if arr is None:
            rgb, _ = self.transform.prepare_one(read_image(self.paths[i]))  # (S, S, 3) RGB
            arr = np.ascontiguousarray(rgb.transpose(2, 0, 1))  # (3, S, S)
            if len(self._cache) < self.cache_limit:
                self._cache[i] = arr
        return arr

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, 3, S, S) uint8 tensor of the given images."""
        return torch.from_numpy(np.stack([self.get(int(i)) for i in indices]))
