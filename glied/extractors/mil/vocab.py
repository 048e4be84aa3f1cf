"""The MIL word vocabulary and image-level labels, built from captions alone (Fang et al., sec. 3.1).

- Vocabulary: the K most frequent tokens of the *training* captions (ties broken alphabetically so that the
  result is deterministic). Function words ("a", "on", ...) are kept, as Fang's 1000-word vocabulary keeps
  them; ``stopwords=True`` drops :data:`STOPWORDS` instead.
- Label of an image: the set of vocabulary words that occur in ANY of its captions.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from glied.errors import InputError

# A small English function-word list for the optional stop-list switch (determiners, pronouns, prepositions,
# conjunctions, auxiliaries). Kept short and explicit on purpose.
STOPWORDS = frozenset("""
a an the this that these those some any each every no
i me my we us our you your he him his she her it its they them their there here
of in on at to from by with without for about into onto over under above below near next up down out off
through between behind across along around against beside toward towards upon within
and or but nor so yet as than then if while because
is are was were be been being am do does did has have had having can could will would shall should may might
must not very just only also too
""".split())


def build_vocab(captions: Iterable[Sequence[Sequence[str]]], size: int, *, stopwords: bool = False,
                min_count: int = 1) -> list[str]:
    """The ``size`` most frequent tokens of the given captions, most frequent first.

    Args:
        captions: per image, its captions as token lists (pass only the TRAINING images).
        size: K, the most words kept (fewer if the captions have fewer distinct tokens).
        stopwords: drop :data:`STOPWORDS`.
        min_count: tokens seen fewer times are never kept.

    Raises:
        InputError: if no token is left (no captions, or every token filtered out).
    """
    counts: Counter[str] = Counter()
    for sentences in captions:
        for s in sentences:
            counts.update(w for w in s if w)
    words = [w for w, c in counts.items() if c >= min_count and not (stopwords and w in STOPWORDS)]
    words.sort(key=lambda w: (-counts[w], w))
    if not words:
        raise InputError("no vocabulary word: the training captions are empty (or every word was filtered out)")
    return words[:size]


def image_label(sentences: Sequence[Sequence[str]], wtoi: dict[str, int]) -> list[int]:
    """Sorted vocabulary ids of the words that occur in any of the image's captions."""
    return sorted({wtoi[w] for s in sentences for w in s if w in wtoi})


@dataclass
class LabelSet:
    """Image-level labels of a list of images.

    Attributes:
        keep: indices (into the input list) of the images kept.
        labels: (len(keep), V) uint8 multi-hot matrix, row r for image ``keep[r]``.
        no_captions: input indices dropped because they have no caption at all (no label information).
        no_vocab_word: input indices whose captions contain no vocabulary word (kept as all-negative rows or
            dropped, following the policy).
    """

    keep: list[int]
    labels: np.ndarray
    no_captions: list[int] = field(default_factory=list)
    no_vocab_word: list[int] = field(default_factory=list)


def build_labels(captions: Sequence[Sequence[Sequence[str]]], vocab: Sequence[str], *,
                 empty_policy: str = "keep") -> LabelSet:
    """Multi-hot labels for each image from its captions.

    Args:
        captions: per image, its captions as token lists.
        vocab: the word list (index = word id).
        empty_policy: ``keep`` an image whose captions contain no vocabulary word as an all-negative example,
            or ``drop`` it. An image with no caption at all is always dropped.
    """
    if empty_policy not in ("keep", "drop"):
        raise ValueError(f"empty_policy must be keep or drop, not {empty_policy!r}")
    wtoi = {w: i for i, w in enumerate(vocab)}
    keep: list[int] = []
    rows: list[list[int]] = []
    no_caps: list[int] = []
    no_word: list[int] = []
    for i, sentences in enumerate(captions):
        if not any(len(s) for s in sentences):
            no_caps.append(i)
            continue
        ids = image_label(sentences, wtoi)
        if not ids:
            no_word.append(i)
            if empty_policy == "drop":
                continue
        keep.append(i)
        rows.append(ids)
    labels = np.zeros((len(keep), len(vocab)), np.uint8)
    for r, ids in enumerate(rows):
        labels[r, ids] = 1
    return LabelSet(keep, labels, no_caps, no_word)
