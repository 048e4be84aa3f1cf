"""`glied demo`: the whole pipeline on the embedded synthetic shapes world, every stage cached.

Stages, each in its own folder under ``out`` and skipped on a re-run when its settings and inputs are unchanged
(see :mod:`glied.pipeline.stages`)::

    world        make the shapes world (images, COCO boxes with attributes, Karpathy captions)
    prep         vocabulary and encoded captions
    detector     train the small bottom-up detector          -> detector_eval (box mAP@0.5, attribute accuracy)
    attributes   train the MIL attribute-word detector        -> attributes_eval (word mAP, P/R@k)
    features     `glied extract` of every image into the feature cache (regions + attribute words)
    retrieval    image-sentence retrieval (vse dual encoder) trained on the cache -> R@1/5/10 both ways, rsum
    base_xe, base_scst, glied_xe, glied_scst    decoder training (XE, then SCST from the XE weights)
    eval         COCO caption metrics of the four decoders on the test split
    bundle       detector + attribute detector + GLIED (SCST) in one model bundle
    captions     the bundle captions a few held-out photos, with pictures; and a fresh, unseen-seed world, scored
                 on naming every object's shape and colour
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from glied.pipeline.data import make_shapes_world, prepare_captions
from glied.pipeline.stages import StageRunner


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo; the defaults fit 20 minutes on 2 CPU cores."""

    images: int = 3000
    seed: int = 0
    size: int = 128
    max_length: int = 24
    count_threshold: int = 5
    detector_epochs: int = 8
    attribute_epochs: int = 8
    top_k: int = 15
    xe_epochs: int = 8
    scst_epochs: int = 2
    batch_size: int = 50
    beam_size: int = 3
    unseen_images: int = 200
    unseen_seed: int = 1000
    pictures: int = 4
    threads: int | None = None


def _detector_stage(world: Path, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.detector import train_detector

        s = train_detector(str(world / "instances.json"), str(world / "images"), str(d), preset="small",
                           epochs=cfg.detector_epochs, seed=cfg.seed, split="train", log=log,
                           resume=(d / "checkpoint.pt").exists())  # an interrupted demo continues its run
        return {"run": str(d), "seconds": s.get("seconds")}
    return run


def _detector_eval_stage(world: Path, det_run: str, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.detector import evaluate_detector_run

        return evaluate_detector_run(det_run, str(world / "instances.json"), str(world / "images"), split="test",
                                     log=log)
    return run


def _attributes_stage(prep: Path, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.attributes import train_attributes

        train_attributes(prep, d, config="small", epochs=cfg.attribute_epochs, seed=cfg.seed, log=log,
                         resume=(d / "last.pt").exists())
        return {"run": str(d)}
    return run


def _attributes_eval_stage(prep: Path, mil_run: str, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.attributes import evaluate_attributes

        return evaluate_attributes(mil_run, prep, split="test", top_ks=(5, cfg.top_k), out=d / "metrics.json",
                                   log=log)
    return run


def _features_stage(world: Path, det_run: str, mil_run: str, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.extract import build_attribute_extractor, build_region_extractor, extract

        regions = build_region_extractor(det_run, None, "cpu", "fp32")
        words = build_attribute_extractor(mil_run, "cpu", cfg.top_k)
        s = extract(str(world / "captions.json"), str(d / "cache"), region_extractor=regions,
                    attribute_extractor=words, top_k=cfg.top_k, images_root=str(world), dtype="float16",
                    batch_size=16, progress=False, log=log)
        return {"cache": str(d / "cache"), "summary": {k: v for k, v in vars(s).items() if _jsonable(v)}}
    return run


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _decoder_stage(prep: Path, cache: str, model: str, stage: str, epochs: int, cfg: DemoConfig, log,
                   init: str | None = None) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.train import TrainConfig, train

        # the shapes-world recipe (benchmarks/shapes_recipe.py): a 256-wide model, one caption per image and
        # epoch, 2 SCST samples per image with the greedy baseline
        tc = TrainConfig(model=model, stage=stage, epochs=epochs if stage == "xe" else 0,
                         scst_epochs=epochs if stage == "scst" else 0, batch_size=cfg.batch_size, seed=cfg.seed,
                         d_model=256, d_embed=128, lr=1e-3, warmup_steps=100, captions_per_image=1,
                         scst_samples=2)
        s = train(prep, cache, d, tc, init=init, log=log, resume=(d / "last.pt").exists())
        return {"run": str(d), "best_val_cider": s.get("best_val_cider")}
    return run


def _eval_stage(prep: Path, cache: str, runs: dict[str, str], cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.evaluate import evaluate

        table = {}
        for name, r in runs.items():
            res = evaluate(r, cache, prep, split="test", beam_size=cfg.beam_size, out=d / name, log=log)
            table[name] = res["metrics"]
        return table
    return run


def _retrieval_stage(prep: Path, cache: str, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        import shutil

        from glied.pipeline.retrieval import RetrievalTrainConfig, evaluate_retrieval, train_retrieval

        # image-sentence retrieval on the same cache (docs/retrieval.md): the vse dual encoder, small sizes
        shutil.rmtree(d / "vse", ignore_errors=True)  # a partial run from an interrupted demo starts over
        train_retrieval(prep, cache, d / "vse", RetrievalTrainConfig(model="vse", preset="small", epochs=3,
                                                                     batch_size=64, lr_decay_epoch=2), log=log)
        return evaluate_retrieval(d / "vse", cache, prep, "test", "all", log=log)
    return run


def _captions_stage(bundle: str, world: Path, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.caption import Captioner, save_picture
        from glied.pipeline.naming import naming_accuracy

        captioner = Captioner.from_bundle(bundle)
        tests = [im for im in json.loads((world / "captions.json").read_text())["images"] if im["split"] == "test"]
        shown = []
        for im in tests[: cfg.pictures]:
            path = str(world / im["filepath"] / im["filename"])
            r = captioner.caption_files([path], with_attention=True)[0]
            pic = d / f"{Path(im['filename']).stem}.png"
            save_picture(r, captioner, pic)
            shown.append({"photo": path, "caption": r.caption, "picture": str(pic),
                          "references": [s["raw"] for s in im["sentences"][:2]]})
            log(f"  {im['filename']}: {r.caption}")
        unseen = d / "unseen_world"
        make_shapes_world(unseen, cfg.unseen_images, seed=cfg.unseen_seed, size=cfg.size)
        naming = naming_accuracy(captioner, unseen)
        return {"pictures": shown, "unseen": naming}
    return run


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; prints the metrics table and per-stage times; returns {stage: result}."""
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    runner = StageRunner(out, log)
    quiet = lambda s: None  # noqa: E731  (stage internals log to their own files; the demo prints summaries)
    world = Path(runner.run("world", {"images": cfg.images, "seed": cfg.seed, "size": cfg.size},
                            lambda d: make_shapes_world(d, cfg.images, seed=cfg.seed, size=cfg.size))["out"])
    prep = out / "prep"
    runner.run("prep", {"max_length": cfg.max_length, "count_threshold": cfg.count_threshold},
               lambda d: prepare_captions(world / "captions.json", d, cfg.count_threshold, cfg.max_length)["counts"],
               after=("world",))
    det = runner.run("detector", {"epochs": cfg.detector_epochs}, _detector_stage(world, cfg, quiet),
                     after=("world",))["run"]
    det_eval = runner.run("detector_eval", {}, _detector_eval_stage(world, det, quiet), after=("detector",))
    mil = runner.run("attributes", {"epochs": cfg.attribute_epochs}, _attributes_stage(prep, cfg, quiet),
                     after=("prep",))["run"]
    mil_eval = runner.run("attributes_eval", {"top_k": cfg.top_k}, _attributes_eval_stage(prep, mil, cfg, quiet),
                          after=("attributes",))
    cache = runner.run("features", {"top_k": cfg.top_k}, _features_stage(world, det, mil, cfg, quiet),
                       after=("detector", "attributes"))["cache"]
    retrieval = runner.run("retrieval", {"epochs": 3}, _retrieval_stage(prep, cache, quiet), after=("prep", "features"))
    runs = {}
    for model in ("base", "glied"):
        xe = runner.run(f"{model}_xe", {"epochs": cfg.xe_epochs, "batch": cfg.batch_size},
                        _decoder_stage(prep, cache, model, "xe", cfg.xe_epochs, cfg, quiet),
                        after=("prep", "features"))["run"]
        scst = runner.run(f"{model}_scst", {"epochs": cfg.scst_epochs, "batch": cfg.batch_size},
                          _decoder_stage(prep, cache, model, "scst", cfg.scst_epochs, cfg, quiet, init=xe),
                          after=(f"{model}_xe",))["run"]
        runs[f"{model} XE"], runs[f"{model} SCST"] = xe, scst
    table = runner.run("eval", {"beam": cfg.beam_size}, _eval_stage(prep, cache, runs, cfg, quiet),
                       after=("base_scst", "glied_scst"))

    def bundle_stage(d: Path) -> dict:
        from glied.pipeline.caption import build_bundle
        return {"bundle": str(build_bundle(d / "model", detector=str(Path(det) / "checkpoint.pt"), attributes=mil,
                                           decoder=runs["glied SCST"],
                                           beam_size=cfg.beam_size))}
    bundle = runner.run("bundle", {}, bundle_stage, after=("glied_scst",))["bundle"]
    caps = runner.run("captions", {"pictures": cfg.pictures, "unseen": [cfg.unseen_images, cfg.unseen_seed]},
                      _captions_stage(bundle, world, cfg, log), after=("bundle",))

    report = format_report(det_eval, mil_eval, table, caps, cfg) + _retrieval_line(retrieval)
    log("")
    log(report)
    log("per-stage time (s):")
    total = 0.0
    for name, sec, cached in runner.timings():
        total += 0 if cached else sec
        log(f"  {name:<16} {sec:8.1f}{'  (cached; time of the run that made it)' if cached else ''}")
    log(f"  {'this run':<16} {total:8.1f}")
    log(f"bundle: {bundle}   pictures: {out / 'captions'}")
    (out / "report.txt").write_text(report)
    return {name: r.result for name, r in runner.results.items()} | {"config": asdict(cfg)}


def _retrieval_line(m: dict) -> str:
    from glied.pipeline.retrieval import format_metrics
    return f"\nretrieval (vse) {format_metrics(m)}\n"


def format_report(det_eval: dict, mil_eval: dict, table: dict, caps: dict, cfg: DemoConfig) -> str:
    """The demo's metrics, as plain text."""
    lines = ["shapes world, test split", ""]
    lines.append(f"detector      box mAP@0.5 {det_eval.get('map50', float('nan')):.3f}   "
                 f"attribute accuracy {det_eval.get('attr_acc', float('nan')):.3f} "
                 f"(colour {det_eval.get('attr_colour_acc', float('nan')):.3f}, "
                 f"size {det_eval.get('attr_size_acc', float('nan')):.3f})")
    lines.append(f"MIL words     mAP {mil_eval.get('mAP', float('nan')):.3f}")
    lines.append("")
    cols = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
    lines.append(f"{'decoder':<12}" + "".join(f"{c:>9}" for c in cols))
    for name, m in table.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{v:9.3f}" if isinstance(v, (int, float)) else f"{'n/a':>9}")
        lines.append(f"{name:<12}" + "".join(cells))
    spice = next((m.get("SPICE") for m in table.values() if not isinstance(m.get("SPICE"), (int, float))), None)
    if spice:
        lines.append(str(spice))
    u = caps.get("unseen", {})
    if u:
        lines.append("")
        lines.append(f"unseen seed {cfg.unseen_seed}, {u.get('images')} photos through the bundle: every object's "
                     f"shape and colour named in {100 * u.get('all_named', 0):.1f}% of photos "
                     f"(objects named: {100 * u.get('objects_named', 0):.1f}%)")
    return "\n".join(lines) + "\n"
