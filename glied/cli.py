"""The ``glied`` command line: click parses, :mod:`glied.pipeline` does the work.

Keep this module light: torch and the heavy stages are imported inside each command so that
``glied --help`` answers at once. Every user-facing failure is a :class:`glied.errors.GliedError`,
printed as one line by :func:`main` with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import errno
import math
import os
import sys

import click

from glied import __version__
from glied.errors import GliedError
from glied.extractors.mil.config import ARCHS as _MIL_PRESETS
from glied.models.presets import MODEL_PRESETS
from glied.pipeline.detector import PRESETS as _DETECTOR_PRESETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glied")
def cli() -> None:
    """glied: raw photos -> bottom-up regions + MIL attribute words -> GLIED captions."""


class _PositiveFloat(click.ParamType):
    """A finite number > 0 (click's FloatRange lets nan through)."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(v) and v > 0):
            self.fail(f"{value} is not a positive finite number", param, ctx)
        return v


POSITIVE = _PositiveFloat()


def _device(ctx, param, value: str) -> str:
    """--device callback: 'cuda' on a machine without CUDA is one line naming the fix, not a traceback."""
    from glied.pipeline.extract import resolve_device

    return resolve_device(value)


def omp_wait_policy(environ, load1: float | None, cores: int) -> str:
    """How torch's OpenMP threads wait between parallel regions: the user's ``OMP_WAIT_POLICY`` when set;
    else ACTIVE (spinning) on an idle machine running one glied process, PASSIVE (sleeping) when other work
    holds the CPU (1-minute load average >= half the cores) or torchrun starts several processes
    (WORLD_SIZE > 1). Measured on 2 cores: spinning threads made the demo's stages 1.4-1.7x faster on an idle
    machine, but decoding 5x slower on a shared one (docs/architecture.md, "Threads")."""
    if environ.get("OMP_WAIT_POLICY"):
        return environ["OMP_WAIT_POLICY"]
    try:
        world = int(environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    if world > 1 or load1 is None or load1 >= 0.5 * max(cores, 1):
        return "PASSIVE"
    return "ACTIVE"


def set_omp_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY`` in this process's environment by :func:`omp_wait_policy` for this machine now;
    it takes effect only when torch has not been imported yet. Returns the policy."""
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):       # no load average on this platform
        load1 = None
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy(os.environ, load1, os.cpu_count() or 1)
    return os.environ["OMP_WAIT_POLICY"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn GliedError into one line on stderr, exit 2."""
    set_omp_wait_policy()       # torch is imported inside the commands, after this, so the policy takes effect
    try:
        cli.main(args=argv, prog_name="glied", standalone_mode=False)
    except GliedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:          # a bad flag value: one line too, naming the help to read
        cmd = e.ctx.command_path if e.ctx is not None else "glied"
        click.echo(f"error: {e.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:                   # disk full, read-only folder, permissions: the environment's fault
        where = f"{e.filename}: " if e.filename else ""
        hint = ("; free some space and run the same command again (finished work is kept)"
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
        click.echo(f"error: {where}{e.strerror or e}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


def _given(renames: dict | None = None) -> set[str]:
    """Names of the current command's options typed on the command line (not defaults); ``renames`` maps a
    setting name to its parameter name where they differ."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    typed = {n for n in ctx.params if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}
    back = {v: k for k, v in (renames or {}).items()}
    return {back.get(n, n) for n in typed}


def _one_of(name: str, value, old_name: str, old_value, default=None):
    """An option and its hidden old name: the one given (both: a usage error), else ``default`` (None: the
    option is required)."""
    if value is not None and old_value is not None:
        raise click.UsageError(f"{old_name} is the old name of {name}; give only {name}")
    if value is None and old_value is None and default is None:
        raise click.UsageError(f"Missing option '{name}'.")
    return next(v for v in (value, old_value, default) if v is not None)


# ---------------------------------------------------------------------------------------------------------
# Data: the synthetic shapes world and dataset preparation
# ---------------------------------------------------------------------------------------------------------


@cli.command("make-shapes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--count", "n_images", type=int, default=None, help="Number of images (default 1000).")
@click.option("--images", "n_images_old", type=int, default=None, hidden=True)  # the old name of --count
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--workers", type=int, default=None, help="Rendering processes (default: CPU count).")
def make_shapes_cmd(out: str, n_images: int | None, n_images_old: int | None, seed: int, size: int,
                    workers: int | None) -> None:
    """Render the synthetic shapes world into OUT: images/, instances.json (COCO), captions.json (Karpathy)."""
    import time

    from glied.pipeline.data import make_shapes_world

    t0 = time.perf_counter()
    n_images = _one_of("--count", n_images, "--images", n_images_old, 1000)
    s = make_shapes_world(out, n_images, seed=seed, size=size, workers=workers)
    sp = s["splits"]
    click.echo(f"wrote {s['images']} images ({s['objects']} objects; train {sp['train']}, val {sp['val']}, "
               f"test {sp['test']}) to {out} in {time.perf_counter() - t0:.1f} s")


@cli.command("prepare")
@click.argument("captions_json", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--count-threshold", type=int, default=5, show_default=True,
              help="Keep words seen more than this many times in the training split.")
@click.option("--max-length", type=int, default=16, show_default=True, help="Truncate captions to this.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Folder that the json's filepath/filename resolve against (default: the json's folder).")
def prepare_cmd(captions_json: str, out: str, count_threshold: int, max_length: int,
                images_root: str | None) -> None:
    """Prepare a Karpathy-format CAPTIONS_JSON (COCO, Flickr30k, shapes) for training."""
    from glied.pipeline.data import prepare_captions

    m = prepare_captions(captions_json, out, count_threshold, max_length, images_root)
    c = m["counts"]
    click.echo(f"{m['dataset']}: {c['images']['train']} train / {c['images']['val']} val / "
               f"{c['images']['test']} test images, {c['sentences']} captions, vocabulary {c['vocab']} "
               f"({c['truncated_sentences']} captions truncated to {max_length}"
               + (f"; {c['empty_sentences_skipped']} empty captions skipped" if c.get("empty_sentences_skipped")
                  else "") + f") -> {out}")


# ---------------------------------------------------------------------------------------------------------
# Bottom-up region detector: train-detector, evaluate-detector
# ---------------------------------------------------------------------------------------------------------


@cli.command("train-detector")
@click.option("--annotations", required=True, type=click.Path(dir_okay=False),
              help="COCO-format instances.json with per-box attribute_ids.")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False),
              help="Directory the file_name entries are relative to.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoint, logs).")
@click.option("--config", "preset", type=click.Choice(_DETECTOR_PRESETS), default="small", show_default=True,
              help="Model preset.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the training config's).")
@click.option("--batch-size", type=int, default=None, help="Images per step.")
@click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate (AdamW).")
@click.option("--input-size", type=int, default=None, help="Input side in pixels for the small preset.")
@click.option("--split", default="train", show_default=True, help="Training split (train|val|test|all).")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="Karpathy captions.json giving each image's split (when instances.json has none).")
@click.option("--max-images", type=int, default=None, help="Train on the first N images only.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out with its stored settings (a conflicting flag is refused).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Forward pass precision (default fp32); auto: bf16 where the CPU has native bf16.")
def train_detector_cmd(annotations, images_dir, out, preset, epochs, batch_size, lr, input_size, split, split_file,
                       max_images, resume, seed, threads, precision) -> None:
    """Train the small bottom-up detector (boxes, classes, attributes) on COCO-format annotations."""
    from glied.pipeline.detector import train_detector

    summary = train_detector(annotations, images_dir, out, preset=preset, epochs=epochs, batch_size=batch_size,
                             lr=lr, resume=resume, seed=seed, split=None if split == "all" else split,
                             split_file=split_file, input_size=input_size, max_images=max_images,
                             threads=threads, overrides={"precision": precision} if precision else None,
                             log=click.echo)
    click.echo(f"trained {summary['iterations']} iterations on {summary['images']} images in "
               f"{summary['seconds']} s; checkpoint in {summary['run']}")


@cli.command("evaluate-detector")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory or checkpoint file.")
@click.option("--annotations", required=True, type=click.Path(dir_okay=False))
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="Split to evaluate (train|val|test|all).")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="Karpathy captions.json giving each image's split (when instances.json has none).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-images", type=int, default=None, help="Evaluate the first N images only.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
def evaluate_detector_cmd(run_dir, annotations, images_dir, split, split_file, batch_size, max_images,
                          threads) -> None:
    """Box mAP@0.5 (COCOeval) and attribute accuracy of a trained detector; writes RUN/metrics_<split>.json."""
    from glied.pipeline.detector import evaluate_detector_run

    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    evaluate_detector_run(run_dir, annotations, images_dir, split=None if split == "all" else split,
                          split_file=split_file, batch_size=batch_size, max_images=max_images, log=click.echo)


# ---------------------------------------------------------------------------------------------------------
# MIL attribute words: train-attributes, evaluate-attributes
# ---------------------------------------------------------------------------------------------------------


@cli.command("train-attributes")
@click.option("--data", required=True, type=click.Path(), help="Prepared data folder (glied prepare --out).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--images", type=click.Path(), default=None,
              help="Image folder (default: the prepared data's images_root).")
@click.option("--config", "config", type=click.Choice(_MIL_PRESETS), default=None,
              help="Model preset (default: small, the shapes world; bottomup with --init-from).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs (default per preset: small 8, bottomup 2).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step (small: 8).")
@click.option("--lr", type=POSITIVE, default=None, help="Adam learning rate (small: 1e-3, ResNets: 1e-4).")
@click.option("--vocab-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="K: the most frequent training-caption words kept.")
@click.option("--input-size", type=click.IntRange(min=32), default=None,
              help="Network input side (small: 64, ResNets: 565).")
@click.option("--stopwords/--no-stopwords", default=False, show_default=True,
              help="Drop English function words from the vocabulary (Fang keeps them).")
@click.option("--empty-labels", "empty_policy", type=click.Choice(["keep", "drop"]), default="keep",
              show_default=True, help="Images whose captions have no vocabulary word: all-negative, or dropped.")
@click.option("--backbone-weights", type=click.Path(), default=None,
              help="Local torchvision ResNet state dict to initialise the trunk (nothing is downloaded).")
@click.option("--init-from", "init_from", type=click.Path(), default=None, metavar="DETECTOR",
              help="Use a detector's trunk (res1-res4) as the MIL trunk: the published bottom-up .pkl or a "
                   "train-detector run folder.")
@click.option("--freeze-stages", type=click.IntRange(0, 5), default=None,
              help="With --init-from: trunk stages kept fixed (1 stem, 2 +res2, 3 +res3, 4 +res4, 5 +res5; "
                   "default 4).")
@click.option("--res5/--no-res5", default=None,
              help="With --init-from: the trunk also runs the detector's res5 over the whole map (default: on).")
@click.option("--trunk-lr-mult", type=click.FloatRange(min=0), default=None,
              help="With --init-from: the trunk's learning rate relative to the head's (default 0.1).")
@click.option("--global-context/--no-global-context", default=None,
              help="Each cell's word logits also see the mean feature of the whole map (scene-level words; "
                   "default: on with --init-from).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt with its stored settings (a conflicting flag is "
                   "refused; --epochs may be raised).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's; 1 is fastest for the small model on a busy machine).")
def train_attributes_cmd(data, out, images, config, epochs, batch_size, lr, vocab_size, input_size, stopwords,
                         empty_policy, backbone_weights, init_from, freeze_stages, trunk_lr_mult, res5,
                         global_context, resume, seed, device, threads) -> None:
    """Train the MIL attribute-word detector (Fang et al. 2015) from the captions of prepared data."""
    from glied.pipeline.attributes import train_attributes

    if threads:
        import torch
        torch.set_num_threads(threads)

    typed = _given()   # untyped settings: the preset's defaults, or the run's own on --resume
    settings = dict(config=config, epochs=epochs, batch_size=batch_size, lr=lr, vocab_size=vocab_size,
                    input_size=input_size, stopwords=stopwords, empty_policy=empty_policy, seed=seed,
                    freeze_stages=freeze_stages, trunk_lr_mult=trunk_lr_mult, res5=res5,
                    global_context=global_context)
    s = train_attributes(data, out, images=images, resume=resume, backbone_weights=backbone_weights,
                         init_from=init_from, device=device, log=click.echo,
                         **{k: (v if k in typed else None) for k, v in settings.items()})
    val = f", val mAP {s['val_mAP']:.4f}" if s.get("val_mAP") is not None else ""
    click.echo(f"trained {s['epochs']} epochs in {s['seconds_this_run']:.1f} s (loss {s['final_loss']:.4f}{val}) "
               f"-> {out}/model.pt")


@cli.command("evaluate-attributes")
@click.option("--run", required=True, type=click.Path(), help="Run folder (or model.pt) of train-attributes.")
@click.option("--data", required=True, type=click.Path(), help="Prepared data folder.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--top-k", "top_ks", type=click.IntRange(min=1), multiple=True,
              help="Cut(s) for precision/recall; repeatable (default 5, 10, 50).")
@click.option("--images", type=click.Path(), default=None, help="Image folder (default: prepared images_root).")
@click.option("--words", type=click.Path(), default=None,
              help="Also report the mAP over these words (one per line, or a json list).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Metrics json (default RUN/metrics_<split>.json).")
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
def evaluate_attributes_cmd(run, data, split, top_ks, images, words, out, device, threads) -> None:
    """Per-word AP, mAP and precision/recall at top-k of a MIL run on a held-out split."""
    from glied.pipeline.attributes import evaluate_attributes

    if threads:
        import torch
        torch.set_num_threads(threads)

    m = evaluate_attributes(run, data, split=split, top_ks=top_ks or (5, 10, 50), images=images, words=words,
                            out=out, device=device, log=click.echo)
    click.echo(f"{split}: {m['n_images']} images, {m['n_words_evaluated']} words with positives, "
               f"mAP {m['mAP']:.4f}")
    for name, sub in m["subsets"].items():
        click.echo(f"  {name}: mAP {sub['mAP']:.4f} over {sub['n_words']} words")
    for k, pr in m["at_k"].items():
        click.echo(f"  top-{k}: precision {pr['precision']:.4f}, recall {pr['recall']:.4f}")
    click.echo(f"  {1000 * m['seconds_per_image']:.1f} ms per image (model only) -> {m['written_to']}")


# ---------------------------------------------------------------------------------------------------------
# Feature cache: extract, import-features, export-features, merge-caches
# ---------------------------------------------------------------------------------------------------------


@cli.command("extract")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Feature cache folder (created or resumed).")
@click.option("--detector", default=None, help="Bottom-up weights file or train-detector run folder.")
@click.option("--extractor-module", default=None, metavar="MOD:FACTORY",
              help="Use factory(weights=, device=, precision=) from 'pkg.mod:factory' or 'file.py:factory' "
                   "as the region extractor (your own model; also the tests' hook).")
@click.option("--attributes", default=None, help="MIL attribute-word run or checkpoint (optional).")
@click.option("--top-k", type=int, default=None, help="Attribute words kept per image (default: the run's).")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Folder that the paths in a json or list INPUT are relative to.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes (0: decode in this process).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 where the CPU/GPU has it natively, fp16 on older tensor-core GPUs, else fp32.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the features in the cache.")
@click.option("--shard", default=None, metavar="I/N", help="Only the images of shard I of N (0-based).")
@click.option("--boxes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Extract at given boxes: COCO annotations json or {image_id: [[x1,y1,x2,y2], ...]}.")
@click.option("--max-side", type=int, default=None,
              help="Downscale larger photos to this long side before the model (default 2000; 0: never). "
                   "Recorded in the cache; `glied caption` uses the same cap.")
@click.option("--commit-seconds", type=float, default=2.0, show_default=True,
              help="Make finished entries durable (fsync) at least this often.")
@click.option("--keep-word-maps", is_flag=True, help="Also store the attribute words' per-cell maps (large).")
@click.option("--quiet", is_flag=True, help="No progress bar and no precision line.")
def extract_cmd(input_path, out, detector, extractor_module, attributes, top_k, images_root, batch_size,
                workers, device, precision, dtype, shard, boxes, max_side, commit_seconds, keep_word_maps,
                quiet) -> None:
    """Extract region features (+ attribute words) of every image of INPUT into the cache OUT.

    INPUT: a folder (recursive), a text file listing paths, a Karpathy or COCO json, or a prepared folder.
    Resumable: images already in OUT are skipped; bad images are listed in OUT/failures.jsonl.
    Several processes or GPUs: `torchrun --nproc_per_node N -m glied extract INPUT --out OUT ...` (each rank
    extracts its shard into OUT/ranks/, rank 0 merges them into OUT at the end).
    """
    from glied.datasets.images import DEFAULT_MAX_SIDE, check_max_side
    from glied.datasets.inputs import parse_shard
    from glied.errors import ConfigError
    from glied.extractors import load_extractors
    from glied.pipeline.extract import choose_precision, extract, resolve_device, say_precision
    from glied.pipeline.extract_ranks import distributed_env, extract_ranks, rank_device

    ranks = distributed_env()            # under torchrun: (rank, world, local rank); each rank takes its shard
    if ranks is not None and shard:
        raise ConfigError(f"--shard {shard}: under torchrun each of the {ranks[1]} ranks takes its own shard; "
                          f"drop --shard (or run without torchrun)")
    sh = parse_shard(shard)
    max_side = check_max_side(DEFAULT_MAX_SIDE if max_side is None else max_side)
    dev = resolve_device(device)
    if ranks is not None:
        dev = rank_device(dev, ranks[2])
    prec = choose_precision(precision, dev)
    region, attr = load_extractors(detector, attributes, extractor_module=extractor_module, device=dev,
                                   precision=prec.precision, top_k=top_k)
    say_precision(prec, quiet=quiet or (ranks is not None and ranks[0] != 0))
    common = dict(region_extractor=region, attribute_extractor=attr, top_k=top_k, images_root=images_root,
                  dtype=dtype, batch_size=batch_size, workers=workers, boxes=boxes, max_side=max_side,
                  progress=not quiet, commit_seconds=commit_seconds, keep_word_maps=keep_word_maps)
    s = (extract(input_path, out, shard=sh, **common) if ranks is None
         else extract_ranks(input_path, out, device=dev, **common))
    if ranks is not None and ranks[0] != 0:
        return
    click.echo(f"extracted {s.extracted} images in {s.seconds:.1f} s ({s.images_per_s:.2f} images/s); "
               f"{s.already} already in {out}; {s.failed} failed"
               + (f" (listed in {s.failures_path})" if s.failed else ""))


@cli.command("merge-caches")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def merge_caches_cmd(out, inputs) -> None:
    """Join the shard caches INPUTS into OUT (their identities must match)."""
    from glied.pipeline.features_io import merge_caches

    n, dup = merge_caches(out, list(inputs))
    click.echo(f"merged {n} entries into {out}" + (f" ({dup} duplicate ids skipped)" if dup else ""))


@cli.command("verify-cache")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Drop the damaged entries, so that `glied extract` re-extracts them.")
def verify_cache_cmd(cache, repair) -> None:
    """Check every entry of CACHE against its checksums; list the damaged ids (exit 1 if any, unless --repair)."""
    from glied.pipeline.features_io import verify_cache

    n, bad = verify_cache(cache, repair=repair)
    for k, why in bad.items():
        click.echo(f"damaged\t{k}\t{why}")
    if not bad:
        click.echo(f"{cache}: all {n} entries intact")
    elif repair:
        click.echo(f"{cache}: dropped {len(bad)} damaged entries, {n} intact kept; `glied extract ... --out "
                   f"{cache}` extracts the dropped images again")
    else:
        click.echo(f"{cache}: {len(bad)} damaged entries, {n} intact; run `glied verify-cache {cache} --repair`",
                   err=True)
        sys.exit(1)


@cli.command("import-features")
@click.argument("src", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Feature cache folder to create.")
@click.option("--box-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="ImageCaptioning layout: folder of <id>.npy boxes beside the <id>.npz features.")
@click.option("--name", default=None, help="Extractor name to record (default: from the source format).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
def import_features_cmd(src, out, box_dir, name, dtype) -> None:
    """Import bottom-up TSV files or per-image npz folders into a feature cache.

    SRC: a .tsv file, the stem of a multipart release (x.tsv for x.tsv.0, x.tsv.1, ...), or a folder of npz.
    """
    from glied.pipeline.features_io import import_features

    n = import_features(list(src), out, box_dir=box_dir, name=name, dtype=dtype)
    click.echo(f"imported {n} images into {out}")


@cli.command("export-features")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TSV file to write.")
def export_features_cmd(cache, out) -> None:
    """Write a feature cache as a bottom-up TSV (image_id, image_w, image_h, num_boxes, boxes, features)."""
    from glied.pipeline.features_io import export_tsv

    n = export_tsv(cache, out)
    click.echo(f"wrote {n} images to {out}")


# ---------------------------------------------------------------------------------------------------------
# GLIED decoder: train, evaluate
# ---------------------------------------------------------------------------------------------------------

_MODELS = list(MODEL_PRESETS)


@cli.command("train")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data (glied prepare).")
@click.option("--features", required=True, type=click.Path(), help="Feature cache (glied extract).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--stage", type=click.Choice(["xe", "scst", "both"]), default="both", show_default=True,
              help="Cross-entropy, self-critical (needs --init or --resume), or XE then SCST.")
@click.option("--config", "model", type=click.Choice(_MODELS), default="glied", show_default=True,
              help="Model preset: GLIED, the base model, or base plus one distilling part.")
@click.option("--model", "model_old", type=click.Choice(_MODELS), default=None, hidden=True)  # old name of --config
@click.option("--epochs", type=click.IntRange(min=0), default=15, show_default=True, help="Cross-entropy epochs.")
@click.option("--scst-epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Self-critical epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True,
              help="Images per step and process.")
@click.option("--lr", type=POSITIVE, default=5e-4, show_default=True, help="Cross-entropy learning rate.")
@click.option("--scst-lr", type=POSITIVE, default=5e-5, show_default=True, help="Self-critical learning rate.")
@click.option("--warmup-steps", type=int, default=200, show_default=True)
@click.option("--scst-baseline", type=click.Choice(["greedy", "mean"]), default="greedy", show_default=True)
@click.option("--scst-samples", type=int, default=5, show_default=True, help="Samples per image in SCST.")
@click.option("--captions-per-image", type=int, default=None,
              help="XE: captions drawn per image and epoch (default: all of them).")
@click.option("--d-model", type=int, default=512, show_default=True, help="Model width (paper: 512).")
@click.option("--d-embed", type=int, default=256, show_default=True, help="Shared embedding size (paper: 256).")
@click.option("--heads", type=int, default=8, show_default=True, help="Attention heads (paper: 8).")
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decoder passes; 2 lets each step see where earlier steps looked (docs/architecture.md).")
@click.option("--region-sum", is_flag=True,
              help="Add the summed region vectors to every input word, so the decoder can count objects.")
@click.option("--coverage", is_flag=True,
              help="Mark the regions the caption has named so far in the region attentions (docs/architecture.md).")
@click.option("--box-geometry", is_flag=True, help="Give the decoder each region's box position and size.")
@click.option("--box-fourier", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --box-geometry: also encode box centres and sizes as sin/cos at N frequencies.")
@click.option("--init", type=click.Path(), default=None, help="Start from this checkpoint's weights.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.", callback=_device)
def train_cmd(data: str, features: str, out: str, stage: str, model: str, model_old: str | None, epochs: int,
              scst_epochs: int,
              batch_size: int, lr: float, scst_lr: float, warmup_steps: int, scst_baseline: str,
              scst_samples: int, captions_per_image: int | None, d_model: int, d_embed: int, heads: int,
              layers: int, region_sum: bool, coverage: bool, box_geometry: bool, box_fourier: int, init: str | None,
              resume: bool, seed: int, device: str) -> None:
    """Train the GLIED decoder on cached features: cross-entropy, then SCST with a CIDEr-D reward.

    Runs under `torchrun --nproc_per_node N glied train ...` with DistributedDataParallel.
    """
    from glied.pipeline.train import train

    model = _one_of("--config", None if model_old is not None else model, "--model", model_old, model)
    settings = dict(model=model, stage=stage, epochs=epochs, scst_epochs=scst_epochs, batch_size=batch_size,
                    lr=lr, scst_lr=scst_lr, warmup_steps=warmup_steps, scst_baseline=scst_baseline,
                    scst_samples=scst_samples, captions_per_image=captions_per_image, d_model=d_model,
                    d_embed=d_embed, n_heads=heads, layers=layers, region_sum=region_sum, seed=seed,
                    box_geometry=box_geometry, box_fourier=box_fourier, coverage=coverage)
    # only the settings typed on the command line: the others are the defaults, or the run's own on --resume
    given = _given({"n_heads": "heads"}) | ({"model"} if model_old is not None else set())
    s = train(data, features, out, {k: v for k, v in settings.items() if k in given}, resume=resume, init=init,
              device=device, log=click.echo)
    if s.get("rank", 0) == 0:
        click.echo(f"best val CIDEr-D {s['best_val_cider']:.4f}; checkpoints in {out}")


@cli.command("evaluate")
@click.option("--run", "checkpoint", type=click.Path(), default=None,
              help="Run folder of `glied train` (its best.pt) or a .pt file.  [required]")
@click.option("--checkpoint", "checkpoint_old", type=click.Path(), default=None, hidden=True)  # old name of --run
@click.option("--features", required=True, type=click.Path(), help="Feature cache the model was trained on.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--beam", type=click.IntRange(min=1), default=3, show_default=True, help="Beam size (1 = greedy).")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to write (default: run dir).")
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--decode-precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="Precision of the decoder's large GEMMs; auto: bf16 where the CPU/GPU has it natively "
                   "(faster at batch 50 and beams; scores change by rounding).")
def evaluate_cmd(checkpoint: str | None, checkpoint_old: str | None, features: str, data: str, split: str,
                 beam: int, batch_size: int, out: str | None, device: str, decode_precision: str) -> None:
    """Caption a split, write COCO-format predictions and BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap)."""
    from glied.pipeline.evaluate import evaluate

    checkpoint = _one_of("--run", checkpoint, "--checkpoint", checkpoint_old)

    r = evaluate(checkpoint, features, data, split, beam_size=beam, batch_size=batch_size, out=out, device=device,
                 decode_precision=decode_precision, log=click.echo)
    click.echo(f"predictions: {r['predictions']}")


# ---------------------------------------------------------------------------------------------------------
# End to end: caption, bundle, demo
# ---------------------------------------------------------------------------------------------------------


@cli.command("caption")
@click.argument("photos", nargs=-1, required=True)
@click.option("--model", "bundle", required=True, type=click.Path(), help="A model bundle (`glied bundle`).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per photo (for tools).")
@click.option("--show", type=click.Path(dir_okay=False), default=None,
              help="Write a picture of what the model saw (with several photos: OUT_<photo>.png each).")
@click.option("--beam", type=click.IntRange(min=1), default=None, help="Beam size (default: the bundle's, 3).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Detector precision; auto: bf16 where the CPU/GPU has it natively, else fp32 (the decoder "
                   "works on either: they differ by rounding).")
def caption_cmd(photos: tuple[str, ...], bundle: str, as_json: bool, show: str | None, beam: int | None,
                batch_size: int, device: str, precision: str | None) -> None:
    """Caption PHOTOS (files or folders) with a model bundle, in one process."""
    import json
    import os

    from glied.pipeline.caption import Captioner, expand_inputs, save_picture
    from glied.pipeline.extract import choose_precision, resolve_device, say_precision

    if show and not os.path.isdir(os.path.dirname(os.path.abspath(show))):
        raise GliedError(f"--show {show}: the folder {os.path.dirname(os.path.abspath(show))} does not exist")
    files = expand_inputs(photos)
    if not files:
        raise GliedError(f"no image files in {' '.join(photos)}")
    dev = resolve_device(device)
    prec = choose_precision(precision, dev)
    captioner = Captioner.from_bundle(bundle, device=dev, precision=prec.precision, beam_size=beam)
    say_precision(prec)
    failed = 0

    def emit(r) -> None:
        nonlocal failed
        if r.error:
            failed += 1
            click.echo(f"error: {r.path}: {r.error}", err=True)
        if as_json:
            click.echo(json.dumps(r.to_json(captioner.word_extractor.vocab, captioner.region_extractor.classes)))
        elif not r.error:
            click.echo(f"{r.path}\t{r.caption}" if len(files) > 1 else r.caption)
        if show and not r.error:
            target = show if len(files) == 1 else f"{os.path.splitext(show)[0]}_{os.path.splitext(os.path.basename(r.path))[0]}.png"
            save_picture(r, captioner, target)

    captioner.caption_files(files, batch_size=batch_size, with_attention=bool(show), on_result=emit)
    if failed:
        raise GliedError(f"{failed} of {len(files)} photos could not be captioned (see the lines above)")


@cli.command("bundle")
@click.option("--detector", required=True, type=click.Path(exists=True), help="`glied train-detector` run or .pt.")
@click.option("--attributes", required=True, type=click.Path(exists=True), help="`glied train-attributes` run.")
@click.option("--decoder", required=True, type=click.Path(exists=True), help="`glied train` run or .pt.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--beam", type=click.IntRange(min=1), default=3, show_default=True,
              help="Default beam size for captioning.")
def bundle_cmd(detector: str, attributes: str, decoder: str, out: str, beam: int) -> None:
    """Put a detector, an attribute detector and a decoder that belong together into one bundle."""
    from glied.pipeline.caption import build_bundle

    path = build_bundle(out, detector=detector, attributes=attributes, decoder=decoder, beam_size=beam)
    click.echo(f"wrote bundle {path}")


@cli.command("demo")
@click.option("--out", default="glied-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every stage's outputs; a second run reuses what exists.")
@click.option("--count", "images", type=int, default=None,
              help="Size of the shapes world (default: DemoConfig.images).")
@click.option("--images", "images_old", type=int, default=None, hidden=True)  # the old name of --count
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--decoder-seeds", type=click.IntRange(1, 10), default=1, show_default=True,
              help="Train each decoder with this many seeds; the table gives mean +- std.")
def demo_cmd(out: str, images: int | None, images_old: int | None, seed: int, decoder_seeds: int) -> None:
    """The main job: the whole pipeline on the embedded synthetic shapes world."""
    from glied.pipeline.demo import DemoConfig, run_demo

    images = _one_of("--count", images, "--images", images_old, DemoConfig.images)
    run_demo(out, DemoConfig(images=images, seed=seed, decoder_seeds=tuple(range(seed, seed + decoder_seeds))))


# ---------------------------------------------------------------------------------------------------------
# Image-sentence retrieval: train-retrieval, evaluate-retrieval, index, search
# ---------------------------------------------------------------------------------------------------------


@cli.command("train-retrieval")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data (glied prepare).")
@click.option("--features", required=True, type=click.Path(), help="Feature cache (glied extract).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--model", type=click.Choice(["vse", "teran"]), default="vse", show_default=True,
              help="vse: one vector per image and sentence (fast search); teran: region-word alignment.")
@click.option("--text-encoder", default="gru", show_default=True,
              help="gru (trained from scratch, offline) or a local BERT-family model folder (glied[bert]).")
@click.option("--preset", type=click.Choice(["paper", "small"]), default="paper", show_default=True,
              help="Model sizes: the paper's, or small ones for the shapes world.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: vse 25, teran 30).")
@click.option("--batch-size", type=int, default=None, help="Image-sentence pairs per step (vse 128, teran 40).")
@click.option("--lr", type=float, default=None, help="Learning rate (vse 5e-4, teran 2e-4).")
@click.option("--lr-decay-epoch", type=int, default=None, help="lr x0.1 from this epoch (vse 15, teran 20).")
@click.option("--warmup-epochs", type=int, default=None,
              help="Epochs over all negatives before the hardest negative (vse 1, teran 0).")
@click.option("--embed-dim", type=int, default=None, help="Joint-space size (default: the preset's).")
@click.option("--boxes", is_flag=True, help="vse: also feed each region's normalised box (as teran does).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def train_retrieval_cmd(data, features, out, model, text_encoder, preset, epochs, batch_size, lr, lr_decay_epoch,
                        warmup_epochs, embed_dim, boxes, resume, seed, device) -> None:
    """Train an image-sentence retrieval model on cached region features."""
    from glied.pipeline.retrieval import train_retrieval

    settings = dict(model=model, preset=preset, text_encoder=text_encoder, epochs=epochs, batch_size=batch_size,
                    lr=lr, lr_decay_epoch=lr_decay_epoch, warmup_epochs=warmup_epochs, embed_dim=embed_dim,
                    boxes=boxes, seed=seed)
    # only the settings typed on the command line: the others are the defaults, or the run's own on --resume
    given = _given()
    s = train_retrieval(data, features, out, {k: v for k, v in settings.items() if k in given}, resume=resume,
                        device=device, log=click.echo)
    click.echo(f"best val rsum {s['best_val_rsum']:.1f} after {s['epochs']} epochs ({s['seconds']} s); run in {out}")


@cli.command("evaluate-retrieval")
@click.option("--run", required=True, type=click.Path(), help="train-retrieval run folder or .pt file.")
@click.option("--features", required=True, type=click.Path(), help="Feature cache the model was trained on.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--protocol", type=click.Choice(["1k", "5k", "all"]), default="all", show_default=True,
              help="1k: mean over folds of 1,000 images (COCO 1K); 5k: first 5,000 images; all: the whole split.")
@click.option("--ndcg", is_flag=True, help="Also NDCG@25 with ROUGE-L relevance (slow on large splits).")
@click.option("--rerank", type=click.Path(), default=None,
              help="A teran run whose alignment re-ranks each query's top --rerank-k.")
@click.option("--rerank-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Metrics JSON (default RUN/retrieval_<split>_<protocol>.json).")
@click.option("--device", default="cpu", show_default=True)
def evaluate_retrieval_cmd(run, features, data, split, protocol, ndcg, rerank, rerank_k, out, device) -> None:
    """R@1/5/10 image->text and text->image, rsum (and NDCG@25) of a retrieval run on a split."""
    from glied.pipeline.retrieval import evaluate_retrieval

    r = evaluate_retrieval(run, features, data, split, protocol, ndcg=ndcg, out=out, device=device,
                           rerank=rerank, rerank_k=rerank_k, log=click.echo)
    click.echo(f"{r['seconds_end_to_end']:.1f} s -> {r['written_to']}")


@cli.command("index")
@click.option("--run", required=True, type=click.Path(), help="train-retrieval run folder or .pt file.")
@click.option("--features", required=True, type=click.Path(), help="Feature cache whose images to index.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Prepared data whose captions to index too (for search --image).")
@click.option("--rerank", type=click.Path(), default=None,
              help="Also store this teran run's region vectors of every image (search --rerank runs faster).")
@click.option("--device", default="cpu", show_default=True)
def index_cmd(run, features, out, data, rerank, device) -> None:
    """Embed every image of a feature cache once (and the prepared captions) into a search index."""
    from glied.pipeline.retrieval import build_index

    s = build_index(run, features, out, data=data, rerank=rerank, device=device)
    click.echo(f"indexed {s['images']} images and {s['captions']} captions in {s['seconds']} s -> {s['index']}")


@cli.command("search")
@click.argument("query", required=False)
@click.option("--index", "index_path", required=True, type=click.Path(), help="Index folder (glied index).")
@click.option("--image", "photo", type=click.Path(), default=None, help="A photo: find captions for it.")
@click.option("--image-id", default=None, help="A cached image (with --features): find captions for it.")
@click.option("--features", type=click.Path(), default=None,
              help="Feature cache holding --image-id (--rerank: the indexed images; default: the index's cache).")
@click.option("--model", "bundle", type=click.Path(), default=None,
              help="Model bundle whose detector extracts the regions of --image.")
@click.option("--detector", type=click.Path(), default=None, help="Or a train-detector run / weights for --image.")
@click.option("--extractor-module", default=None, metavar="MOD:FACTORY", help="Or a region-extractor factory.")
@click.option("--captions", "captions_file", type=click.Path(dir_okay=False), default=None,
              help="Rank these captions (one per line) instead of the index's.")
@click.option("--run", type=click.Path(), default=None, help="Refuse an index built from another run than this.")
@click.option("--rerank", type=click.Path(), default=None,
              help="A teran run whose region-word alignment re-ranks the index's top --rerank-k.")
@click.option("--rerank-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for tools).")
def search_cmd(query, index_path, photo, image_id, features, bundle, detector, extractor_module, captions_file,
               run, rerank, rerank_k, k, as_json) -> None:
    """Text -> images: `glied search --index INDEX "a red circle"`. Image -> captions: --image PHOTO --model
    BUNDLE, or --image-id ID --features CACHE. --rerank TERAN_RUN re-orders the top --rerank-k."""
    import json

    from glied.pipeline import retrieval as rt

    if sum(x is not None for x in (query, photo, image_id)) != 1:
        raise GliedError("search needs exactly one of: a QUERY sentence, --image PHOTO, --image-id ID")
    rt.check_query(query)
    if image_id is not None and features is None:
        raise GliedError("--image-id needs --features CACHE (the cache holding that image)")
    index = rt.Index(index_path)
    if run:
        index.check_run(run)
    second = rt.Reranker(rerank, index, rerank_k, features=features) if rerank else None
    if query is not None:
        hits = (second or index).text_to_images(query, k)
        what = {"query": query}
    else:
        if photo is not None:
            loaded = rt.decode_photo(photo, index.max_side)
            extractor, where = rt.region_extractor_for(bundle, detector, extractor_module)
            index.check_extractor(extractor, where)
            regions = rt.photo_regions(extractor, loaded)
            emb, what = index.embed_photo(regions), {"image": photo}
            emb2 = second.embed_photo(regions) if second else None
        else:
            cache = rt.open_cache(features)
            emb, what = index.embed_cached(cache, image_id), {"image_id": image_id}
            emb2 = second.embed_cached(cache, image_id) if second else None
        hits = (second.image_to_captions(emb, emb2, k, captions_file) if second
                else index.image_to_captions(emb, k, captions_file))
    if second:
        what["rerank"] = {"run": second.path, "k": second.k}
    if as_json:
        click.echo(json.dumps({**what, "results": hits}))
        return
    for h in hits:
        both = f"\t{h['index_score']:.4f}" if second else ""   # the teran score, then the index's own
        click.echo(f"{h['score']:.4f}{both}\t" + (h["image_id"] if "caption" not in h else h["caption"]))


# ---------------------------------------------------------------------------------------------------------
# Serving: a local web page and JSON API (glied.pipeline.serve)
# ---------------------------------------------------------------------------------------------------------


@cli.command("serve")
@click.option("--model", "bundle", required=True, type=click.Path(), help="A model bundle (`glied bundle`).")
@click.option("--index", default=None, type=click.Path(), help="A retrieval index (`glied index`) for search.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--beam", type=click.IntRange(1, 8), default=None, help="Default beam size (default: the bundle's).")
@click.option("--batch-window-ms", type=float, default=10.0, show_default=True,
              help="How long to wait for more photos before captioning a batch.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most photos captioned together (1: no batching).")
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True, help="Largest request accepted.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Detector precision (default: the one the decoder's training features used).")
def serve_cmd(bundle: str, index: str | None, host: str, port: int, beam: int | None, batch_window_ms: float,
              max_batch: int, max_upload_mb: float, device: str, precision: str | None) -> None:
    """Serve a page and a JSON API (POST /caption, POST /search, GET /health) for a model bundle."""
    from glied.pipeline.extract import resolve_device
    from glied.pipeline.serve import ServeConfig, require_serve_extra, serve

    require_serve_extra()
    config = ServeConfig(batch_window_ms=batch_window_ms, max_batch=max_batch, max_upload_mb=max_upload_mb,
                         beam_size=beam)
    serve(bundle, host=host, port=port, index=index, config=config, device=resolve_device(device),
          precision=precision, log=lambda s: click.echo(s, err=s.startswith("warning")))


if __name__ == "__main__":
    main()
