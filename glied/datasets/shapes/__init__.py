"""The synthetic shapes world: photo-like scenes with COCO boxes and Karpathy-format captions.

``make_shapes(out_dir, n_images, seed)`` writes ``images/``, ``instances.json`` and ``captions.json``.
Every stage of glied trains and is measured on this world on CPU in minutes.
"""
from glied.datasets.shapes.world import ShapesConfig, make_shapes

__all__ = ["ShapesConfig", "make_shapes"]
