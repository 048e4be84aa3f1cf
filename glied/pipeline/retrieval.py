"""Image–sentence retrieval on the feature cache: train, evaluate, index and search.

    train_retrieval(PREP, CACHE, RUN, RetrievalTrainConfig(model="vse"))   # RUN/best.pt, last.pt, metrics.csv
    evaluate_retrieval(RUN, CACHE, PREP, "test", "5k")                     # R@1/5/10 both ways, rsum -> JSON
    build_index(RUN, CACHE, INDEX, data=PREP)                              # every cached image embedded once
    search_text(INDEX, "a red circle above a blue square", k=5)           # [(image id, score), ...]

Data: images and captions of one split of the prepared data (``glied prepare``; ids from the Karpathy file),
regions, boxes and image sizes read through :meth:`glied.datasets.cache.FeatureCache.batch`. A training epoch
visits every training image once with one of its captions drawn at random; a batch of B pairs is scored
B x B and trained with the hinge triplet loss (hardest negative; all negatives during ``warmup_epochs``).

Evaluation protocols over the images of a split (captions follow their images):
``1k`` — mean over folds of 1,000 consecutive images (COCO 1K: 5 folds of the 5K test; a split under 2,000
images is one fold, e.g. Flickr30k 1K), ``5k`` — the first 5,000 images at once, ``all`` — the whole split.
NDCG@25 (opt-in, slow: one ROUGE-L per caption and image) follows TERAN: relevance of caption c to image j is
ROUGE-L of c against j's captions, gain 2^rel - 1, ideal ranking from all relevances.

Checkpoint (``format`` "glied-retrieval"): config, vocab, feature_identity, model state, train_config,
epoch, history, best_rsum (``last.pt`` also the optimiser state, for ``--resume``). Index (``format``
"glied-retrieval-index", ``INDEX/index.pt``): the checkpoint's model parts, the run path and its sha256, the
cache path and identity, image ids and embeddings, and optionally (built with the prepared data) every
prepared caption with its embedding (for image -> sentence search) and ``image_files``, the photo file of
each indexed image (for thumbnails in ``glied serve``).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from glied import checkpoint as ck
from glied.datasets import identity as idn
from glied.datasets.captions import CaptionDataset
from glied.errors import ConfigError, InputError, WeightsError
from glied.fileio import sha256_file, write_json_atomic
from glied.models.retrieval import Embedding, RetrievalModel, build_retrieval_model, config_from_dict
from glied.models.retrieval.model import make_config
from glied.models.retrieval.text import build_tokenizer, words_of

RETRIEVAL = ck.Format("glied-retrieval", 1, "retrieval model", ("best.pt", "last.pt"),
                      "train one with `glied train-retrieval`")
INDEX = ck.Format("glied-retrieval-index", 1, "retrieval index", ("index.pt",),
                  "build one with `glied index --run RUN --features CACHE --out INDEX`")
PROTOCOLS = ("1k", "5k", "all")
# per-model training defaults: VSE∞ (AdamW 5e-4, x0.1 at 15 of 25, batch 128, 1 warm-up epoch) and TERAN
# (Adam, x0.1 every 20 of 30, batch 40; its 1e-5 fine-tunes BERT — a GRU trained from scratch needs more)
MODEL_DEFAULTS = {"vse": {"epochs": 25, "batch_size": 128, "lr": 5e-4, "lr_decay_epoch": 15, "warmup_epochs": 1},
                  "teran": {"epochs": 30, "batch_size": 40, "lr": 2e-4, "lr_decay_epoch": 20, "warmup_epochs": 0}}


@dataclass(frozen=True)
class RetrievalTrainConfig:
    """Training settings. ``None`` fields take the model's defaults (:data:`MODEL_DEFAULTS`)."""

    model: str = "vse"
    preset: str = "paper"                # model sizes: "paper" or "small" (shapes world, tests)
    text_encoder: str = "gru"            # "gru" or a local BERT-family folder
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_decay_epoch: Optional[int] = None  # lr x0.1 from this epoch on
    warmup_epochs: Optional[int] = None   # epochs summing all negatives before the hardest negative
    text_lr_scale: float = 0.1            # a BERT text encoder learns at lr x this
    grad_clip: float = 2.0
    max_words: int = 32
    embed_dim: Optional[int] = None       # override the preset's joint-space size
    boxes: bool = False                   # vse: also feed the regions' normalised boxes
    seed: int = 0

    def resolved(self) -> "RetrievalTrainConfig":
        if self.model not in MODEL_DEFAULTS:
            raise ConfigError(f"unknown retrieval model {self.model!r}; choose vse or teran")
        d = {k: v for k, v in asdict(self).items() if v is not None}
        cfg = RetrievalTrainConfig(**{**MODEL_DEFAULTS[self.model], **d})
        if cfg.epochs < 0 or cfg.batch_size < 2 or cfg.lr <= 0:
            raise ConfigError("retrieval training needs epochs >= 0, batch size >= 2 and lr > 0")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalTrainConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ------------------------------------------------------------------------------------------------ data


def retrieval_identity(manifest: dict) -> dict:
    """What a retrieval model depends on: the region extractor's identity (attribute words are not read)."""
    return {"extractor": idn.for_decoder(manifest)["extractor"]}


def _diff(have: dict, want: dict, have_name: str = "cache") -> list[str]:
    return idn.diff(idn.normalise(have), idn.normalise(want), have_name=have_name)


def open_cache(features: str | os.PathLike):
    from glied.datasets.cache import FeatureCache
    return FeatureCache.open(features)


class SplitData:
    """Images of one prepared split that are in the cache, and their captions in image order.

    ``ids`` (N,) image ids; ``captions`` list of token lists (Nc,); ``caption_image`` (Nc,) index into ids.
    Raises InputError naming the cache when an image of the split is missing from it.
    """

    def __init__(self, prep, cache, split: str, where: str):
        ds = CaptionDataset(prep, cache, split, where=where)   # checks the split against the cache
        self.ids: list[str] = [str(i) for i in ds.ids]
        self.captions: list[list[str]] = []
        owner = []
        for j, i in enumerate(ds.indices):
            for s in prep.images[i]["sentences"]:
                self.captions.append(list(s))
                owner.append(j)
        self.caption_image = np.asarray(owner, np.int64)
        if not self.captions:
            raise InputError(f"{prep.root}: the {split} split has no captions")


def image_batch(cache, ids: Sequence[str], device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(features (B, R, F) float32, boxes (B, R, 4), image_wh (B, 2), mask (B, R)) of cached images."""
    b = cache.batch(list(ids))
    if b["features"].shape[1] == 0 or not b["mask"].any(1).all():
        bad = [ids[j] for j in np.nonzero(~b["mask"].any(1))[0][:3]]
        raise InputError(f"feature cache {cache.root}: image(s) {', '.join(bad)} have no regions")
    return (torch.from_numpy(b["features"]).float().to(device), torch.from_numpy(b["boxes"]).to(device),
            torch.from_numpy(b["image_wh"]).to(device), torch.from_numpy(b["mask"]).to(device))


def concat(parts: Sequence[Embedding]) -> Embedding:
    """Join embeddings of several batches, padding the token axis (mask False on padding)."""
    t = max(p.vectors.shape[1] for p in parts)
    vec = [torch.nn.functional.pad(p.vectors, (0, 0, 0, t - p.vectors.shape[1])) for p in parts]
    mask = [torch.nn.functional.pad(p.mask, (0, t - p.mask.shape[1])) for p in parts]
    return Embedding(torch.cat(vec), torch.cat(mask))


@torch.inference_mode()
def embed_images(model: RetrievalModel, cache, ids: Sequence[str], batch_size: int = 128,
                 device: str = "cpu") -> Embedding:
    model.eval()
    return concat([model.embed_images(*image_batch(cache, ids[i:i + batch_size], device))
                   for i in range(0, len(ids), batch_size)])


@torch.inference_mode()
def embed_texts(model: RetrievalModel, tokenizer, sentences: Sequence, batch_size: int = 512,
                device: str = "cpu") -> Embedding:
    model.eval()
    order = np.argsort([len(words_of(s)) for s in sentences], kind="stable")   # similar lengths together
    parts = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenizer.encode([sentences[j] for j in order[i:i + batch_size]])
        parts.append(model.embed_texts(ids.to(device), mask.to(device)))
    e = concat(parts) if parts else Embedding(torch.zeros(0, 1, 1), torch.zeros(0, 1, dtype=torch.bool))
    back = torch.from_numpy(np.argsort(order, kind="stable"))                  # sorted position of each sentence
    return Embedding(e.vectors[back], e.mask[back])


@torch.inference_mode()
def score_all(model: RetrievalModel, images: Embedding, texts: Embedding, budget: int = 1 << 24) -> np.ndarray:
    """(Ni, Nt) scores, computed in blocks of at most ``budget`` region x word products."""
    ni, r = images.vectors.shape[:2]
    nt, length = texts.vectors.shape[:2]
    ct = max(1, min(nt, budget // max(1, r * length)))
    ci = max(1, min(ni, budget // max(1, r * length * ct)))
    out = np.empty((ni, nt), np.float32)
    for a in range(0, ni, ci):
        img = Embedding(images.vectors[a:a + ci], images.mask[a:a + ci])
        for b in range(0, nt, ct):
            out[a:a + ci, b:b + ct] = model.scores(img, Embedding(texts.vectors[b:b + ct],
                                                                  texts.mask[b:b + ct])).float().numpy()
    return out


# ------------------------------------------------------------------------------------------------ metrics


def recall_at_k(sims: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K in percent for image -> sentence (i2t: an image's best-ranked own caption) and sentence -> image
    (t2i), their sum ``rsum``, and median ranks. ``sims`` (Ni, Nc); ``caption_image`` (Nc,) owning image."""
    ni, nc = sims.shape
    own = np.full((ni, nc), False)
    own[caption_image, np.arange(nc)] = True
    best_own = np.where(own, sims, -np.inf).max(1)                             # (Ni,)
    rank_i2t = (sims > best_own[:, None]).sum(1)                               # (Ni,) 0 = first
    true = sims[caption_image, np.arange(nc)]                                  # (Nc,)
    rank_t2i = (sims > true[None, :]).sum(0)                                   # (Nc,)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", rank_i2t), ("t2i", rank_t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = round(100.0 * float((ranks < k).mean()), 3)
        out[f"{name}_medr"] = float(np.median(ranks) + 1)
    out["rsum"] = round(sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in ks), 3)
    return out


def lcs_lengths(sentences: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, N) longest-common-subsequence lengths (in words) of every pair of sentences. One dynamic programme
    per sentence, vectorised over all the others (padding never matches, so the last column is the LCS)."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in s] for s in sentences]
    n, width = len(ids), max([len(s) for s in ids] + [1])
    table = np.full((n, width), -1, np.int64)                                  # (N, L) word ids, -1 = padding
    for k, s in enumerate(ids):
        table[k, : len(s)] = s
    out = np.zeros((n, n), np.int32)
    for k, s in enumerate(ids):
        prev = np.zeros((n, width + 1), np.int32)                              # DP row i-1 against everyone
        for w in s:
            cur = np.zeros_like(prev)
            match = table == w                                                 # (N, L)
            for j in range(width):
                cur[:, j + 1] = np.where(match[:, j], prev[:, j] + 1, np.maximum(prev[:, j + 1], cur[:, j]))
            prev = cur
        out[k] = prev[:, width]
    return out


def rouge_relevance(captions: Sequence[Sequence[str]], caption_image: np.ndarray, n_images: int,
                    beta: float = 1.2) -> np.ndarray:
    """(Nc, Ni) ROUGE-L of each caption against each image's captions (TERAN's relevance), computed exactly as
    pycocoevalcap's ``Rouge.calc_score`` does (max precision and max recall over the references, F with
    beta 1.2), from one LCS table of all the captions."""
    lcs = lcs_lengths(captions).astype(np.float64)                            # (Nc, Nc)
    lengths = np.array([max(len(c), 1) for c in captions], np.float64)
    prec, rec = lcs / lengths[:, None], lcs / lengths[None, :]
    rel = np.zeros((len(captions), n_images), np.float32)
    for j in range(n_images):
        refs = np.nonzero(caption_image == j)[0]
        if len(refs) == 0:
            continue
        p, r = prec[:, refs].max(1), rec[:, refs].max(1)                      # (Nc,)
        ok = (p > 0) & (r > 0)
        rel[ok, j] = ((1 + beta ** 2) * p[ok] * r[ok]) / (r[ok] + beta ** 2 * p[ok])
    return rel


def ndcg_at_k(sims: np.ndarray, rel: np.ndarray, k: int = 25) -> dict:
    """Mean NDCG@k both ways with gain 2^rel - 1: i2t ranks captions (relevance rel[:, i]), t2i ranks images
    (relevance rel[c, :]); the ideal DCG takes the k best relevances of the whole gallery."""
    disc = 1.0 / np.log2(np.arange(k) + 2)

    def ndcg(scores: np.ndarray, relevance: np.ndarray) -> float:
        kk = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        gain = 2.0 ** np.take_along_axis(relevance, top, 1) - 1
        ideal = 2.0 ** -np.sort(-relevance, axis=1)[:, :kk] - 1
        dcg, idcg = (gain * disc[:kk]).sum(1), (ideal * disc[:kk]).sum(1)
        return float(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0).mean())

    return {f"i2t_ndcg{k}": round(ndcg(sims, rel.T), 4), f"t2i_ndcg{k}": round(ndcg(sims.T, rel), 4)}


def reranked(sims: np.ndarray, images: Embedding, texts: Embedding, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top ``k`` of ``sims`` (Ni, Nc) by the TERAN alignment (MrSw) of those pairs only,
    from TERAN embeddings of the same images and captions. Returns (i2t, t2i) matrices: the top k of each row (i2t) or column (t2i) get 1e4 + the new
    score, so they come first, in the new order; the rest keep the first ranking."""
    from glied.models.retrieval.score import mrsw_pairs

    ni, nc = sims.shape
    k_c, k_i = min(k, nc), min(k, ni)
    top_c = np.argpartition(-sims, k_c - 1, axis=1)[:, :k_c]                  # (Ni, k) captions of each image
    top_i = np.argpartition(-sims, k_i - 1, axis=0)[:k_i, :]                  # (k, Nc) images of each caption

    def pair_scores(img_idx: np.ndarray, cap_idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(img_idx), np.float32)
        with torch.inference_mode():
            for a in range(0, len(img_idx), 4096):
                i, c = torch.from_numpy(img_idx[a:a + 4096]), torch.from_numpy(cap_idx[a:a + 4096])
                out[a:a + 4096] = mrsw_pairs(images.vectors[i], images.mask[i], texts.vectors[c],
                                             texts.mask[c]).float().numpy()
        return out

    i2t, t2i = sims.copy(), sims.copy()
    rows = np.repeat(np.arange(ni), k_c)
    i2t[rows, top_c.ravel()] = 1e4 + pair_scores(rows, top_c.ravel())
    cols = np.tile(np.arange(nc), k_i)
    t2i[top_i.ravel(), cols] = 1e4 + pair_scores(top_i.ravel(), cols)
    return i2t, t2i


def protocol_folds(n_images: int, protocol: str) -> list[tuple[int, int]]:
    """Image ranges [a, b) evaluated separately (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "all":
        return [(0, n_images)]
    if protocol == "5k":
        return [(0, min(n_images, 5000))]
    folds = min(5, n_images // 1000)
    return [(f * 1000, (f + 1) * 1000) for f in range(folds)] if folds >= 2 else [(0, min(n_images, 1000))]


# ------------------------------------------------------------------------------------------------ checkpoints


def load_retrieval_checkpoint(path: str | os.PathLike) -> dict:
    """A retrieval checkpoint (file, or a run folder's best.pt / last.pt), loaded without executing code."""
    return ck.load(path, RETRIEVAL, required=("config", "vocab", "feature_identity", "model"))


def model_from(ckpt: dict, device: str = "cpu") -> tuple[RetrievalModel, Any]:
    """(model in eval mode, tokenizer) rebuilt from a checkpoint or an index alone."""
    cfg = config_from_dict(ckpt["config"])
    model = build_retrieval_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), build_tokenizer(cfg.text_encoder, ckpt["vocab"], ckpt.get("max_words", 32))


def _check_cache(trained_on: dict, cache, what: str) -> None:
    diff = _diff(retrieval_identity(cache.manifest), trained_on)
    if diff:
        raise ConfigError(f"{what} was made from other features than feature cache {cache.root} "
                          f"({'; '.join(diff[:3])}); use the cache it was made from, or train a new model")


# ------------------------------------------------------------------------------------------------ training


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def evaluate_split(model: RetrievalModel, tokenizer, cache, data: SplitData, protocol: str = "all",
                   ndcg: bool = False, device: str = "cpu", rerank: Optional[tuple] = None) -> dict:
    """Recall (and optionally NDCG@25) of ``model`` on a split, averaged over the protocol's folds.
    ``rerank``: (teran model, its tokenizer, k) re-ranks each query's top k by the TERAN alignment; the
    result then also holds ``first_stage``, the recall of ``model`` alone on the same folds."""
    t0 = time.perf_counter()
    folds = protocol_folds(len(data.ids), protocol)
    n_img = folds[-1][1]
    caps = np.nonzero(data.caption_image < n_img)[0]
    cap_words = [data.captions[c] for c in caps]
    images = embed_images(model, cache, data.ids[:n_img], device=device)
    texts = embed_texts(model, tokenizer, cap_words, device=device)
    if rerank is not None:
        r_images = embed_images(rerank[0], cache, data.ids[:n_img], device=device)
        r_texts = embed_texts(rerank[0], rerank[1], cap_words, device=device)
    per_fold = []
    for a, b in folds:
        sel = np.nonzero((data.caption_image[caps] >= a) & (data.caption_image[caps] < b))[0]
        sims = score_all(model, Embedding(images.vectors[a:b], images.mask[a:b]),
                         Embedding(texts.vectors[sel], texts.mask[sel]))
        owner = data.caption_image[caps][sel] - a
        if rerank is not None:
            i2t, t2i = reranked(sims, Embedding(r_images.vectors[a:b], r_images.mask[a:b]),
                                Embedding(r_texts.vectors[sel], r_texts.mask[sel]), rerank[2])
            m = {k: v for k, v in recall_at_k(i2t, owner).items() if k.startswith("i2t")}
            m.update({k: v for k, v in recall_at_k(t2i, owner).items() if k.startswith("t2i")})
            m["rsum"] = round(sum(v for k, v in m.items() if "_r" in k and not k.endswith("medr")), 3)
            m.update({"first_stage_" + k: v for k, v in recall_at_k(sims, owner).items()})  # before re-ranking
        else:
            m, i2t, t2i = recall_at_k(sims, owner), sims, sims
        if ndcg:
            rel = rouge_relevance([data.captions[caps[s]] for s in sel], owner, b - a)
            m.update({k: v for k, v in ndcg_at_k(i2t, rel).items() if k.startswith("i2t")})
            m.update({k: v for k, v in ndcg_at_k(t2i, rel).items() if k.startswith("t2i")})
        per_fold.append(m)
    res = {k: round(float(np.mean([m[k] for m in per_fold])), 3) for k in per_fold[0]}
    if rerank is not None:   # the first stage alone, on the same folds: {"i2t_r1", ..., "rsum"}
        res["first_stage"] = {k[len("first_stage_"):]: res.pop(k) for k in list(res) if k.startswith("first_stage_")}
    res.update({"protocol": protocol, "folds": len(folds), "images_per_fold": folds[0][1] - folds[0][0],
                "captions": int(len(caps)), "seconds": round(time.perf_counter() - t0, 2)})
    return res


def _resume_from(out: Path, cfg: "RetrievalTrainConfig | dict") -> tuple[dict, "RetrievalTrainConfig"]:
    """(last.pt, the run's stored settings with the given ones checked against them): the shared resume rule
    (:func:`glied.checkpoint.resume_settings`; only ``epochs`` may be raised)."""
    if not (out / "last.pt").is_file():
        raise InputError(f"{out}: nothing to resume (no last.pt); drop --resume to start a new run")
    stored = ck.load(out / "last.pt", RETRIEVAL, required=("config", "vocab", "feature_identity", "model",
                                                           "train_config", "epoch"))
    if "optimizer" not in stored:
        raise WeightsError(f"{stored['path']}: holds no optimiser state (written by an older glied), so the run "
                           "cannot be continued exactly; start a new run")
    if isinstance(cfg, dict):
        given = cfg
    else:                                   # a config object: the fields set away from their defaults
        default = RetrievalTrainConfig()
        given = {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}
    return stored, RetrievalTrainConfig.from_dict(ck.resume_settings(stored["train_config"], given,
                                                                     where=stored["path"]))


def train_retrieval(data: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike,
                    cfg: "RetrievalTrainConfig | dict" = RetrievalTrainConfig(), *, resume: bool = False,
                    device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train a retrieval model into ``out`` (best.pt by val rsum, last.pt, metrics.csv, train_config.json).
    Returns {out, best_val_rsum, epochs, seconds, model}.

    ``cfg``: the settings, or a dict of only those the user gave (the rest: defaults). ``resume``: continue
    the run in ``out`` from its last.pt (weights, optimiser, history, best) with its stored settings; a given
    setting that conflicts is refused, ``epochs`` may be raised. Each epoch's shuffling, caption choice and
    torch randomness (region drop, dropout) are seeded by (seed, epoch), so a resumed run repeats the
    uninterrupted one."""
    from glied.datasets.prepared import PreparedData

    out = Path(out)
    stored = None
    if resume:
        stored, cfg = _resume_from(out, cfg)
    elif (out / "last.pt").is_file():
        raise InputError(f"{out}: already holds a retrieval run (last.pt); pass --resume to continue it or "
                         "choose a new --out")
    elif isinstance(cfg, dict):
        cfg = RetrievalTrainConfig.from_dict(cfg)
    cfg = cfg.resolved()
    prep = PreparedData.load(data)
    cache = open_cache(features)
    train_split = SplitData(prep, cache, "train", str(features))
    val_split = SplitData(prep, cache, "val", str(features))
    kw = {"embed_dim": cfg.embed_dim} if cfg.embed_dim else {}
    if cfg.boxes:
        if cfg.model != "vse":
            raise ConfigError("--boxes is a vse option (teran always reads the boxes)")
        kw["boxes"] = True
    mcfg = make_config(cfg.model, cfg.preset, feature_dim=cache.feature_dim, vocab_size=len(prep.vocab),
                       text_encoder=cfg.text_encoder, **kw)
    torch.manual_seed(cfg.seed)
    model = build_retrieval_model(mcfg).to(device)
    tokenizer = build_tokenizer(cfg.text_encoder, prep.vocab, cfg.max_words)
    text_params = list(model.text.parameters()) if model.is_bert else []
    text_ids = {id(p) for p in text_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in text_ids], "scale": 1.0}]
    if text_params:
        groups.append({"params": text_params, "scale": cfg.text_lr_scale})
    opt_cls = torch.optim.AdamW if cfg.model == "vse" else torch.optim.Adam
    opt = opt_cls(groups, lr=cfg.lr)
    cap_ids, cap_mask = tokenizer.encode(train_split.captions)                  # (Nc, L) every train caption
    first = np.searchsorted(train_split.caption_image, np.arange(len(train_split.ids) + 1))
    identity = retrieval_identity(cache.manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train_config.json", {"train": cfg.to_dict(), "model": mcfg.to_dict()}, indent=1)
    log(f"train-retrieval: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
        f"{len(train_split.ids)} train / {len(val_split.ids)} val images, {cfg.epochs} epochs")
    history: list[dict] = []
    best, start = float("-inf"), 0
    if stored is not None:
        _check_cache(stored["feature_identity"], cache, f"retrieval run {stored['path']}")
        same_model = idn.normalise(stored["config"]) == idn.normalise(mcfg.to_dict())
        if list(stored["vocab"]) != list(prep.vocab) or not same_model:
            raise ConfigError(f"{stored['path']}: the run was trained on other prepared data or features than "
                              f"{data} and {features}; resume it with the ones it was started with")
        model.load_state_dict(stored["model"])
        opt.load_state_dict(stored["optimizer"])
        history, start = list(stored.get("history") or []), int(stored["epoch"])
        best = float("-inf") if stored.get("best_rsum") is None else float(stored["best_rsum"])
        log(f"train-retrieval: resuming {stored['path']} after epoch {start} of {cfg.epochs}")

    def state(epochs_done: int, best_rsum: Optional[float], optimizer: bool = False) -> dict:
        s = {"config": mcfg.to_dict(), "vocab": list(prep.vocab), "max_words": cfg.max_words,
             "feature_identity": identity, "model": model.state_dict(), "train_config": cfg.to_dict(),
             "epoch": epochs_done, "history": history, "best_rsum": best_rsum}
        if optimizer:                        # last.pt only: what --resume needs to continue exactly
            s["optimizer"] = opt.state_dict()
        return s

    t_start = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1009)   # region drop, dropout: a function of the epoch
        rng = np.random.default_rng([cfg.seed, epoch])         # order and caption choice: likewise
        model.train()
        lr = cfg.lr * (0.1 if epoch >= cfg.lr_decay_epoch else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        order = rng.permutation(len(train_split.ids))
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            rows = first[idx] + (rng.random(len(idx)) * (first[idx + 1] - first[idx])).astype(np.int64)
            ids, mask = cap_ids[rows], cap_mask[rows]
            keep = int(mask.sum(1).max())
            loss = model(*image_batch(cache, [train_split.ids[i] for i in idx], device), ids[:, :keep].to(device),
                         mask[:, :keep].to(device), hardest=epoch >= cfg.warmup_epochs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        val = evaluate_split(model, tokenizer, cache, val_split, "all", device=device)
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)) if losses else math.nan, 5),
               "lr": lr, **{k: val[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                 "rsum")}, "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        _write_metrics(out / "metrics.csv", history)
        log(f"epoch {epoch + 1}: loss {row['loss']:.4f} val rsum {val['rsum']:.1f} ({row['seconds']:.1f} s)")
        if val["rsum"] > best:               # best.pt first: a run killed between the two saves repeats
            best = val["rsum"]               # this epoch on --resume instead of losing its best.pt
            ck.save(out / "best.pt", state(epoch + 1, best), RETRIEVAL)
        ck.save(out / "last.pt", state(epoch + 1, best, optimizer=True), RETRIEVAL)
    if cfg.epochs == 0:                      # an untrained model (benchmarks of speed need only its shapes)
        ck.save(out / "last.pt", state(0, None, optimizer=True), RETRIEVAL)
    return {"out": str(out), "best_val_rsum": best, "epochs": cfg.epochs,
            "seconds": round(time.perf_counter() - t_start, 1), "model": model}


def evaluate_retrieval(run: str | os.PathLike, features: str | os.PathLike, data: str | os.PathLike,
                       split: str = "test", protocol: str = "all", *, ndcg: bool = False,
                       out: str | os.PathLike | None = None, device: str = "cpu", rerank: str | None = None,
                       rerank_k: int = 20, log: Callable[[str], None] = print) -> dict:
    """Evaluate a run on a split; writes ``retrieval_<split>_<protocol>.json`` beside the checkpoint (or to
    ``out``; ``..._rerank.json`` when re-ranking) and returns the metrics. ``rerank``: a teran run whose
    alignment re-ranks each query's top ``rerank_k``."""
    from glied.datasets.prepared import PreparedData

    t0 = time.perf_counter()
    ckpt = load_retrieval_checkpoint(run)
    cache = open_cache(features)
    _check_cache(ckpt["feature_identity"], cache, f"retrieval run {ckpt['path']}")
    prep = PreparedData.load(data)
    if list(prep.vocab) != list(ckpt["vocab"]):
        raise ConfigError(f"{ckpt['path']}: its vocabulary differs from {data}/vocab.json; use the prepared data "
                          "the model was trained with")
    model, tokenizer = model_from(ckpt, device)
    second = None
    if rerank is not None:
        r = load_retrieval_checkpoint(rerank)
        if r["config"]["model"] != "teran":
            raise ConfigError(f"{r['path']}: --rerank needs a teran run (this one is {r['config']['model']})")
        _check_cache(r["feature_identity"], cache, f"retrieval run {r['path']}")
        if list(r["vocab"]) != list(prep.vocab):
            raise ConfigError(f"{r['path']}: its vocabulary differs from {data}/vocab.json")
        second = (*model_from(r, device), int(rerank_k))
    res = evaluate_split(model, tokenizer, cache, SplitData(prep, cache, split, str(features)), protocol,
                         ndcg=ndcg, device=device, rerank=second)
    res.update({"split": split, "model": ckpt["config"]["model"], "run": ckpt["path"],
                "seconds_end_to_end": round(time.perf_counter() - t0, 2)})
    if second is not None:
        res.update({"rerank_run": r["path"], "rerank_k": int(rerank_k)})
    name = f"retrieval_{split}_{protocol}{'_rerank' if second is not None else ''}.json"
    target = Path(out) if out else Path(ckpt["path"]).parent / name
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, res, indent=1)
    res["written_to"] = str(target)
    log(format_metrics(res))
    return res


def format_metrics(m: dict) -> str:
    """One line: R@1/5/10 image->text | text->image, rsum (and NDCG when present)."""
    s = (f"{m.get('split', '')} {m['protocol']} ({m['folds']} fold(s) of {m['images_per_fold']} images): "
         f"i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} | "
         f"t2i {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} | rsum {m['rsum']:.1f}")
    if "i2t_ndcg25" in m:
        s += f" | NDCG@25 i2t {m['i2t_ndcg25']:.3f} t2i {m['t2i_ndcg25']:.3f}"
    return s


# ------------------------------------------------------------------------------------------------ index, search


def _pack(e: Embedding) -> dict:
    return {"vectors": e.vectors.contiguous(), "mask": e.mask.contiguous()}


def _teran_run(run: str | os.PathLike) -> dict:
    """A retrieval checkpoint that must be a teran run (the re-ranker), else one line saying so."""
    r = load_retrieval_checkpoint(run)
    if r["config"]["model"] != "teran":
        raise ConfigError(f"{r['path']}: --rerank needs a teran run (this one is {r['config']['model']})")
    return r


def build_index(run: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike, *,
                data: str | os.PathLike | None = None, rerank: str | os.PathLike | None = None,
                device: str = "cpu") -> dict:
    """Embed every image of the cache (and, with ``data``, every prepared caption) into ``out/index.pt``.
    ``rerank``: a teran run whose region vectors of every image are stored too (float16), so that
    :class:`Reranker` with that run re-scores a text query's candidates without re-embedding them."""
    ckpt = load_retrieval_checkpoint(run)
    cache = open_cache(features)
    _check_cache(ckpt["feature_identity"], cache, f"retrieval run {ckpt['path']}")
    second = _teran_run(rerank) if rerank is not None else None
    if second is not None:
        _check_cache(second["feature_identity"], cache, f"retrieval run {second['path']}")
    model, tokenizer = model_from(ckpt, device)
    ids = [str(i) for i in cache.ids()]
    if not ids:
        raise InputError(f"feature cache {cache.root} is empty; extract features first")
    t0 = time.perf_counter()
    images = embed_images(model, cache, ids, device=device)
    stored_rerank = None
    if second is not None:
        e = embed_images(model_from(second, device)[0], cache, ids, device=device)     # (N, 1+R, D) each region
        stored_rerank = {"run": second["path"], "run_sha256": sha256_file(second["path"]),
                         "images": {"vectors": e.vectors.half().contiguous(), "mask": e.mask.contiguous()}}
    captions = files = None
    if data is not None:
        from glied.datasets.prepared import PreparedData
        prep = PreparedData.load(data)
        texts, owners = [], []
        for im in prep.images:
            for s in im["sentences"]:
                texts.append(" ".join(s))
                owners.append(str(im["id"]))
        captions = {"texts": texts, "image_ids": owners, **_pack(embed_texts(model, tokenizer, texts, device=device))}
        indexed = set(ids)
        files = {str(im["id"]): str(prep.image_path(i).resolve()) for i, im in enumerate(prep.images)
                 if str(im["id"]) in indexed}
    index = {"checkpoint": {k: ckpt[k] for k in ("config", "vocab", "max_words", "feature_identity", "model")},
             "run": ckpt["path"], "run_sha256": sha256_file(ckpt["path"]), "features": str(cache.root),
             "feature_identity": ckpt["feature_identity"], "image_ids": ids, "images": _pack(images),
             "captions": captions, "image_files": files, "rerank": stored_rerank}
    out = Path(out)
    ck.save(out / "index.pt", index, INDEX)
    return {"index": str(out / "index.pt"), "images": len(ids), "captions": len(captions["texts"]) if captions else 0,
            "seconds": round(time.perf_counter() - t0, 2)}


def check_query(query: Optional[str]) -> None:
    """Refuse a query with no words (None: no text query given)."""
    if query is not None and not words_of(query):
        raise InputError(f"empty query {query!r}: give a sentence to search for, e.g. \"a red circle\"")


class Index:
    """A loaded search index: the model, its tokenizer and the gallery embeddings."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        d = ck.load(path, INDEX, required=("checkpoint", "image_ids", "images", "feature_identity"))
        self.path, self.data = d["path"], d
        self.model, self.tokenizer = model_from(d["checkpoint"], device)
        self.device = device
        self.image_ids: list[str] = list(d["image_ids"])
        self.images = Embedding(d["images"]["vectors"].to(device), d["images"]["mask"].to(device))

    def image_file(self, image_id: str) -> Optional[str]:
        """The photo file of an indexed image (from the prepared data the index was built with), or None when
        the index does not list one for this id."""
        return (self.data.get("image_files") or {}).get(str(image_id))

    def check_run(self, run: str | os.PathLike) -> None:
        """Refuse to serve queries for another run than the one the index was built from (naming both)."""
        ckpt = load_retrieval_checkpoint(run)
        if sha256_file(ckpt["path"]) != self.data["run_sha256"]:
            raise ConfigError(f"{self.path} was built from run {self.data['run']}, not from {ckpt['path']}; "
                              f"rebuild it with `glied index --run {run}`")

    def check_cache(self, cache) -> None:
        diff = _diff(retrieval_identity(cache.manifest), self.data["feature_identity"])
        if diff:
            raise ConfigError(f"{self.path} was built from feature cache {self.data['features']}, whose features "
                              f"differ from those of {cache.root} ({'; '.join(diff[:3])}); query it with "
                              "features of the same extractor, or rebuild the index")

    @property
    def max_side(self) -> Optional[int]:
        """The decoding cap the indexed cache's photos were extracted with (caches that did not record it:
        the extractor default)."""
        from glied.datasets.images import DEFAULT_MAX_SIDE
        return (self.data["feature_identity"].get("extractor") or {}).get("max_side", DEFAULT_MAX_SIDE)

    def check_extractor(self, region_extractor, where: str) -> None:
        """Refuse a live region extractor whose features differ from the indexed cache's (naming both)."""
        trained = self.data["feature_identity"].get("extractor") or {}
        live = idn.extractor_identity(region_extractor, max_side=self.max_side)
        if "max_side" not in trained:
            live.pop("max_side")
        diff = _diff(live, trained, have_name=where)
        if diff:
            raise ConfigError(f"{self.path} was built from feature cache {self.data['features']}, but the region "
                              f"extractor of {where} gives other features ({'; '.join(diff[:3])}); use the "
                              "detector that made the cache, or rebuild the index")

    def _top(self, scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, scores.shape[-1])
        v, i = scores.topk(k)
        return v.numpy(), i.numpy()

    @torch.inference_mode()
    def text_to_images(self, query: str, k: int = 5) -> list[dict]:
        """Top-k images for a sentence: [{"image_id", "score"}, ...], best first."""
        check_query(query)
        q = embed_texts(self.model, self.tokenizer, [query], device=self.device)
        v, i = self._top(torch.from_numpy(score_all(self.model, self.images, q)[:, 0]), k)
        return [{"image_id": self.image_ids[j], "score": round(float(s), 5)} for s, j in zip(v, i)]

    def captions_gallery(self, captions_file: str | None) -> tuple[list[str], list[Optional[str]], Embedding]:
        if captions_file is not None:
            try:
                texts = [t.strip() for t in Path(captions_file).read_text(encoding="utf-8").splitlines() if t.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{captions_file}: cannot read the caption file ({e})") from None
            if not texts:
                raise InputError(f"{captions_file}: no captions in the file (one per line)")
            return texts, [None] * len(texts), embed_texts(self.model, self.tokenizer, texts, device=self.device)
        c = self.data.get("captions")
        if c is None:
            raise InputError(f"{self.path} holds no captions: rebuild it with `glied index ... --data PREP` or pass "
                             "--captions FILE (one caption per line)")
        return list(c["texts"]), list(c["image_ids"]), Embedding(c["vectors"].to(self.device), c["mask"].to(self.device))

    @torch.inference_mode()
    def image_to_captions(self, image: Embedding, k: int = 5, captions_file: str | None = None) -> list[dict]:
        """Top-k captions for one embedded image: [{"caption", "image_id" (the caption's own image), "score"}]."""
        texts, owners, gallery = self.captions_gallery(captions_file)
        v, i = self._top(torch.from_numpy(score_all(self.model, image, gallery)[0]), k)
        return [{"caption": texts[j], "image_id": owners[j], "score": round(float(s), 5)} for s, j in zip(v, i)]

    def embed_cached(self, cache, image_id: str) -> Embedding:
        """Embed one image of a feature cache (checked against the index's features) with the index's model."""
        return embed_cached(self.model, self, cache, image_id)

    def embed_photo(self, regions) -> Embedding:
        """Embed the :class:`glied.records.RegionFeatures` a region extractor gave for one photo."""
        return embed_regions(self.model, regions, self.device)


def embed_cached(model: RetrievalModel, index: "Index", cache, image_id: str) -> Embedding:
    """Embed one image of ``cache`` with ``model`` on the index's device, after checking that the cache holds
    the index's features and the image."""
    index.check_cache(cache)
    if str(image_id) not in cache:
        raise InputError(f"image id {image_id!r} is not in feature cache {cache.root}")
    return embed_images(model, cache, [str(image_id)], device=index.device)


@torch.inference_mode()
def embed_regions(model: RetrievalModel, regions, device: str = "cpu") -> Embedding:
    """Embed one photo's :class:`glied.records.RegionFeatures` (boxes in original pixels) with ``model``."""
    if len(regions) == 0:
        raise InputError("the detector found no region in the image")
    model.eval()
    f = torch.from_numpy(np.asarray(regions.features, np.float32))[None]       # (1, R, F)
    b = torch.from_numpy(np.asarray(regions.boxes, np.float32))[None]           # (1, R, 4)
    wh = torch.tensor([[regions.image_w, regions.image_h]])
    m = torch.ones(1, f.shape[1], dtype=torch.bool)
    return model.embed_images(f.to(device), b.to(device), wh.to(device), m.to(device))


class Reranker:
    """Re-scores an index's top ``k`` with a trained teran run's region–word alignment (MrSw), so a vse index
    answers with TERAN's finer score at the cost of k alignments per query instead of the whole gallery.

    The teran run must have been trained on the same features as the index (same extractor identity:
    :mod:`glied.datasets.identity`), else a one-line ConfigError naming both. Images of a text query are
    re-scored from the region vectors the index stores for this run (``build_index(rerank=...)``, checked by
    the run's sha256), else embedded from their cached regions: ``features`` (default: the cache the index was
    built from).
    Hits are the index's, reordered by the alignment: ``score`` (= ``rerank_score``, the teran alignment)
    and ``index_score`` (the index's own score)."""

    def __init__(self, run: str | os.PathLike, index: "Index", k: int = 20,
                 features: str | os.PathLike | None = None):
        r = _teran_run(run)
        if k < 1:
            raise ConfigError(f"--rerank-k must be >= 1 (got {k})")
        idn.check(r["feature_identity"], index.data["feature_identity"], have_name="run",
                  what=f"{r['path']}: this teran run was trained on other features than index {index.path} "
                       f"(built from feature cache {index.data['features']})",
                  fix="Re-rank with a teran run trained on the index's feature cache")
        self.path, self.index, self.k = r["path"], index, int(k)
        self.model, self.tokenizer = model_from(r, index.device)
        self.features = features
        self._cache = None
        # the index may hold this very run's region vectors of every image (`glied index --rerank`)
        pre = index.data.get("rerank")
        self.stored = pre is not None and pre["run_sha256"] == sha256_file(r["path"])
        if self.stored:
            self._rows = {i: j for j, i in enumerate(index.image_ids)}
            self._images = Embedding(pre["images"]["vectors"], pre["images"]["mask"])

    def _check_k(self, k: int) -> None:
        if k > self.k:
            raise ConfigError(f"-k {k} is more than --rerank-k {self.k}: only the top --rerank-k are re-ranked; "
                              "raise --rerank-k or lower -k")

    def cache(self):
        """The feature cache holding the indexed images' regions (checked against the index's identity)."""
        if self._cache is None:
            cache = open_cache(self.features if self.features is not None else self.index.data["features"])
            self.index.check_cache(cache)
            self._cache = cache
        return self._cache

    @staticmethod
    def _reorder(hits: list[dict], scores: np.ndarray, k: int) -> list[dict]:
        order = np.argsort(-scores, kind="stable")[:k]
        return [{**hits[j], "index_score": hits[j]["score"], "rerank_score": round(float(scores[j]), 5),
                 "score": round(float(scores[j]), 5)} for j in order]

    @torch.inference_mode()
    def text_to_images(self, query: str, k: int = 5) -> list[dict]:
        """The index's top ``self.k`` images for a sentence, re-ranked; the best ``k``."""
        self._check_k(k)
        first = self.index.text_to_images(query, self.k)
        if self.stored:
            rows = torch.tensor([self._rows[h["image_id"]] for h in first])
            images = Embedding(self._images.vectors[rows].float().to(self.index.device),
                               self._images.mask[rows].to(self.index.device))
        else:
            images = embed_images(self.model, self.cache(), [h["image_id"] for h in first], device=self.index.device)
        q = embed_texts(self.model, self.tokenizer, [query], device=self.index.device)
        return self._reorder(first, score_all(self.model, images, q)[:, 0], k)

    def embed_photo(self, regions) -> Embedding:
        return embed_regions(self.model, regions, self.index.device)

    def embed_cached(self, cache, image_id: str) -> Embedding:
        return embed_cached(self.model, self.index, cache, image_id)

    @torch.inference_mode()
    def image_to_captions(self, first_image: Embedding, image: Embedding, k: int = 5,
                          captions_file: str | None = None) -> list[dict]:
        """The index's top ``self.k`` captions for an image (``first_image``: its index embedding; ``image``:
        its teran embedding, :meth:`embed_photo` / :meth:`embed_cached`), re-ranked; the best ``k``."""
        self._check_k(k)
        first = self.index.image_to_captions(first_image, self.k, captions_file)
        texts = embed_texts(self.model, self.tokenizer, [h["caption"] for h in first], device=self.index.device)
        return self._reorder(first, score_all(self.model, image, texts)[0], k)


def region_extractor_for(bundle: str | None = None, detector: str | None = None,
                         extractor_module: str | None = None, device: str = "cpu",
                         precision: str = "fp32") -> tuple[Any, str]:
    """(region extractor, where it came from): a model bundle's detector, a detector run or weights, or a
    factory — the builder `glied extract` uses."""
    from glied.extractors import load_extractors

    where = bundle or detector or extractor_module
    if bundle:
        from glied.pipeline.bundle import read_bundle
        detector = str(read_bundle(bundle)[1]["detector"])
    if not detector and not extractor_module:
        raise ConfigError("search --image needs the region extractor: --model BUNDLE, --detector RUN or "
                          "--extractor-module MOD:FACTORY (or query a cached image with --image-id ID --features CACHE)")
    return load_extractors(detector, extractor_module=extractor_module, device=device,
                           precision=precision)[0], str(where)


def decode_photo(photo: str, max_side: Optional[int]):
    """Decode a photo; one line, the same as `glied caption`'s, when it cannot be decoded."""
    from glied.datasets.images import ImageLoadError, decode_image

    try:
        return decode_image(photo, max_side=max_side)
    except ImageLoadError as e:
        raise InputError(f"{photo}: {e.reason}") from None


def photo_regions(region_extractor, loaded):
    """Regions of one decoded photo, boxes in original pixels."""
    from glied.pipeline.extract import _rescale

    return _rescale(region_extractor.extract([loaded.image])[0], loaded)
