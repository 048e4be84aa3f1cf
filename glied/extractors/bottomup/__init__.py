"""Bottom-up attention region extractor (Anderson et al. 2018): Faster R-CNN ResNet-101 C4 trained on Visual
Genome (1600 classes, 400 attributes), on PyTorch + torchvision ops, loading the detectron2-format weights of
py-bottom-up-attention (``faster_rcnn_from_caffe_attr.pkl``) through a restricted unpickler and a strict key map.

Modules: ``config`` (BottomUpConfig, presets r101_vg / small), ``model`` (BottomUpDetector), ``backbone``,
``rpn``, ``roi_heads``, ``boxes`` (box coding), ``weights`` (safe loading), ``selection`` (butd / fixed36 /
adapt), ``extractor`` (load_region_extractor). Heavy imports happen on first attribute access.
"""
from __future__ import annotations

__all__ = ["BottomUpConfig", "BottomUpDetector", "load_region_extractor", "RegionExtractor"]


def __getattr__(name):
    if name == "BottomUpConfig":
        from glied.extractors.bottomup.config import BottomUpConfig
        return BottomUpConfig
    if name == "BottomUpDetector":
        from glied.extractors.bottomup.model import BottomUpDetector
        return BottomUpDetector
    if name in ("load_region_extractor", "RegionExtractor"):
        from glied.extractors.bottomup import extractor
        return getattr(extractor, name)
    raise AttributeError(name)
