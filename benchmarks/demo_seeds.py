"""Base vs GLIED, XE and SCST, over several seeds, with the demo's recipe: mean +- std of the test-split
caption metrics and of naming on an unseen-seed world, and whether the GLIED-vs-base difference exceeds the
spread.

It reuses a demo folder's world, prepared captions, feature cache, detector and attribute detector (run
`glied demo --out DEMO` first, or point --demo at a folder holding those stages), trains the decoders into
--out, one folder per model, stage and seed (a finished one is reused), and prints the table.

    python benchmarks/demo_seeds.py --demo glied-demo --out seeds [--seeds 0 1 2] [--xe-epochs N ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from glied.pipeline.demo import DemoConfig, decoder_recipe
from glied.pipeline.naming import score_captions


class _Replay:
    """Stands in for a region or attribute extractor: hands out results computed once, in call order."""

    def __init__(self, extractor, results: list) -> None:
        self.inner, self.results, self.pos = extractor, results, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _next(self, n: int) -> list:
        out = self.results[self.pos:self.pos + n]
        self.pos += n
        return out

    def extract(self, images):
        return self._next(len(images))

    def predict(self, images):
        return self._next(len(images))


def unseen_inputs(demo: Path, cfg: DemoConfig, top_k: int):
    """The unseen-seed world's photos, regions and attribute words (extracted once for every decoder)."""
    from glied.datasets.images import load_image
    from glied.pipeline.data import make_shapes_world
    from glied.extractors import load_extractors

    world = demo / "captions" / "unseen_world"
    if not (world / "instances.json").is_file():
        make_shapes_world(world, cfg.unseen_images, seed=cfg.unseen_seed, size=cfg.size)
    inst = json.loads((world / "instances.json").read_text())
    images = [load_image(str(world / "images" / im["file_name"])) for im in inst["images"]]
    regions, words = load_extractors(str(demo / "detector"), str(demo / "attributes"), device="cpu",
                                     precision="fp32", top_k=top_k)
    regs, ws = [], []
    for i in range(0, len(images), 16):
        regs += regions.extract(images[i:i + 16])
        ws += words.extract(images[i:i + 16])
    return world, inst, images, (regions, regs), (words, ws)


def naming_of(run: Path, unseen, beam: int) -> float:
    from glied.models.checkpoint import build_model, load_checkpoint
    from glied.pipeline.caption import Captioner

    world, inst, images, (regions, regs), (words, ws) = unseen
    ckpt = load_checkpoint(run)
    cap = Captioner(_Replay(regions, regs), _Replay(words, ws), build_model(ckpt), list(ckpt["vocab"]),
                    beam_size=beam, max_len=24)
    caps = []
    for i in range(0, len(images), 16):
        caps += [r.caption for r in cap.caption_images(images[i:i + 16])]
    return score_captions(world, {im["file_name"]: c for im, c in zip(inst["images"], caps)})["all_named"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True, help="a demo folder with world, prep, features, detector, attributes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["base", "glied"])
    ap.add_argument("--xe-epochs", type=int, default=None)
    ap.add_argument("--scst-epochs", type=int, default=None)
    ap.add_argument("--captions-per-image", type=int, default=None)
    ap.add_argument("--no-box-geometry", action="store_true")
    ap.add_argument("--no-region-sum", action="store_true", help="decoders without the summed regions per word")
    ap.add_argument("--layers", type=int, default=None, help="decoder passes (the demo's: 1)")
    ap.add_argument("--box-fourier", type=int, default=None, help="sin/cos box frequencies (0: none)")
    ap.add_argument("--coverage", type=int, choices=(0, 1), default=None, help="decoders with coverage (1) or not")
    a = ap.parse_args()
    from glied.pipeline.evaluate import evaluate
    from glied.pipeline.train import train

    cfg = DemoConfig()
    changes = {k: v for k, v in (("xe_epochs", a.xe_epochs), ("scst_epochs", a.scst_epochs),
                                 ("captions_per_image", a.captions_per_image)) if v is not None}
    if a.no_box_geometry:
        changes["box_geometry"] = False
    if a.no_region_sum:
        changes["region_sum"] = False
    if a.layers is not None:
        changes["decoder_layers"] = a.layers
    if a.box_fourier is not None:
        changes["box_fourier"] = a.box_fourier
    if a.coverage is not None:
        changes["coverage"] = bool(a.coverage)
    cfg = replace(cfg, **changes)
    demo, out = Path(a.demo), Path(a.out)
    prep, cache = demo / "prep", demo / "features" / "cache"
    unseen = unseen_inputs(demo, cfg, cfg.top_k)
    rows: dict[tuple[str, str], list[dict]] = {}
    for seed in a.seeds:  # seed by seed, so a stopped run still has both models of the seeds it finished
        for model in a.models:
            xe, scst = out / f"{model}_xe_seed{seed}", out / f"{model}_scst_seed{seed}"
            for run, stage, init in ((xe, "xe", None), (scst, "scst", xe)):  # run folders: best.pt, as the demo
                if not (run / "done.json").is_file():
                    train(prep, cache, run, decoder_recipe(model, stage, seed, cfg), init=init and str(init),
                          resume=(run / "last.pt").is_file(), log=lambda s: None)
                    (run / "done.json").write_text("{}")
                res = evaluate(run, cache, prep, "test", beam_size=cfg.beam_size, out=run,
                               log=lambda s: None)["metrics"]
                res = {k: v for k, v in res.items() if isinstance(v, (int, float))}
                res["naming"] = naming_of(run, unseen, cfg.beam_size)
                rows.setdefault((model, stage), []).append(res)
                print(f"{model} {stage} seed {seed}: CIDEr {res['CIDEr']:.3f} BLEU-4 {res['BLEU-4']:.3f} "
                      f"naming {100 * res['naming']:.1f}%", flush=True)
    cols = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "naming"]
    print(f"\n{len(a.seeds)} seeds {a.seeds}; test split (beam {cfg.beam_size}); naming: unseen seed "
          f"{cfg.unseen_seed}, {cfg.unseen_images} photos; mean +- std (sample std)")
    print(f"{'decoder':<12}" + "".join(f"{c:>17}" for c in cols))
    stats = {}
    for (model, stage), rs in rows.items():
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            mu, sd = statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
            stats[(model, stage, c)] = (mu, sd, v)
            cells.append(f"{mu:.3f} +- {sd:.3f}".rjust(17))
        print(f"{model + ' ' + stage.upper():<12}" + "".join(cells))
    if {"base", "glied"} <= set(a.models):
        for stage in ("xe", "scst"):
            for c in ("CIDEr", "naming"):
                (mb, sb, vb), (mg, sg, vg) = stats[("base", stage, c)], stats[("glied", stage, c)]
                diff = mg - mb
                spread = max(sb, sg)
                paired = np.array(vg) - np.array(vb)
                print(f"GLIED - base, {stage.upper()} {c}: {diff:+.3f} (per seed {np.round(paired, 3).tolist()}); "
                      f"spread (larger std) {spread:.3f}: "
                      f"{'exceeds' if abs(diff) > spread else 'does NOT exceed'} the spread")
    (out / "table.json").write_text(json.dumps({f"{m} {s}": v for (m, s), v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
