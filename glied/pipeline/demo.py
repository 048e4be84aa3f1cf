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

Every path a stage records (``stage.json``) is relative to the demo folder, so a demo folder can be moved or
read from anywhere. The decoders are trained with ``decoder_seeds`` seeds each and the table gives mean +- std
over them (``benchmarks/demo_seeds.py`` runs three).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from glied.fileio import write_text_atomic
from glied.pipeline.data import make_shapes_world, prepare_captions
from glied.pipeline.stages import StageRunner


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo; the defaults aim at 20 minutes on 2 CPU cores."""

    # 6,000 photos (4,800 for training) instead of 3,000: GLIED XE naming on the unseen seed went from 63.5% to
    # 67.5% with the same detector and decoder steps (one seed), and the detector below (1.4x the steps of 7
    # epochs on 2,401) has every object's best region of the right class in 92% of unseen photos instead of
    # 77.5%; see docs/architecture.md, "What limits naming"
    images: int = 6000
    seed: int = 0
    size: int = 128
    max_length: int = 24
    count_threshold: int = 5
    # detector schedule, measured on the test split (docs/architecture.md, "Detector on the shapes world"):
    # 5 epochs of 4,800 photos at peak lr 3e-3 with 16 RoIs / 300 pre-NMS proposals per image in training;
    # on 2,400 photos 7 epochs gave box mAP@0.5 0.924-0.934, 6 epochs 0.897-0.912, 5: 0.886
    detector_epochs: int = 5
    # the small detector's input side (the photos are 128 px); 192 px for 6 epochs trains in ~0.4x the time
    # but reached box mAP@0.5 0.80 on the test split
    detector_input: int = 256
    detector_lr: float | None = 3e-3           # None: train-detector's default (2e-3)
    # RoIs per image and RPN pre-NMS proposals in training (train-detector's defaults: 32, the model's 1000):
    # 16 / 300 make a step ~0.65x as long (res5 runs per RoI); at 8 epochs box mAP@0.5 0.916 as with 32 / 1000
    detector_roi_batch: int = 16
    detector_train_pre_nms: int = 300
    # bf16 autocast where the CPU has native bf16 (AVX-512-BF16, AMX), else fp32 (6 epochs in bf16: 0.917)
    detector_precision: str = "auto"
    attribute_epochs: int = 1  # the MIL trunk starts from the detector's (--init-from): one pass suffices
    top_k: int = 15
    # decoders: XE epochs (one reference per image and epoch) and SCST epochs over 4,800 photos; GLIED XE naming
    # on the unseen seed (beam 3, seed 0) grew with the steps: 2,400 photos x 8 / 24 / 40 epochs: 54 / 60.5 /
    # 64.5%; 4,800 photos x 15 / 30 epochs: 67.5 / 70%
    xe_epochs: int = 15
    # GLIED SCST over 3 seeds, naming 72.7 +- 2.9% / 75.8 +- 2.8% / 75.0 +- 0.5% and CIDEr 4.862 / 4.937 / 4.946
    # after 1 / 2 / 3 epochs; an epoch costs ~16 s (base) and ~24 s (GLIED) on 2 cores
    scst_epochs: int = 2
    captions_per_image: int = 1  # XE: references drawn per image and epoch
    # model width d_model (word embeddings half as wide). The paper's 512 named 73.5% / 72.5% (XE, seeds 0 / 1)
    # against 69% at 256 (seed 0), but trains ~2.4x as long: over the 20-minute budget on 2 cores
    decoder_width: int = 256
    box_geometry: bool = True  # the decoder reads each region's box position and size
    # the decoder adds the sum of its region vectors to every word, so it can tell 3 objects from 4 (attention
    # takes weighted means, which do not grow with the number of regions)
    region_sum: bool = True
    # box centres and sizes also as sin/cos at this many frequencies (GliedConfig.box_fourier), so attention can
    # pick the region at a given position, e.g. the next one to the right of the object just named
    box_fourier: int = 0
    # the decoder marks the regions its caption has named so far (GliedConfig.coverage)
    coverage: bool = False
    decoder_layers: int = 1  # decoder passes (GliedConfig.layers)
    decoder_seeds: tuple[int, ...] = (0,)
    batch_size: int = 50
    beam_size: int = 3
    unseen_images: int = 200
    unseen_seed: int = 1000
    pictures: int = 4
    threads: int | None = None


def _rel(path: str | Path, root: Path) -> str:
    """``path`` relative to the demo folder ``root`` (what stage records store)."""
    return os.path.relpath(Path(path).resolve(), root.resolve())


def _detector_stage(world: Path, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.detector import train_detector

        overrides = detector_overrides(cfg)
        ckpt = d / "checkpoint.pt"
        if ckpt.exists() and not _same_detector_recipe(d, cfg, overrides):
            for f in ("checkpoint.pt", "config.json", "log.jsonl"):   # a run of other settings: start afresh
                (d / f).unlink(missing_ok=True)
        s = train_detector(str(world / "instances.json"), str(world / "images"), str(d), preset="small",
                           epochs=cfg.detector_epochs, lr=cfg.detector_lr, input_size=cfg.detector_input,
                           seed=cfg.seed, split="train", overrides=overrides, log=log,
                           resume=ckpt.exists())  # an interrupted demo continues its run
        return {"run": d.name, "seconds": s.get("seconds")}
    return run


def detector_overrides(cfg: DemoConfig) -> dict:
    """The DetectorTrainConfig settings the demo sets beyond epochs, lr, input and seed."""
    return {"roi_batch_per_image": cfg.detector_roi_batch, "rpn_train_pre_nms_topk": cfg.detector_train_pre_nms,
            "precision": cfg.detector_precision}


def _same_detector_recipe(d: Path, cfg: DemoConfig, overrides: dict) -> bool:
    """Whether the run in ``d`` was started with the settings the demo asks for now (so it can be resumed)."""
    try:
        stored = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    train, model = stored.get("train", {}), stored.get("model", {})
    wanted = {**overrides, "seed": cfg.seed, **({"lr": cfg.detector_lr} if cfg.detector_lr is not None else {})}
    return (all(train.get(k) == v for k, v in wanted.items()) and train.get("epochs", 0) <= cfg.detector_epochs
            and model.get("min_size") == cfg.detector_input)


def _portable(obj, root: Path):
    """``obj`` with every string that names a path inside the demo folder made relative to it."""
    if isinstance(obj, dict):
        return {k: _portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, root) for v in obj]
    if isinstance(obj, str) and os.sep in obj:
        rel = _rel(obj, root)
        if not rel.startswith(os.pardir) and (root / rel).exists():
            return rel
    return obj


def _detector_eval_stage(world: Path, det_run: str, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.detector import evaluate_detector_run

        return _portable(evaluate_detector_run(det_run, str(world / "instances.json"), str(world / "images"),
                                               split="test", log=log), d.parent)
    return run


def _attributes_stage(prep: Path, det_run: str, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.attributes import train_attributes

        # the MIL trunk starts as the demo's own detector's trunk (Fang et al. start from an ImageNet CNN)
        train_attributes(prep, d, config="bottomup", init_from=det_run, epochs=cfg.attribute_epochs, seed=cfg.seed,
                         log=log, resume=(d / "last.pt").exists())
        return {"run": d.name}
    return run


def _attributes_eval_stage(prep: Path, mil_run: str, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.attributes import evaluate_attributes

        return _portable(evaluate_attributes(mil_run, prep, split="test", top_ks=(5, cfg.top_k),
                                             out=d / "metrics.json", log=log), d.parent)
    return run


def _features_stage(world: Path, det_run: str, mil_run: str, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.extractors import load_extractors
        from glied.pipeline.extract import extract

        regions, words = load_extractors(det_run, mil_run, device="cpu", precision="fp32", top_k=cfg.top_k)
        s = extract(str(world / "captions.json"), str(d / "cache"), region_extractor=regions,
                    attribute_extractor=words, top_k=cfg.top_k, images_root=str(world), dtype="float16",
                    batch_size=16, progress=False, log=log)
        return {"cache": f"{d.name}/cache",
                "summary": _portable({k: v for k, v in vars(s).items() if _jsonable(v)}, d.parent)}
    return run


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def decoder_recipe(model: str, stage: str, seed: int, cfg: DemoConfig):
    """The demo's decoder settings (DecoderTrainConfig) for one stage ("xe" or "scst"): a ``decoder_width`` model,
    ``captions_per_image`` references per image and XE epoch, box geometry with the region features, the summed
    regions added to every word (``region_sum``), 2 SCST samples per image with the greedy baseline."""
    from glied.pipeline.train import DecoderTrainConfig

    return DecoderTrainConfig(model=model, stage=stage, epochs=cfg.xe_epochs if stage == "xe" else 0,
                              scst_epochs=cfg.scst_epochs if stage == "scst" else 0, batch_size=cfg.batch_size,
                              seed=seed, d_model=cfg.decoder_width,
                              d_embed=cfg.decoder_width // 2, lr=1e-3, warmup_steps=100,
                              captions_per_image=cfg.captions_per_image, scst_samples=2,
                              box_geometry=cfg.box_geometry, box_fourier=cfg.box_fourier, coverage=cfg.coverage,
                              region_sum=cfg.region_sum, layers=cfg.decoder_layers)


def _decoder_stage(prep: Path, cache: Path, model: str, stage: str, seed: int, cfg: DemoConfig,
                   log, init: Path | None = None) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.train import train

        tc = decoder_recipe(model, stage, seed, cfg)
        s = train(prep, cache, d, tc, init=str(init) if init else None, log=log, resume=(d / "last.pt").exists())
        return {"run": d.name, "best_val_cider": s.get("best_val_cider")}
    return run


def _eval_stage(prep: Path, cache: Path, runs: dict[str, list[Path]], cfg: DemoConfig, log
                ) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.evaluate import evaluate

        table = {}
        for name, seed_runs in runs.items():
            per_seed = []
            for r in seed_runs:
                res = evaluate(r, cache, prep, split="test", beam_size=cfg.beam_size,
                               out=d / f"{name.replace(' ', '_')}_{r.name}", log=log)
                per_seed.append(res["metrics"])
            table[name] = per_seed
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
        return _portable(evaluate_retrieval(d / "vse", cache, prep, "test", "all", log=log), d.parent)
    return run


def _captions_stage(bundle: Path, world: Path, cfg: DemoConfig, log) -> Callable[[Path], dict]:
    def run(d: Path) -> dict:
        from glied.pipeline.caption import Captioner, save_picture
        from glied.pipeline.naming import naming_accuracy, scene_objects

        captioner = Captioner.from_bundle(bundle)
        tests = [im for im in json.loads((world / "captions.json").read_text())["images"] if im["split"] == "test"]
        objects = scene_objects(world)
        root = d.parent
        shown = []
        for im in tests[: cfg.pictures]:
            path = world / im["filepath"] / im["filename"]
            r = captioner.caption_files([str(path)], with_attention=True)[0]
            pic = d / f"{Path(im['filename']).stem}.png"
            save_picture(r, captioner, pic)
            shown.append({"photo": _rel(path, root), "caption": r.caption, "picture": _rel(pic, root),
                          "objects": [f"{c} {s}" for s, c in objects[im["cocoid"]]],
                          "references": [s["raw"] for s in im["sentences"][:2]]})
            log(f"  {im['filename']}: {r.caption}")
        unseen = d / "unseen_world"
        make_shapes_world(unseen, cfg.unseen_images, seed=cfg.unseen_seed, size=cfg.size)
        naming = naming_accuracy(captioner, unseen, out=d / "unseen_captions.json")
        return {"pictures": shown, "unseen": naming, "unseen_world": _rel(unseen, root),
                "unseen_captions": _rel(d / "unseen_captions.json", root)}
    return run


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; prints the metrics table and per-stage times; returns {stage: result}."""
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    runner = StageRunner(out, log)
    quiet = lambda s: None  # noqa: E731  (stage internals log to their own files; the demo prints summaries)
    from glied.datasets.shapes.world import FORMAT_VERSION
    world = out / runner.run("world", {"images": cfg.images, "seed": cfg.seed, "size": cfg.size,
                                       "format": FORMAT_VERSION},
                             lambda d: {**make_shapes_world(d, cfg.images, seed=cfg.seed, size=cfg.size),
                                        "out": d.name})["out"]
    prep = out / "prep"
    runner.run("prep", {"max_length": cfg.max_length, "count_threshold": cfg.count_threshold},
               lambda d: prepare_captions(world / "captions.json", d, cfg.count_threshold, cfg.max_length)["counts"],
               after=("world",))
    det = out / runner.run("detector", {"epochs": cfg.detector_epochs, "input": cfg.detector_input,
                                        "lr": cfg.detector_lr, **detector_overrides(cfg)},
                           _detector_stage(world, cfg, quiet), after=("world",))["run"]
    det_eval = runner.run("detector_eval", {}, _detector_eval_stage(world, str(det), quiet), after=("detector",))
    mil = out / runner.run("attributes", {"epochs": cfg.attribute_epochs, "init_from": "detector"},
                           _attributes_stage(prep, str(det), cfg, quiet), after=("prep", "detector"))["run"]
    mil_eval = runner.run("attributes_eval", {"top_k": cfg.top_k},
                          _attributes_eval_stage(prep, str(mil), cfg, quiet), after=("attributes",))
    cache = out / runner.run("features", {"top_k": cfg.top_k}, _features_stage(world, str(det), str(mil), cfg, quiet),
                             after=("detector", "attributes"))["cache"]
    retrieval = runner.run("retrieval", {"epochs": 3}, _retrieval_stage(prep, str(cache), quiet),
                           after=("prep", "features"))
    recipe = {"batch": cfg.batch_size, "captions_per_image": cfg.captions_per_image,
              "box_geometry": cfg.box_geometry, "width": cfg.decoder_width, "region_sum": cfg.region_sum,
              "layers": cfg.decoder_layers, "box_fourier": cfg.box_fourier,
              "coverage": cfg.coverage}
    runs: dict[str, list[Path]] = {}
    for model in ("base", "glied"):
        for seed in cfg.decoder_seeds:
            tag = "" if seed == cfg.decoder_seeds[0] else f"_seed{seed}"
            xe = out / runner.run(f"{model}_xe{tag}", {"epochs": cfg.xe_epochs, "seed": seed, **recipe},
                                  _decoder_stage(prep, cache, model, "xe", seed, cfg, quiet),
                                  after=("prep", "features"))["run"]
            scst = out / runner.run(f"{model}_scst{tag}", {"epochs": cfg.scst_epochs, "seed": seed, **recipe},
                                    _decoder_stage(prep, cache, model, "scst", seed, cfg, quiet,
                                                   init=xe),
                                    after=(f"{model}_xe{tag}",))["run"]
            runs.setdefault(f"{model} XE", []).append(xe)
            runs.setdefault(f"{model} SCST", []).append(scst)
    decoders = tuple(r.name for rs in runs.values() for r in rs)
    table = runner.run("eval", {"beam": cfg.beam_size, "runs": decoders},
                       _eval_stage(prep, cache, runs, cfg, quiet), after=decoders)

    def bundle_stage(d: Path) -> dict:
        from glied.pipeline.caption import build_bundle
        b = build_bundle(d / "model", detector=str(det / "checkpoint.pt"), attributes=str(mil),
                         decoder=str(runs["glied SCST"][0]), beam_size=cfg.beam_size)
        return {"bundle": _rel(b, out)}
    bundle = out / runner.run("bundle", {}, bundle_stage, after=(runs["glied SCST"][0].name, "attributes"))["bundle"]
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
    log("")
    log(f"bundle:   {bundle}   (glied caption PHOTO --model {bundle})")
    log(f"pictures: {out / 'captions'}/*.png   unseen-seed captions: {out / caps['unseen_captions']}")
    if caps.get("pictures"):
        ex = caps["pictures"][0]
        log(f"example:  {out / ex['photo']}")
        log(f"  caption:      {ex['caption']}")
        log(f"  ground truth: {', '.join(ex.get('objects', []))}")
        log(f"  reference:    {ex['references'][0]}")
    write_text_atomic(out / "report.txt", report)
    return {name: r.result for name, r in runner.results.items()} | {"config": asdict(cfg)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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
    n_seeds = max((len(v) for v in table.values()), default=1)
    width = 15 if n_seeds > 1 else 9
    lines.append(f"{'decoder':<12}" + "".join(f"{c:>{width}}" for c in cols)
                 + (f"   (mean +- std over {n_seeds} seeds)" if n_seeds > 1 else ""))
    spice = None
    for name, per_seed in table.items():
        per_seed = per_seed if isinstance(per_seed, list) else [per_seed]
        cells = []
        for c in cols:
            vals = [m.get(c) for m in per_seed]
            if all(isinstance(v, (int, float)) for v in vals):
                mu, sd = mean_std(vals)
                cells.append(f"{mu:.3f} +- {sd:.3f}".rjust(width) if n_seeds > 1 else f"{mu:{width}.3f}")
            else:
                spice = spice or next((v for v in vals if isinstance(v, str)), None)
                cells.append(f"{'n/a':>{width}}")
        lines.append(f"{name:<12}" + "".join(cells))
    if spice:
        lines.append(str(spice))
    u = caps.get("unseen", {})
    if u:
        lines.append("")
        lines.append(f"unseen seed {cfg.unseen_seed}, {u.get('images')} photos through the bundle: every object's "
                     f"shape and colour named exactly once in {100 * u.get('all_named', 0):.1f}% of photos "
                     f"(objects named: {100 * u.get('objects_named', 0):.1f}%)")
        err = u.get("errors", {})
        by_n = u.get("by_objects", {})
        lines.append("  by objects per photo: " + ", ".join(f"{n}: {c}/{t}" for n, (c, t) in by_n.items())
                     + f"; errors: {err.get('missed', 0)} missed, {err.get('doubled', 0)} named twice, "
                     f"{err.get('invented', 0)} invented")
    return "\n".join(lines) + "\n"
