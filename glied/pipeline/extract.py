"""`glied extract`: photos -> region features (+ attribute words) in a crash-safe, resumable feature cache.

Data flow::

    enumerate_inputs(INPUT) -> shard -> skip ids already in the cache
      -> decode (and the detector's resize, where the extractor has ``input_preparer``) in DataLoader worker
         processes (``workers``; 0: in this process), a few batches ahead of the model, into pinned memory
         when the model is on a GPU (:mod:`glied.pipeline.extract_loader`)
      -> region_extractor.extract(batch)  [.extract_prepared(prepared inputs) / .extract_given_boxes(...)]
      -> attribute_extractor.extract(batch)          (optional)
      -> boxes mapped back to original pixels -> CacheWriter.put (fsync'ed in groups) on a writer thread,
         overlapping the next batch's compute

Bad images never stop the run: each gets one line on stderr and a record {id, path, kind, reason} in
``CACHE/failures.jsonl`` (replaced, atomically, at the end of each run; failed images are tried again on the
next run).
Extractors implement :class:`glied.extractors.Extractor` and are built by
:func:`glied.extractors.load_extractors`; its ``extractor_module`` ("pkg.mod:factory" or
"path/to/file.py:factory") loads any factory ``factory(weights=..., device=..., precision=...)`` that returns
a region extractor (for ``--boxes`` also ``extract_given_boxes(image, boxes (N, 4)) -> RegionFeatures``),
which is how users plug their own extractor and how the tests drive a real subprocess.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from glied.datasets import identity as idn
from glied.datasets import inputs as inp
from glied.datasets.cache import FAILURES, CacheWriter, make_manifest
from glied.datasets.images import DEFAULT_MAX_SIDE, LoadedImage, check_max_side
from glied.errors import ConfigError, InputError
from glied.fileio import atomic_open
from glied.pipeline.extract_loader import decoded
from glied.records import AttributeWords, RegionFeatures


@dataclass
class ExtractSummary:
    total: int              # images in INPUT (this shard)
    already: int            # skipped: already in the cache
    extracted: int
    failed: int
    seconds: float
    failures_path: str

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> a concrete torch device string (ConfigError if unavailable)."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
        return device
    raise ConfigError(f"--device {device!r}: expected cpu, cuda or auto")


def choose_precision(requested: str, device: str):
    """Resolve ``--precision`` ("auto" | "fp32" | "bf16" | "fp16") for ``device`` -> a PrecisionChoice (see
    :mod:`glied.extractors.precision`); :func:`say_precision` tells the user once the model has loaded."""
    from glied.extractors.precision import resolve_precision

    return resolve_precision(requested, device)


def say_precision(choice, log=None, quiet: bool = False) -> None:
    """One line with the precision used and why (not when ``quiet``), plus a warning line when a forced
    precision is slow here (always)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not quiet:
        log(choice.describe())
    if choice.warning:
        log(f"warning: {choice.warning}")


def load_boxes(path: str) -> dict[str, np.ndarray]:
    """Given boxes: COCO annotations json (bbox x,y,w,h) or {image_id: [[x1,y1,x2,y2], ...]}
    -> {id: (N, 4) float32 x1,y1,x2,y2}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--boxes {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--boxes {path}: not valid JSON ({e})") from None
    out: dict[str, list] = collections.defaultdict(list)
    bad: dict[str, str] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for k, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a:
                raise InputError(f"--boxes {path}: annotations[{k}] is not an object with an image_id")
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                out[str(a["image_id"])].append([x, y, x + w, y + h])
            except (KeyError, TypeError, ValueError):
                bad[str(a["image_id"])] = f"annotations[{k}].bbox {a.get('bbox')!r} is not [x, y, w, h]"
    elif isinstance(data, dict):
        for k, v in data.items():
            out[str(k)] = v
    else:
        raise InputError(f"--boxes {path}: expected COCO annotations or {{image_id: [[x1,y1,x2,y2], ...]}}")
    res: dict[str, np.ndarray | str] = {}
    for k, v in out.items():
        try:
            a = np.asarray(v, dtype=np.float32)
            res[k] = a.reshape(-1, 4) if a.size or a.ndim != 1 else np.zeros((0, 4), np.float32)
        except (ValueError, TypeError):
            res[k] = f"boxes {str(v)[:60]} are not a list of [x1, y1, x2, y2]"
    res.update(bad)
    return res


def box_problem(boxes) -> str | None:
    """Why given boxes (N, 4) x1,y1,x2,y2 cannot be used (None: fine). A string is load_boxes' reason."""
    if isinstance(boxes, str):
        return boxes
    if not np.isfinite(boxes).all():
        return "a given box has a NaN or infinite coordinate"
    if (boxes < 0).any():
        return "a given box has a negative coordinate"
    if len(boxes) and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        return "a given box has zero area (need x2 > x1 and y2 > y1)"
    return None


_IMAGE_PREFIX = re.compile(r"^image \d+: ")


def _extract_isolated(run, batch: list, fail) -> list:
    """``run(batch)`` -> per-item results; when the batch fails on an input the extractor rejects, each item
    is run alone so that only the bad one is recorded by ``fail(item, kind, reason)`` (and skipped: None)."""
    try:
        return run(batch)
    except (InputError, ValueError) as e:
        if len(batch) == 1:
            fail(batch[0][0], "extractor", _IMAGE_PREFIX.sub("", str(e).splitlines()[0]))
            return [None]
    out = []
    for item in batch:
        out += _extract_isolated(run, [item], fail)
    return out


def _rescale(r: RegionFeatures, im: LoadedImage) -> RegionFeatures:
    """Map regions found on a downscaled image back to original pixels and the original size."""
    boxes = np.asarray(r.boxes, np.float32)
    if (im.scale_x, im.scale_y) != (1.0, 1.0):
        boxes = boxes / np.array([im.scale_x, im.scale_y] * 2, np.float32)  # (R, 4) / (4,)
    return RegionFeatures(boxes=boxes, features=r.features, obj_ids=r.obj_ids, obj_scores=r.obj_scores,
                          attr_ids=r.attr_ids, attr_scores=r.attr_scores, image_w=im.orig_w,
                          image_h=im.orig_h)


def cache_manifest(region_extractor, attribute_extractor=None, *, top_k: int | None = None,
                   max_side: int | None = DEFAULT_MAX_SIDE, boxes_given: bool = False,
                   dtype: str = "float16") -> dict:
    """The manifest (feature identity) of a cache that :func:`extract` fills with these settings."""
    ident = idn.build(region_extractor, attribute_extractor, top_k=top_k, max_side=check_max_side(max_side),
                      boxes=boxes_given)
    return make_manifest(ident["extractor"], dtype, ident["attributes"])


def extract(input_path: str, out: str, *, region_extractor, attribute_extractor=None,
            top_k: int | None = None, images_root: str | None = None, dtype: str = "float16",
            shard: tuple[int, int] = (0, 1), exclude=frozenset(),
            batch_size: int = 4, workers: int = 2, boxes: str | dict | None = None,
            max_side: int | None = DEFAULT_MAX_SIDE, progress: bool = True, log=None,
            commit_every: int = 256, commit_seconds: float = 2.0,
            keep_word_maps: bool = False) -> ExtractSummary:
    """Extract every image of ``input_path`` (shard ``shard``) not yet in cache ``out``; see module docstring.

    ``max_side``: photos are decoded at most this long (None or 0: no cap); recorded in the cache identity,
    so resuming with another value is refused. Attribute word maps (V, h, w) are large (often more than the
    regions) and are dropped unless ``keep_word_maps``. Ids in ``exclude`` (e.g. those already merged into
    another cache) are skipped and counted as already done. Returns an :class:`ExtractSummary`. Raises
    ConfigError when ``out`` holds features of another extractor identity (the message says what differs);
    committed entries are never rewritten.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"extract: batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    t0 = time.perf_counter()
    max_side = check_max_side(max_side)
    items = inp.shard(inp.enumerate_inputs(input_path, images_root), *shard)
    given = load_boxes(boxes) if isinstance(boxes, str) else boxes
    manifest = cache_manifest(region_extractor, attribute_extractor, top_k=top_k, max_side=max_side,
                              boxes_given=given is not None, dtype=dtype)
    writer = CacheWriter(out, manifest, commit_every=commit_every, commit_seconds=commit_seconds)
    fail_path = os.path.join(out, FAILURES)
    n_fail = n_done = 0
    try:
        if writer.recovered_bytes:
            log(f"{out}: repaired a torn index tail ({writer.recovered_bytes} bytes) "
                f"left by an interrupted run")
        if writer.dropped:
            log(f"{out}: dropped {len(writer.dropped)} damaged entries, extracted again below: "
                + "; ".join(f"{k}: {v}" for k, v in list(writer.dropped.items())[:5])
                + ("; ..." if len(writer.dropped) > 5 else ""))
        todo = [it for it in items if it.id not in writer and it.id not in exclude]
        already = len(items) - len(todo)
        with atomic_open(fail_path, "w", encoding="utf-8") as ff:       # replaced when the run ends
            def fail(it: inp.InputImage, kind: str, reason: str) -> None:
                nonlocal n_fail
                n_fail += 1
                ff.write(json.dumps({"id": it.id, "path": it.path, "kind": kind, "reason": reason}) + "\n")
                ff.flush()
                msg = f"skipped {it.id}: {reason} ({it.path})"
                (bar.write(msg, file=sys.stderr) if bar is not None else log(msg))

            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(todo), unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1)
            batch: list[tuple[inp.InputImage, LoadedImage, object]] = []
            # the detector's resize runs where the decoding runs (worker processes) when the extractor offers it
            prepare = (region_extractor.input_preparer() if given is None
                       and hasattr(region_extractor, "input_preparer")
                       and hasattr(region_extractor, "extract_prepared") else None)
            pin = prepare is not None and str(getattr(region_extractor, "device", "cpu")).startswith("cuda")

            def run(items: list) -> list:
                ims = [b[1].image for b in items]
                if given is not None:
                    bx = [given[it.id] * np.array([li.scale_x, li.scale_y] * 2, np.float32)  # (N, 4)
                          for it, li, _ in items]
                    # per image, as glied.extractors.bottomup's RegionExtractor.extract_given_boxes(image, boxes)
                    regs = [region_extractor.extract_given_boxes(im, b) for im, b in zip(ims, bx)]
                elif prepare is not None:
                    regs = region_extractor.extract_prepared([b[2] for b in items])
                else:
                    regs = region_extractor.extract(ims)
                words = ([None] * len(ims) if attribute_extractor is None
                         else attribute_extractor.extract(ims))
                if len(regs) != len(ims) or len(words) != len(ims):
                    raise ConfigError(f"the extractor returned {len(regs)} region sets and {len(words)} word "
                                      f"lists for a batch of {len(ims)} images; fix the extractor")
                return list(zip(regs, words))

            def flush() -> None:
                nonlocal n_done
                if not batch:
                    return
                entries = []
                for (it, li, _), res in zip(batch, _extract_isolated(run, batch, fail)):
                    if res is None:             # rejected by the extractor: recorded in failures.jsonl
                        continue
                    r, w = res
                    if w is not None and w.word_map is not None and not keep_word_maps:
                        w = AttributeWords(word_ids=w.word_ids, probs=w.probs)
                    entries.append((it.id, r, li, w))
                # cache writes (and their fsyncs) run on one writer thread while the model computes the
                # next batch; at most two batches wait, and a write error surfaces here
                writes.append(wpool.submit(put_all, entries))
                while len(writes) > 2:
                    writes.popleft().result()
                n_done += len(entries)
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

            def put_all(entries) -> None:
                for key, r, li, w in entries:
                    writer.put(key, _rescale(r, li), w)

            def skip(it: inp.InputImage, kind: str, reason: str) -> None:
                fail(it, kind, reason)
                if bar is not None:
                    bar.update(1)

            if given is not None:
                usable = []
                for it in todo:
                    why = (box_problem(given[it.id]) if it.id in given
                           else "no boxes given for this image id in --boxes")
                    if why is None:
                        usable.append(it)
                    else:
                        skip(it, "no_boxes" if it.id not in given else "bad_boxes", why)
                todo = usable
            wpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glied-cache-writer")
            writes: collections.deque[Future] = collections.deque()
            images = decoded(todo, max_side=max_side, workers=workers, prepare=prepare, pin_memory=pin,
                             ahead=max(2, workers) * batch_size * 2)
            try:
                for d in images:
                    if d.error is not None:
                        skip(d.item, *d.error)
                        continue
                    if d.rejected is not None:
                        skip(d.item, "extractor", _IMAGE_PREFIX.sub("", d.rejected))
                        continue
                    batch.append((d.item, d.loaded(), d.prepared))
                    if len(batch) >= batch_size:
                        flush()
                flush()
                while writes:
                    writes.popleft().result()
            finally:
                images.close()                  # stops the decoding workers
                wpool.shutdown(wait=True)       # every queued write finishes before the writer closes
                if bar is not None:
                    bar.close()
    finally:
        writer.close()
    return ExtractSummary(total=len(items), already=already, extracted=n_done, failed=n_fail,
                          seconds=time.perf_counter() - t0, failures_path=fail_path)
