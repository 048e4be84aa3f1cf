"""`glied evaluate`: caption a split with a trained decoder and score it with pycocoevalcap.

Writes ``predictions_<split>.json`` in the COCO results format ([{"image_id", "caption"}], image ids are the
prepared ids, as in ``refs_<split>.json``) and ``metrics_<split>.json``. Metrics: BLEU-1..4, METEOR, ROUGE-L,
CIDEr (pycocoevalcap's ``Cider`` = CIDEr-D, df from the evaluated references) after its PTB tokenizer (Java).
SPICE runs only when its Stanford CoreNLP jars are present; otherwise it is reported as unavailable, never
as a number.
"""
from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from glied.datasets import identity as idn
from glied.datasets.captions import CaptionDataset, FeatureSource, collate, model_inputs
from glied.errors import ConfigError, InputError
from glied.fileio import write_json_atomic
from glied.models.beam import beam_search, greedy
from glied.models.glied import GliedDecoder

SPICE_UNAVAILABLE = "SPICE: unavailable (Stanford CoreNLP models cannot be fetched offline)"


@torch.no_grad()
def predict_split(model: GliedDecoder, dataset: CaptionDataset, beam_size: int, batch_size: int,
                  device: str, max_len: int) -> list[list[int]]:
    """Decode every image of ``dataset`` in order; returns word-id lists (ending with <eos>)."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        mem = model.encode(*model_inputs(batch, device))
        if beam_size == 1:
            seqs = greedy(model, mem, max_len, keep_logits=False)[0]
        else:
            seqs = beam_search(model, mem, beam_size, max_len)[0]
        out += seqs.cpu().tolist()
    model.train(was_training)
    return out


def decoding_precision(requested: str, device: str):
    """``requested`` ("fp32" | "bf16" | "auto") -> a PrecisionChoice for the decoder's inference GEMMs, by the
    same rule as the extractors' (glied.extractors.precision: "auto" is bf16 only where the CPU or GPU does
    bf16 natively). Reduced precision changes scores by rounding; docs/decoding.md has the measured speeds."""
    from glied.extractors.precision import PrecisionChoice, resolve_precision

    if requested not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"decode precision must be fp32, bf16 or auto, not {requested!r}")
    choice = resolve_precision(requested, device)
    if choice.precision == "fp16":  # a GPU without bf16: keep the decoder exact
        return PrecisionChoice("fp32", f"{choice.reason}; the decoder stays fp32 without native bf16")
    return choice


def spice_available() -> bool:
    """True when pycocoevalcap's SPICE has its CoreNLP jars (it would otherwise try to download them)."""
    try:
        import pycocoevalcap.spice.spice as sp
    except ImportError:
        return False
    lib = Path(sp.__file__).parent / "lib"
    return all((lib / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models"))


_METEOR = None  # one METEOR process per Python process (see _meteor_score)


def _meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR of PTB-tokenized ``res`` against ``gts``, from one METEOR process kept for the life of this
    Python process: its start (a JVM loading its paraphrase tables) takes ~8 s, a later call on 583 captions
    under 1 s, so `glied demo` and scripts that score several runs start it once. Every EVAL request is scored
    on its own, so reuse does not change a score (tests). A process that died is replaced once."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    for attempt in (0, 1):
        if _METEOR is None:
            _METEOR = Meteor()
            atexit.register(_close_meteor, _METEOR)
        try:
            return float(_METEOR.compute_score(gts, res)[0])
        except (OSError, ValueError):  # the process died (a broken pipe, an empty reply)
            dead, _METEOR = _METEOR, None
            _close_meteor(dead)
            if attempt:
                raise
    raise AssertionError("unreachable")


def _close_meteor(meteor) -> None:
    """End a METEOR process (pycocoevalcap's wrapper has no close method in some versions). A scoring that
    raised leaves the wrapper's lock held, and its ``__del__`` takes that lock: release it, or the interpreter
    hangs at exit."""
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        lock.release()
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(proc, name)
        if stream is None:
            continue
        try:
            stream.close()
        except OSError:  # input left unflushed for a process that died: the wrapper's __del__ closes it again
            setattr(proc, name, open(os.devnull, "rb"))
            getattr(proc, name).close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def coco_metrics(refs: dict[str, list[str]], preds: dict[str, str]) -> dict[str, Any]:
    """pycocoevalcap scores of raw-text predictions against raw-text references (PTB-tokenized first)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    scores: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i, b in enumerate(bleu):
        scores[f"BLEU-{i + 1}"] = float(b)
    scores["METEOR"] = _meteor_score(gts, res)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice_available():
        from pycocoevalcap.spice.spice import Spice
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        scores["SPICE"] = SPICE_UNAVAILABLE
    return scores


def evaluate(checkpoint: str | os.PathLike, features: str | os.PathLike | FeatureSource,
             data: str | os.PathLike, split: str = "test", beam_size: int = 3, batch_size: int = 50,
             out: Optional[str | os.PathLike] = None, device: str = "cpu", decode_precision: str = "fp32",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Caption ``split`` and score it; returns {"metrics": {...}, "predictions": path, "n_images", ...}.

    ``decode_precision``: "fp32" (exact), "bf16" or "auto" (bf16 where the CPU/GPU has it natively): the
    precision of the decoder's large inference GEMMs (:func:`decoding_precision`); it is recorded in the result.

    ``out`` defaults to the checkpoint's run directory. Raises ConfigError if the feature cache is not the one
    the model was trained on (naming what differs) and InputError if images of the split are missing from it.
    """
    from glied.datasets.prepared import PreparedData
    from glied.extractors.precision import torch_dtype
    from glied.models.checkpoint import build_model, load_checkpoint
    from glied.pipeline.train import _open_features

    if beam_size < 1:
        raise ConfigError(f"beam size must be >= 1 (got {beam_size})")
    ckpt = load_checkpoint(checkpoint)
    prep = PreparedData.load(data)
    source, source_name = _open_features(features)
    idn.check_trained_on(source.manifest, ckpt["feature_identity"], where=source_name, model=str(ckpt["path"]))
    if list(ckpt["vocab"]) != list(prep.vocab):
        raise ConfigError(f"{ckpt['path']}: vocabulary differs from {data}/vocab.json; evaluate with the "
                          "prepared "
                          "data the model was trained with")
    refs_file = Path(data) / f"refs_{split}.json"
    if not refs_file.is_file():
        raise InputError(f"{refs_file}: no references for split {split!r} (prepared data has val and test)")
    choice = decoding_precision(decode_precision, device)
    if decode_precision != "fp32":
        log(f"decoder {choice.describe()}")
    model = build_model(ckpt).to(device).set_decoding_precision(torch_dtype(choice.precision))
    max_attrs = (ckpt.get("train_config") or {}).get("max_attrs")
    ds = CaptionDataset(prep, source, split, max_attrs, where=source_name,
                        box_geometry=model.config.box_geometry)
    seqs = predict_split(model, ds, beam_size, batch_size, device, int(prep.labels.shape[1]))
    preds = {image_id: prep.decode(s) for image_id, s in zip(ds.ids, seqs)}
    out_dir = Path(out) if out is not None else Path(ckpt["path"]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / f"predictions_{split}.json"
    write_json_atomic(pred_path, [{"image_id": k, "caption": v} for k, v in preds.items()])
    gt = json.loads(refs_file.read_text())
    refs: dict[str, list[str]] = {str(im["id"]): [] for im in gt["images"]}
    for a in gt["annotations"]:
        refs[str(a["image_id"])].append(a["caption"])
    missing = [k for k in refs if k not in preds]
    if missing:
        raise InputError(f"{refs_file}: {len(missing)} reference images have no prediction "
                         f"(e.g. {missing[:3]})")
    metrics = coco_metrics(refs, {k: preds[k] for k in refs})
    result = {"checkpoint": ckpt["path"], "split": split, "beam_size": beam_size, "n_images": len(refs),
              "decode_precision": choice.precision, "metrics": metrics, "predictions": str(pred_path)}
    write_json_atomic(out_dir / f"metrics_{split}.json", result, indent=1)
    for k, v in metrics.items():
        log(f"{k:8s} {v if isinstance(v, str) else f'{v:.4f}'}")
    return result
