"""`glied caption`: raw photos -> regions and attribute words -> GLIED beam search -> captions, in one process.

    captioner = Captioner.from_bundle("model/", device="cpu")
    results = captioner.caption_files(["photo.jpg", "more.jpg"])

The forward reads like the paper: regions I and attribute words A are extracted from each photo, then the
decoder distils both and writes the caption. The region extractor and the attribute extractor are the same
objects `glied extract` uses (the preprocessing ships with them), so captioning sees exactly the features the
decoder was trained on; :meth:`Captioner.from_bundle` refuses a decoder trained on other features.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from glied.datasets import identity as idn
from glied.datasets.images import DEFAULT_MAX_SIDE, ImageLoadError, check_max_side, decode_image, find_images
from glied.errors import InputError
from glied.pipeline.bundle import read_bundle, write_bundle
from glied.pipeline.extract import _rescale
from glied.pipeline.show import Explanation, save_explanation
from glied.records import AttributeWords, RegionFeatures


@dataclass
class CaptionResult:
    """One photo's caption, what it was made from, or the reason it could not be captioned."""

    path: str
    caption: str = ""
    tokens: list[str] = field(default_factory=list)
    regions: Optional[RegionFeatures] = None
    words: Optional[AttributeWords] = None
    attention: Optional[np.ndarray] = None  # (T, R) decoder attention over regions per generated word
    image: Optional[np.ndarray] = None  # the decoded picture (downscaled when huge), for drawing
    image_scale: tuple[float, float] = (1.0, 1.0)  # picture pixels per original pixel, x and y
    error: Optional[str] = None

    def to_json(self, word_vocab: Sequence[str] | None = None, object_names=None) -> dict:
        d: dict = {"path": self.path}
        if self.error:
            d["error"] = self.error
            return d
        d["caption"] = self.caption
        if self.regions is not None:
            d["regions"] = [{"box": [round(float(v), 1) for v in self.regions.boxes[i]],
                             "object": _name(object_names, int(self.regions.obj_ids[i])),
                             "score": round(float(self.regions.obj_scores[i]), 4)} for i in range(len(self.regions))]
        if self.words is not None:
            d["attribute_words"] = [{"word": _name(word_vocab, int(w)), "prob": round(float(p), 4)}
                                    for w, p in zip(self.words.word_ids, self.words.probs)]
        return d


def _name(names, i: int):
    return names[i] if names is not None and 0 <= i < len(names) else i


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Photos and folders (recursive, :func:`glied.datasets.images.find_images`) to a list of files, in the
    order given."""
    out: list[str] = []
    for p in paths:
        out += find_images(p) if os.path.isdir(p) else [p]
    return out


class Captioner:
    """Region extractor + attribute extractor + decoder, composed.

    Args:
        regions: a region :class:`glied.extractors.Extractor` (``extract(images) -> list[RegionFeatures]``).
        attributes: a word :class:`glied.extractors.Extractor` (``extract(images) -> list[AttributeWords]``)
            with ``vocab``.
        decoder: a :class:`glied.models.glied.GliedDecoder` in eval mode.
        vocab: the decoder's caption vocabulary (itow).
        beam_size, max_len: decoding settings.
        max_side: photos are decoded at most this long (None: no cap); :meth:`from_bundle` takes the cap the
            decoder's training features were extracted with.
    """

    def __init__(self, regions, attributes, decoder, vocab: list[str], *, beam_size: int = 3, max_len: int = 24,
                 top_k: Optional[int] = None, device: str = "cpu", max_side: Optional[int] = DEFAULT_MAX_SIDE):
        from glied.datasets.captions import attribute_vocab_map

        self.region_extractor, self.word_extractor, self.decoder = regions, attributes, decoder
        self.vocab, self.beam_size, self.max_len, self.device = vocab, beam_size, max_len, device
        self.top_k = top_k
        self.max_side = check_max_side(max_side)
        self.attr_map = attribute_vocab_map(list(attributes.vocab), {w: i for i, w in enumerate(vocab)})
        self.timings: dict[str, float] = {"decode": 0.0, "detector": 0.0, "attributes": 0.0, "decoder": 0.0}

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, device: str = "cpu", precision: Optional[str] = None,
                    beam_size: Optional[int] = None) -> "Captioner":
        """Load a bundle (see :mod:`glied.pipeline.bundle`) and check that its parts belong together."""
        from glied.extractors import load_extractors
        from glied.models.checkpoint import build_model, load_checkpoint

        meta, files = read_bundle(path)
        settings = meta.get("settings", {})
        ckpt = load_checkpoint(files["decoder"])
        trained_on = ckpt.get("feature_identity") or {}
        top_k = (trained_on.get("attributes") or {}).get("top_k", settings.get("top_k"))
        # extract with the precision the training features were extracted with, unless asked otherwise
        precision = precision or ((trained_on.get("extractor") or {}).get("config") or {}).get("precision", "fp32")
        regions, attributes = load_extractors(files["detector"], files["attributes"], device=device,
                                              precision=precision, top_k=top_k or None)
        # decode photos with the cap the training features were extracted with (older caches did not record it)
        trained_ext = trained_on.get("extractor") or {}
        max_side = trained_ext.get("max_side", DEFAULT_MAX_SIDE)
        live = idn.build(regions, attributes, top_k=top_k, max_side=max_side)
        if "max_side" not in trained_ext:
            live["extractor"].pop("max_side")
        # the detector's precision changes the features by rounding only: a decoder trained on fp32 features
        # captions from bf16 ones (and back), so --precision auto may pick what this machine runs fast
        trained_on = idn.normalise(trained_on)
        for ident in (live, trained_on):
            ((ident.get("extractor") or {}).get("config") or {}).pop("precision", None)
        idn.check(live, trained_on, have_name="the bundle's extractors", limit=3,
                  what=f"{path}: the bundle's decoder was trained on features unlike those its detector and "
                       f"attribute detector give", fix="Rebuild the bundle from matching runs")
        decoder = build_model(ckpt).to(device)
        return cls(regions, attributes, decoder, list(ckpt["vocab"]), top_k=top_k, device=device, max_side=max_side,
                   beam_size=beam_size or int(settings.get("beam_size", 3)),
                   max_len=int(settings.get("max_len", decoder.config.max_positions - 1)))

    # ------------------------------------------------------------------------------------------------ core
    def caption_images(self, images: list[np.ndarray], with_attention: bool = False,
                       loaded: Optional[list] = None) -> list[CaptionResult]:
        """Caption decoded BGR uint8 photos. Returns one result per image, in order.

        ``loaded``: the :class:`glied.datasets.images.LoadedImage` of each photo when it was downscaled on
        decoding; boxes are then mapped back to original pixels.
        """
        import torch

        from glied.datasets.captions import collate, model_inputs
        from glied.models.beam import decode_text

        t0 = time.perf_counter()
        regs = self.region_extractor.extract(images)
        if loaded is not None:
            regs = [_rescale(r, im) for r, im in zip(regs, loaded)]
        t1 = time.perf_counter()
        words = self.word_extractor.extract(images)
        t2 = time.perf_counter()
        items = [self._item(i, r, w) for i, (r, w) in enumerate(zip(regs, words))]
        batch = collate(items)
        inputs = model_inputs(batch, self.device)
        with torch.inference_mode():
            seqs = self.decoder.generate(*inputs, beam_size=self.beam_size, max_len=self.max_len)  # (B, T)
            att = self._attention(inputs, seqs) if with_attention else None
        t3 = time.perf_counter()
        self.timings["detector"] += t1 - t0
        self.timings["attributes"] += t2 - t1
        self.timings["decoder"] += t3 - t2
        texts = decode_text(seqs, self.vocab)
        out = []
        for b in range(len(images)):
            toks = texts[b].split()
            a = None
            if att is not None:
                a = att[b, : len(toks), : len(regs[b])].cpu().numpy()
            out.append(CaptionResult(path="", caption=" ".join(toks), tokens=toks, regions=regs[b], words=words[b],
                                     attention=a, image=images[b]))
        return out

    def _item(self, i: int, r: RegionFeatures, w: AttributeWords) -> dict:
        import torch

        if len(r) == 0:
            raise InputError("the detector found no region in the photo")
        word_ids = np.asarray(w.word_ids, np.int64)
        from glied.datasets.captions import region_matrix

        return {"index": i, "regions": torch.from_numpy(region_matrix(r, self.decoder.config.box_geometry)),
                "attr_ids": torch.from_numpy(self.attr_map[word_ids]),
                "attr_probs": torch.from_numpy(np.asarray(w.probs, np.float32)),
                "captions": torch.zeros(1, 1, dtype=torch.long)}

    def _attention(self, inputs, seqs):
        """(B, T, R) attention of the aspect vector over the regions at each generated word (head mean)."""
        mem = self.decoder.encode(*inputs)
        return self.decoder.region_attention(mem, seqs)

    # ------------------------------------------------------------------------------------------------ files
    def caption_files(self, paths: Sequence[str], batch_size: int = 8, with_attention: bool = False,
                      max_side: Optional[int] = None, on_result: Optional[Callable[[CaptionResult], None]] = None
                      ) -> list[CaptionResult]:
        """Caption image files in batches; an unreadable photo gets a result with ``error`` set and the others
        are still captioned. ``max_side``: decoding cap (default: the captioner's, see the class docstring)."""
        max_side = self.max_side if max_side is None else check_max_side(max_side)
        results: list[CaptionResult] = []
        pending: list[tuple[str, object]] = []

        def caption(items: list) -> list[CaptionResult]:
            """Caption a batch; when one photo is rejected (no region, an image the detector cannot take),
            caption each alone so that only that one gets an error."""
            loaded = [im for _, im in items]
            try:
                return self.caption_images([im.image for im in loaded], with_attention, loaded=loaded)
            except (InputError, ValueError) as e:
                if len(items) == 1:
                    return [CaptionResult(path=items[0][0], error=str(e).splitlines()[0])]
            return [r for it in items for r in caption([it])]

        def flush():
            if not pending:
                return
            res = caption(pending)
            for (p, im), r in zip(pending, res):
                r.path, r.image_scale = p, (im.scale_x, im.scale_y)
                results.append(r)
                if on_result:
                    on_result(r)
            pending.clear()

        for p in paths:
            t0 = time.perf_counter()
            try:
                im = decode_image(p, max_side=max_side)
            except ImageLoadError as e:
                flush()
                r = CaptionResult(path=p, error=e.reason)
                results.append(r)
                if on_result:
                    on_result(r)
                continue
            self.timings["decode"] += time.perf_counter() - t0
            pending.append((p, im))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


def build_bundle(out: str | os.PathLike, *, detector: str, attributes: str, decoder: str,
                 beam_size: int = 3) -> Path:
    """Write a bundle from three trained runs, verified by loading it as a :class:`Captioner` first."""
    return write_bundle(out, detector=detector, attributes=attributes, decoder=decoder,
                        settings={"beam_size": beam_size}, verify=lambda folder: Captioner.from_bundle(folder))


def save_picture(result: CaptionResult, captioner: Captioner, path: str | os.PathLike) -> None:
    """Draw what the model saw for one captioned photo (see :mod:`glied.pipeline.show`) into a PNG."""
    r = result.regions
    sx, sy = result.image_scale
    if (sx, sy) != (1.0, 1.0):  # boxes are in original pixels; the picture may be the downscaled decode
        r = RegionFeatures(r.boxes * np.array([sx, sy, sx, sy], np.float32), r.features, r.obj_ids, r.obj_scores,
                           r.attr_ids, r.attr_scores, r.image_w, r.image_h)
    ex = Explanation(image=result.image, regions=r, caption=result.tokens, words=result.words,
                     word_vocab=captioner.word_extractor.vocab, attention=result.attention,
                     object_names=captioner.region_extractor.classes,
                     attribute_names=captioner.region_extractor.box_attributes)
    save_explanation(ex, str(path))
