"""Vectorised CIDEr-D (Vedantam et al. 2015) that reproduces pycocoevalcap's ``Cider`` score for score.

pycocoevalcap's ``Cider`` (= CIDEr-D: clipped candidate weights, Gaussian length penalty with sigma 6, x10) is
re-implemented with numpy over integer n-gram codes:

* tf-idf weight of an n-gram = count x (log N - log max(1, df)), df = number of images whose references
  contain it, N = number of indexed images;
* per reference: sum_g min(w_cand, w_ref) w_ref / (|cand| |ref|) for each n = 1..4, times
  exp(-(len_c - len_r)^2 / (2 sigma^2)) where len is the bigram count (pycocoevalcap's quirk:
  max(words - 1, 0));
* mean over n, mean over references, x10.

:class:`CiderD` builds the document-frequency index and the reference vectors ONCE (as SCST needs, with
train-split df) and then scores any batch of candidates against them. :func:`cider_d` is the drop-in for
``Cider().compute_score(gts, res)`` (df from the evaluated references). Inputs are already-tokenized strings
(whitespace-separated), exactly as given to pycocoevalcap.
"""
from __future__ import annotations

from itertools import chain
from typing import Mapping, Sequence

import numpy as np

_BASE = 55_000  # word ids (1-based) must stay below this so a 4-gram code sum w_k B^k fits in int64


def _ngram_codes(ids: np.ndarray, sent: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1..n_max-grams of concatenated sentences.

    ids (W,) int64 word ids >= 1, sent (W,) sentence index of each word (non-decreasing).
    Returns codes (M,) and sentence (M,) of every n-gram occurrence. code = sum_k ids[i+k] B^k is unique per
    n-gram and never collides across orders because every word id is >= 1.
    """
    codes, sents = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    code = np.zeros(len(ids), dtype=np.int64)
    for n in range(n_max):
        m = len(ids) - n
        if m <= 0:
            break
        code = code[:m] + ids[n:] * (_BASE ** n)  # code of the (n+1)-gram starting at each position
        valid = sent[:m] == sent[n:]
        codes.append(code[valid])
        sents.append(sent[:m][valid])
    return np.concatenate(codes), np.concatenate(sents)


def _count(sent: np.ndarray, codes: np.ndarray, n_sent: int) -> tuple[np.ndarray, ...]:
    """Distinct (sentence, n-gram) pairs with their counts.

    Returns sent_u (P,), gid_u (P,) index into uniq_codes, uniq_codes (G,) sorted distinct codes,
    count_u (P,).
    """
    uniq, inv = np.unique(codes, return_inverse=True)  # (G,), (M,)
    g = max(len(uniq), 1)
    key = np.sort(sent * g + inv)  # (M,) sorted by sentence, then n-gram
    start = np.ones(len(key), dtype=bool)
    start[1:] = key[1:] != key[:-1]
    idx = np.flatnonzero(start)
    counts = np.diff(np.append(idx, len(key)))
    k = key[idx]
    return k // g, k % g, uniq, counts


def _order(codes: np.ndarray, n: int) -> np.ndarray:
    """n-gram order minus one, read back from the code's magnitude."""
    o = np.zeros(len(codes), dtype=np.int64)
    for k in range(1, n):
        o += codes >= _BASE ** k
    return o


def _sorted_unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort-based unique with inverse indices (numpy's hash-based unique is slower on large int64 arrays)."""
    order = np.argsort(a, kind="stable")
    sa = a[order]
    start = np.ones(len(sa), dtype=bool)
    start[1:] = sa[1:] != sa[:-1]
    inv = np.empty(len(a), dtype=np.int64)
    inv[order] = np.cumsum(start) - 1
    return sa[start], inv


class CiderD:
    """CIDEr-D with a reference index built once.

    Args:
        refs: for each image i, its reference sentences (tokenized, space-separated strings). Images may have
            different numbers of references (>= 1).
        n: max n-gram order (4). sigma: length-penalty width (6.0).

    ``score(cands, image_index)`` returns one CIDEr-D per candidate (x10 scale, like pycocoevalcap).
    """

    def __init__(self, refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if len(refs) == 0 or any(len(r) == 0 for r in refs):
            raise ValueError("CiderD needs at least one reference for every image")
        self.n, self.sigma = n, sigma
        self.words: dict[str, int] = {}
        n_img = len(refs)
        self.n_refs = np.array([len(r) for r in refs], dtype=np.int64)  # (N,)
        self.r_max = int(self.n_refs.max())
        flat = [s for r in refs for s in r]
        ids, sent, lens = self._tokenize(flat, grow=True)
        ref_img = np.repeat(np.arange(n_img), self.n_refs)  # (S,)
        ref_slot = np.concatenate([np.arange(k) for k in self.n_refs])  # (S,)
        codes, occ_sent = _ngram_codes(ids, sent, n)
        s_u, gid, self.codes, cnt = _count(occ_sent, codes, len(flat))  # distinct (sentence, n-gram) pairs
        g = max(len(self.codes), 1)
        o_u = _order(self.codes[gid], n)
        # (image, n-gram) keys; df = number of images whose references contain the n-gram
        self.keys, inv = _sorted_unique(ref_img[s_u] * g + gid)  # (U,), (P,)
        self.df = np.bincount(self.keys % g, minlength=g).astype(np.float64)  # (G,)
        self.log_n = float(np.log(float(n_img)))
        w = cnt * (self.log_n - np.log(np.maximum(1.0, self.df[gid])))  # (P,) reference weights
        # reference norms (N, Rmax, n) and bigram lengths (N, Rmax)
        sq = np.bincount(s_u * n + o_u, weights=w * w, minlength=len(flat) * n).reshape(len(flat), n)
        self.ref_norm = np.zeros((n_img, self.r_max, n))
        self.ref_norm[ref_img, ref_slot] = np.sqrt(sq)
        self.ref_len = np.zeros((n_img, self.r_max))
        self.ref_len[ref_img, ref_slot] = np.maximum(lens - 1, 0)
        self.table = np.zeros((len(self.keys), self.r_max))  # (U, Rmax) weight in each reference slot
        self.table[inv, ref_slot[s_u]] = w

    @property
    def num_images(self) -> int:
        return int(len(self.n_refs))

    def _tokenize(self, sentences: Sequence[str], grow: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sentences -> concatenated word ids (>= 1), sentence index per word, words per sentence.
        Words unseen in the references get fresh ids local to this call (they match nothing)."""
        toks = [s.split() for s in sentences]
        lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
        flat = list(chain.from_iterable(toks))
        missing = set(flat).difference(self.words)
        words = self.words if grow else dict(self.words)
        for w in missing:
            words[w] = len(words) + 1
        if len(words) >= _BASE:
            raise ValueError(f"CiderD supports at most {_BASE - 1} distinct words per call")
        ids = np.fromiter(map(words.__getitem__, flat), dtype=np.int64, count=len(flat))
        sent = np.repeat(np.arange(len(toks)), lens)
        return ids, sent, lens

    def score(self, cands: Sequence[str], image_index: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of each candidate against the references of image ``image_index[i]``: (C,) float64."""
        n, c = self.n, len(cands)
        img = np.asarray(image_index, dtype=np.int64)
        if img.shape != (c,):
            raise ValueError(f"image_index must have one entry per candidate ({c}), got shape {img.shape}")
        if c == 0:
            return np.zeros(0)
        ids, sent, lens = self._tokenize(cands, grow=False)
        codes, occ_sent = _ngram_codes(ids, sent, n)
        s_u, lid, c_uniq, cnt = _count(occ_sent, codes, c)
        c_u = c_uniq[lid] if len(c_uniq) else np.zeros(0, np.int64)
        o_u = _order(c_u, n)
        g = max(len(self.codes), 1)
        pos = np.searchsorted(self.codes, c_u).clip(max=max(len(self.codes) - 1, 0))
        found = (self.codes[pos] == c_u) if len(self.codes) else np.zeros(len(c_u), bool)
        df = np.where(found, self.df[pos] if len(self.codes) else 0.0, 0.0)
        w = cnt * (self.log_n - np.log(np.maximum(1.0, df)))  # (P,) candidate weights
        norm = np.sqrt(np.bincount(s_u * n + o_u, weights=w * w, minlength=c * n)).reshape(c, n)  # (C, n)
        # clipped overlap with every reference of the candidate's image
        key = img[s_u] * g + pos
        kpos = np.searchsorted(self.keys, key).clip(max=max(len(self.keys) - 1, 0))
        hit = found & (self.keys[kpos] == key)
        wr = self.table[kpos[hit]]  # (H, Rmax)
        contrib = np.minimum(w[hit, None], wr) * wr  # (H, Rmax)
        flat_idx = (s_u[hit] * n + o_u[hit])[:, None] * self.r_max + np.arange(self.r_max)  # (H, Rmax)
        num = np.bincount(flat_idx.ravel(), weights=contrib.ravel(), minlength=c * n * self.r_max)
        num = num.reshape(c, n, self.r_max)  # (C, n, Rmax)
        den = norm[:, :, None] * self.ref_norm[img].transpose(0, 2, 1)  # (C, n, Rmax)
        val = np.where(den != 0, num / np.where(den != 0, den, 1.0), num)
        delta = np.maximum(lens - 1, 0)[:, None] - self.ref_len[img]  # (C, Rmax)
        val = val * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None, :]
        valid = np.arange(self.r_max)[None, :] < self.n_refs[img][:, None]  # (C, Rmax)
        per_ref = val.mean(1) * valid  # (C, Rmax)
        return per_ref.sum(1) / self.n_refs[img] * 10.0


def cider_d(gts: Mapping, res: Mapping, n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """Drop-in for pycocoevalcap ``Cider().compute_score(gts, res)``: gts {id: [ref, ...]}, res {id: [cand]};
    df from gts. Returns (mean, per-image scores in gts key order)."""
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same image ids")
    keys = list(gts.keys())
    scorer = CiderD([gts[k] for k in keys], n=n, sigma=sigma)
    scores = scorer.score([res[k][0] for k in keys], np.arange(len(keys)))
    return float(scores.mean()), scores
