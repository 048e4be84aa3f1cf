"""MIL attribute-word detector (Fang et al., CVPR 2015): words from captions, noisy-OR over a word map.

Public API::

    from glied.extractors.mil import load_attribute_extractor
    ext = load_attribute_extractor("runs/mil", device="cpu", top_k=50)
    words = ext.extract([bgr_uint8_image])          # list[AttributeWords], best first
    maps = ext.word_maps([bgr_uint8_image])         # list of (V, h, w) per-cell probabilities

Modules: ``config`` (MilConfig, MilTrainConfig), ``vocab`` (vocabulary and labels from captions), ``noisy_or``
(log-space numerics), ``model`` (MilNet + MilTransform), ``train``, ``evaluate``, ``inference``,
``checkpoint``.
"""
from __future__ import annotations

__all__ = ["MilConfig", "MilTrainConfig", "AttributeExtractor", "load_attribute_extractor", "DEFAULT_TOP_K"]


def __getattr__(name):
    """Heavy imports (torch) on first use, so ``glied.extractors.mil.config`` stays light for the CLI."""
    if name in ("MilConfig", "MilTrainConfig"):
        from glied.extractors.mil import config
        return getattr(config, name)
    if name in ("DEFAULT_TOP_K", "AttributeExtractor", "load_attribute_extractor"):
        from glied.extractors.mil import inference
        return getattr(inference, name)
    raise AttributeError(name)
