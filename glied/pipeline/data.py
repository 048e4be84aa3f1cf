"""Data stages: make the synthetic shapes world and prepare Karpathy-format caption files."""
from __future__ import annotations

import os

from glied.datasets.prepared import PrepareConfig, prepare
from glied.datasets.shapes import ShapesConfig, make_shapes


def make_shapes_world(out: str | os.PathLike, n_images: int, seed: int = 0, size: int = 128,
                      workers: int | None = None) -> dict:
    """Render a shapes world into ``out`` (images/, instances.json, captions.json); returns a summary."""
    return make_shapes(out, ShapesConfig(n_images=n_images, seed=seed, size=size), workers=workers)


def prepare_captions(captions_json: str | os.PathLike, out: str | os.PathLike, count_threshold: int = 5,
                     max_length: int = 16, images_root: str | os.PathLike | None = None) -> dict:
    """Prepare vocabulary, encoded captions, splits and references from a Karpathy-format file."""
    return prepare(captions_json, out, PrepareConfig(count_threshold=count_threshold, max_length=max_length),
                   images_root=images_root)
