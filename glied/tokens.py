"""The caption vocabulary's special tokens and word ids -> text: one definition for the prepared data, the
feature datasets and the decoder.

A vocabulary (``itow``, saved in ``vocab.json`` and in every decoder checkpoint) starts with the four
specials, in this order; every other word follows.
"""
from __future__ import annotations

from typing import Iterable, Sequence

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def ids_to_text(ids: Iterable[int], itow: Sequence[str]) -> str:
    """Word ids -> space-joined words, stopping at the first <eos> or <pad>, skipping <bos>."""
    words = []
    for i in ids:
        i = int(i)
        if i in (EOS, PAD):
            break
        if i != BOS:
            words.append(itow[i])
    return " ".join(words)
