"""Feature identity: the one description of how a set of cached features was made, and the one check.

An identity is a JSON dict. The part a decoder depends on has two keys::

    {"extractor":  {name, config, weights_fingerprint, feature_dim, [max_side], [boxes]},
     "attributes": {name, config, vocab, top_k, ...} or None}

A feature-cache manifest holds these plus bookkeeping (``format``, ``format_version``, ``dtype``,
``created``, ``glied_version``, ``storage``); its identity is everything but ``created``,
``glied_version`` and ``storage`` (:func:`of_manifest`). ``max_side`` is the long-side cap photos were
downscaled to before the detector (it changes the features, so it is part of the identity); ``boxes``
("given") marks features extracted at user-given boxes.

Who uses it: the cache writer (a resume must match), ``FeatureCache.check_compatible``, the decoder's
training and evaluation (a checkpoint records :func:`for_decoder` of its cache and refuses another), the
feature-merge tool and the caption pipeline (a bundle's live extractors must give the identity its
decoder was trained on). Everything is compared through :func:`diff` and :func:`check`.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from glied.errors import ConfigError

NOT_IDENTITY = ("created", "glied_version", "storage")   # manifest bookkeeping, not what the features are
PARTS = ("extractor", "attributes")


def normalise(identity: Any) -> Any:
    """Identity as plain JSON values (tuples -> lists, odd objects -> str), so a live extractor's identity
    compares equal to one read back from a manifest or a checkpoint."""
    return json.loads(json.dumps(identity, default=str))


def of_manifest(manifest: dict) -> dict:
    """The part of a cache manifest that must match for two feature sets to be interchangeable."""
    return normalise({k: v for k, v in manifest.items() if k not in NOT_IDENTITY})


def for_decoder(manifest: dict) -> dict:
    """What a trained decoder depends on: the region extractor and the attribute-word identity of its cache.
    Stored in decoder checkpoints as ``feature_identity`` and compared on every reuse."""
    return normalise({p: manifest.get(p) for p in PARTS})


def extractor_identity(region_extractor, *, max_side: Optional[int] = None, boxes: bool = False) -> dict:
    """A region extractor's identity() with the decoding cap (``max_side``; None: not capped) and the
    given-boxes mark added."""
    ident = dict(region_extractor.identity())
    ident["max_side"] = max_side
    if boxes:
        ident["boxes"] = "given"
    return normalise(ident)


def attribute_identity(attribute_extractor, top_k: Optional[int] = None) -> Optional[dict]:
    """An attribute-word extractor's identity() with its ``vocab`` and the ``top_k`` words kept per image
    (``top_k`` None: the extractor's own); None when there is no attribute extractor."""
    if attribute_extractor is None:
        return None
    ident = dict(attribute_extractor.identity())
    ident["vocab"] = list(attribute_extractor.vocab)
    if top_k is None:
        top_k = ident.get("top_k", getattr(attribute_extractor, "top_k", None))
    ident["top_k"] = top_k
    return normalise(ident)


def build(region_extractor, attribute_extractor=None, *, top_k: Optional[int] = None,
          max_side: Optional[int] = None, boxes: bool = False) -> dict:
    """{"extractor": ..., "attributes": ...} of live extractors, as :func:`for_decoder` reads it back from
    the cache they write."""
    return {"extractor": extractor_identity(region_extractor, max_side=max_side, boxes=boxes),
            "attributes": attribute_identity(attribute_extractor, top_k)}


def diff(have: Any, want: Any, prefix: str = "", have_name: str = "cache") -> list[str]:
    """Human lines naming every key where ``have`` and ``want`` (expected) differ."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in have:
                out.append(f"{p}: missing in {have_name}, expected {_short(want[k])}")
            elif k not in want:
                out.append(f"{p}: {have_name} has {_short(have[k])}, expected nothing")
            else:
                out += diff(have[k], want[k], p, have_name)
        return out
    if isinstance(have, list) and isinstance(want, list) and have != want:
        if len(have) != len(want):
            return [f"{prefix}: {have_name} has {len(have)} items, expected {len(want)}"]
        i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        return [f"{prefix}[{i}]: {have_name} has {_short(have[i])}, expected {_short(want[i])}"]
    return [] if have == want else [f"{prefix}: {have_name} has {_short(have)}, expected {_short(want)}"]


def check(have: dict, want: dict, *, what: str, fix: str, have_name: str = "cache", limit: int = 6,
          only_wanted: bool = False) -> None:
    """Raise ConfigError ``"{what}: <difference>; ...; {fix}"`` if ``have`` differs from ``want``.

    Both are normalised first. ``only_wanted``: compare only the top-level keys ``want`` has.
    """
    have, want = normalise(have), normalise(want)
    if only_wanted:
        have = {k: have.get(k) for k in want}
    lines = diff(have, want, have_name=have_name)
    if lines:
        more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
        raise ConfigError(f"{what}: " + "; ".join(lines[:limit]) + more + f". {fix}")


def check_trained_on(manifest: dict, trained_on: dict, *, where: str, model: str) -> None:
    """Raise ConfigError if the decoder identity of the cache ``manifest`` (``where``: its name) is not
    ``trained_on``, the ``feature_identity`` a checkpoint (``model``: its name) recorded."""
    check(for_decoder(manifest), trained_on,
          what=f"{where}: feature cache identity differs from the one {model} was trained on",
          fix="Use the cache the model was trained with, or train a new model on this cache")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."
