"""Decoder input rows of one image's regions: features, optionally with each box's geometry."""
import numpy as np

from glied.datasets.captions import GEOMETRY_DIMS, region_matrix
from glied.records import RegionFeatures


def _regions() -> RegionFeatures:
    boxes = np.array([[0, 0, 64, 32], [32, 64, 128, 128]], np.float32)
    feats = np.arange(6, dtype=np.float16).reshape(2, 3)
    z = np.zeros(2)
    return RegionFeatures(boxes=boxes, features=feats, obj_ids=z.astype(np.int64), obj_scores=z.astype(np.float32),
                          attr_ids=z.astype(np.int64), attr_scores=z.astype(np.float32), image_w=128, image_h=128)


def test_features_only_by_default_and_writable():
    m = region_matrix(_regions())
    assert m.dtype == np.float32 and m.shape == (2, 3) and m.flags.writeable


def test_box_geometry_appends_normalised_position_and_area():
    m = region_matrix(_regions(), box_geometry=True)
    assert m.shape == (2, 3 + GEOMETRY_DIMS)
    np.testing.assert_allclose(m[:, :3], np.arange(6).reshape(2, 3))
    np.testing.assert_allclose(m[0, 3:], [0, 0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(m[1, 3:], [0.25, 0.5, 1.0, 1.0, 0.375])
