"""Equality checks on extracted regions and feature caches, shared by the extraction and cache tests.

Not a test module (no test_ prefix); imported as ``tests.cache_checks`` (setup.cfg puts the repo root on the path).
"""
from __future__ import annotations

import numpy as np

REGION_ARRAYS = ("boxes", "features", "obj_ids", "obj_scores", "attr_ids", "attr_scores")


def assert_same_regions(a, b, what: str = "") -> None:
    """Two RegionFeatures are equal bit for bit: every array and the recorded image size."""
    for f in REGION_ARRAYS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{what} {f}")
    assert (a.image_w, a.image_h) == (b.image_w, b.image_h), what


def assert_same_cache(ref, got, verify: bool = True) -> None:
    """``got`` holds exactly ``ref``'s ids (each once) with bit-equal regions; with ``verify`` its checksums hold."""
    assert sorted(got.ids()) == sorted(ref.ids()) and len(set(got.ids())) == len(got.ids())
    if verify:
        assert got.verify() == []
    for i in ref.ids():
        assert_same_regions(ref.regions(i), got.regions(i), i)
