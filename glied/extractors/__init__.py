"""Extractors: decoded photos in, one record per photo out.

Every extractor implements :class:`Extractor`: one verb, ``extract(images) -> records`` (``images`` are BGR
uint8 arrays (H, W, 3); one record per image, in order) and ``identity()`` (a JSON dict of everything that
determines the records; :mod:`glied.datasets.identity` records it in caches and checkpoints). Two kinds:

* region extractors -> :class:`glied.records.RegionFeatures` (:mod:`glied.extractors.bottomup`, or a user's own
  through ``--extractor-module pkg.mod:factory``); for ``glied extract --boxes`` also
  ``extract_given_boxes(image, boxes (N, 4)) -> RegionFeatures``;
* attribute-word extractors -> :class:`glied.records.AttributeWords` (:mod:`glied.extractors.mil`); they also
  have ``vocab`` (the word list).

:func:`load_extractors` is the one entry point that builds both from paths (weights files or run folders); the
CLI, the demo, the caption pipeline and the tests use it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional, Protocol, Sequence, runtime_checkable

from glied.errors import ConfigError


@runtime_checkable
class Extractor(Protocol):
    """The extractor interface (see the module docstring)."""

    def extract(self, images: Sequence) -> list: ...

    def identity(self) -> dict: ...


def load_factory(spec: str):
    """'pkg.module:factory' or 'path/to/file.py:factory' -> the callable (ConfigError if not found)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"--extractor-module {spec!r}: expected 'package.module:factory' or "
                          f"'file.py:factory'")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise ConfigError(f"--extractor-module: {mod_name} does not exist")
            name = "glied_user_extractor_" + os.path.splitext(os.path.basename(mod_name))[0]
            s = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(s)
            sys.modules[name] = module
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--extractor-module {spec!r}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--extractor-module {spec!r}: {mod_name} has no callable {attr!r}")
    return fn


def load_extractors(detector: Optional[str | os.PathLike] = None, attributes: Optional[str | os.PathLike] = None,
                    *, extractor_module: Optional[str] = None, device: str = "cpu", precision: str = "fp32",
                    top_k: Optional[int] = None, need_regions: bool = True) -> tuple:
    """(region extractor or None, attribute-word extractor or None) from paths.

    Args:
        detector: bottom-up weights (the published ``.pkl``), a glied detector checkpoint, or a
            ``glied train-detector`` run folder.
        attributes: a ``glied train-attributes`` run folder or checkpoint; None: no word extractor.
        extractor_module: "pkg.mod:factory" or "file.py:factory"; ``factory(weights=detector, device=,
            precision=)`` builds the region extractor instead of the bottom-up loader.
        device, precision: where and how the region detector runs ("fp32" | "bf16" | "fp16").
        top_k: attribute words kept per image (None: the run's default).
        need_regions: raise ConfigError when neither ``detector`` nor ``extractor_module`` is given.
    """
    regions = None
    if extractor_module:
        regions = load_factory(extractor_module)(weights=detector, device=device, precision=precision)
    elif detector:
        from glied.extractors.bottomup import load_region_extractor

        regions = load_region_extractor(detector, device=device, precision=precision)
    elif need_regions:
        raise ConfigError("no region detector: glied extract needs --detector WEIGHTS_OR_RUN (bottom-up "
                          "weights or a train-detector run folder), or --extractor-module pkg.mod:factory")
    words = None
    if attributes:
        from glied.extractors.mil import load_attribute_extractor

        words = load_attribute_extractor(attributes, device=device, **({} if top_k is None else {"top_k": top_k}))
    return regions, words
