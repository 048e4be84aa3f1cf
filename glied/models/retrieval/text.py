"""Text side of the retrieval models: tokenizers and word-level encoders.

* ``gru`` (the offline default): the prepared data's vocabulary, word embeddings trained from scratch and a
  bidirectional GRU whose two directions are averaged (VSE++ / VSE∞'s BiGRU text encoder).
* a local folder of a BERT-family model, read with the optional ``transformers`` library
  (``pip install glied[bert]``); nothing is downloaded. TERAN truncates BERT to its first layers
  (``bert_layers``).

A tokenizer turns sentences (strings or token lists) into ``(ids (N, L) int64, mask (N, L) bool)``; the
matching encoder turns those into word vectors ``(N, L, d_out)``.
"""
from __future__ import annotations

import os
import re
from typing import Sequence, Union

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from glied.errors import ConfigError, InputError, WeightsError

PAD, UNK = 0, 3
Sentence = Union[str, Sequence[str]]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words_of(sentence: Sentence) -> list[str]:
    """Lower-case word tokens of a query string (punctuation dropped); a token list is kept as it is."""
    if isinstance(sentence, str):
        return _WORD.findall(sentence.lower())
    return [str(w) for w in sentence]


class VocabTokenizer:
    """Words -> ids of the prepared vocabulary (``itow``; unknown words -> ``<unk>``), at most ``max_len``."""

    def __init__(self, itow: Sequence[str], max_len: int = 32):
        self.itow, self.max_len = list(itow), max_len
        self.wtoi = {w: i for i, w in enumerate(self.itow)}

    def encode(self, sentences: Sequence[Sentence]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.wtoi.get(w, UNK) for w in words_of(s)][: self.max_len] for s in sentences]
        length = max([len(r) for r in rows] + [1])
        ids = torch.zeros(len(rows), length, dtype=torch.long)                 # (N, L)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, ids != PAD


class GruText(nn.Module):
    """Word embeddings + bidirectional GRU (directions averaged): (N, L) ids -> (N, L, hidden)."""

    def __init__(self, vocab_size: int, word_dim: int, hidden: int):
        super().__init__()
        self.out_dim = hidden
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=PAD)
        self.gru = nn.GRU(word_dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length = ids.shape
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)  # (N, L, 2H)
        return (out[..., : self.out_dim] + out[..., self.out_dim:]) / 2       # (N, L, H)


def _transformers(folder: str):
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, "config.json")):
        raise WeightsError(f"{folder}: no BERT-family model folder here (no config.json); pass a folder written "
                           "by save_pretrained(), or --text-encoder gru. Nothing is downloaded")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{folder}: a BERT text encoder needs the optional 'transformers' library; "
                          "install it with `pip install glied[bert]` or use --text-encoder gru") from None
    return transformers


class BertTokenizer:
    """The folder's own word-piece tokenizer; ``mask`` marks real tokens ([CLS] and [SEP] included)."""

    def __init__(self, folder: str, max_len: int = 32):
        tf = _transformers(folder)
        try:
            self.tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{folder}: cannot read its tokenizer ({str(e).splitlines()[0][:120]})") from None
        self.max_len = max_len

    def encode(self, sentences: Sequence[Sentence]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [" ".join(words_of(s)) for s in sentences]
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()


class BertText(nn.Module):
    """A local BERT-family encoder (first ``layers`` layers if set): (N, L) word pieces -> (N, L, hidden)."""

    def __init__(self, folder: str, layers: int | None = None):
        super().__init__()
        tf = _transformers(folder)
        try:
            self.bert = tf.AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{folder}: cannot load the model ({str(e).splitlines()[0][:120]})") from None
        enc = getattr(self.bert, "encoder", None)
        if layers is not None and enc is not None and hasattr(enc, "layer"):
            enc.layer = enc.layer[:layers]
        self.out_dim = int(self.bert.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, L, H)


def build_text(text_encoder: str, vocab_size: int, word_dim: int, hidden: int, bert_layers: int | None
               ) -> tuple[nn.Module, bool]:
    """(encoder, is_bert) for ``text_encoder`` "gru" or a model folder."""
    if text_encoder == "gru":
        return GruText(vocab_size, word_dim, hidden), False
    if not text_encoder:
        raise InputError("empty --text-encoder: use gru or a local BERT-family model folder")
    return BertText(text_encoder, bert_layers), True


def build_tokenizer(text_encoder: str, itow: Sequence[str], max_len: int = 32):
    """The tokenizer that matches :func:`build_text`."""
    if text_encoder == "gru":
        return VocabTokenizer(itow, max_len)
    return BertTokenizer(text_encoder, max_len)
