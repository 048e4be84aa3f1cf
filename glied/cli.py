"""The ``glied`` command line: click parses, :mod:`glied.pipeline` does the work.

Keep this module light: torch and the heavy stages are imported inside each command so that
``glied --help`` answers at once. Every user-facing failure is a :class:`glied.errors.GliedError`,
printed as one line by :func:`main` with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import sys

import click

from glied import __version__
from glied.errors import GliedError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glied")
def cli() -> None:
    """glied: raw photos -> bottom-up regions + MIL attribute words -> GLIED captions."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn GliedError into one line on stderr, exit 2."""
    try:
        cli.main(args=argv, prog_name="glied", standalone_mode=False)
    except GliedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


# ---------------------------------------------------------------------------------------------------------
# Data: the synthetic shapes world and dataset preparation (issue 2)
# ---------------------------------------------------------------------------------------------------------


@cli.command("make-shapes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", "n_images", type=int, default=1000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--workers", type=int, default=None, help="Rendering processes (default: CPU count).")
def make_shapes_cmd(out: str, n_images: int, seed: int, size: int, workers: int | None) -> None:
    """Render the synthetic shapes world into OUT: images/, instances.json (COCO), captions.json (Karpathy)."""
    import time

    from glied.pipeline.data import make_shapes_world

    t0 = time.perf_counter()
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
               f"({c['truncated_sentences']} captions truncated to {max_length}) -> {out}")


# ---------------------------------------------------------------------------------------------------------
# Bottom-up region detector: train-detector, evaluate-detector (issues 3, 9)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# MIL attribute words: train-attributes, evaluate-attributes (issue 4)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Feature cache: extract, import-features, export-features, merge-caches (issue 5)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# GLIED decoder: train, evaluate (issue 6)
# ---------------------------------------------------------------------------------------------------------

_MODELS = ["glied", "base", "base+gvd", "base+gad", "base+gld"]


@cli.command("train")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data (glied prepare).")
@click.option("--features", required=True, type=click.Path(), help="Feature cache (glied extract).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--stage", type=click.Choice(["xe", "scst", "both"]), default="both", show_default=True,
              help="Cross-entropy, self-critical (needs --init or --resume), or XE then SCST.")
@click.option("--model", type=click.Choice(_MODELS), default="glied", show_default=True,
              help="GLIED, the base model, or base plus one distilling part.")
@click.option("--epochs", type=int, default=15, show_default=True, help="Cross-entropy epochs.")
@click.option("--scst-epochs", type=int, default=10, show_default=True, help="Self-critical epochs.")
@click.option("--batch-size", type=int, default=50, show_default=True, help="Images per step and process.")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Cross-entropy learning rate.")
@click.option("--scst-lr", type=float, default=5e-5, show_default=True, help="Self-critical learning rate.")
@click.option("--warmup-steps", type=int, default=200, show_default=True)
@click.option("--scst-baseline", type=click.Choice(["greedy", "mean"]), default="greedy", show_default=True)
@click.option("--scst-samples", type=int, default=5, show_default=True, help="Samples per image in SCST.")
@click.option("--captions-per-image", type=int, default=None,
              help="XE: captions drawn per image and epoch (default: all of them).")
@click.option("--d-model", type=int, default=512, show_default=True, help="Model width (paper: 512).")
@click.option("--d-embed", type=int, default=256, show_default=True, help="Shared embedding size (paper: 256).")
@click.option("--heads", type=int, default=8, show_default=True, help="Attention heads (paper: 8).")
@click.option("--init", type=click.Path(), default=None, help="Start from this checkpoint's weights.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def train_cmd(data: str, features: str, out: str, stage: str, model: str, epochs: int, scst_epochs: int,
              batch_size: int, lr: float, scst_lr: float, warmup_steps: int, scst_baseline: str,
              scst_samples: int, captions_per_image: int | None, d_model: int, d_embed: int, heads: int,
              init: str | None, resume: bool, seed: int, device: str) -> None:
    """Train the GLIED decoder on cached features: cross-entropy, then SCST with a CIDEr-D reward.

    Runs under `torchrun --nproc_per_node N glied train ...` with DistributedDataParallel.
    """
    from glied.pipeline.train import TrainConfig, train

    cfg = TrainConfig(model=model, stage=stage, epochs=epochs, scst_epochs=scst_epochs, batch_size=batch_size,
                      lr=lr, scst_lr=scst_lr, warmup_steps=warmup_steps, scst_baseline=scst_baseline,
                      scst_samples=scst_samples, captions_per_image=captions_per_image, d_model=d_model, d_embed=d_embed, n_heads=heads, seed=seed)
    s = train(data, features, out, cfg, resume=resume, init=init, device=device, log=click.echo)
    if s.get("rank", 0) == 0:
        click.echo(f"best val CIDEr-D {s['best_val_cider']:.4f}; checkpoints in {out}")


@cli.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(), help="Run directory (best.pt) or .pt file.")
@click.option("--features", required=True, type=click.Path(), help="Feature cache the model was trained on.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--beam", type=int, default=3, show_default=True, help="Beam size (1 = greedy).")
@click.option("--batch-size", type=int, default=50, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to write (default: run dir).")
@click.option("--device", default="cpu", show_default=True)
def evaluate_cmd(checkpoint: str, features: str, data: str, split: str, beam: int, batch_size: int,
                 out: str | None, device: str) -> None:
    """Caption a split, write COCO-format predictions and BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap)."""
    from glied.pipeline.evaluate import evaluate

    r = evaluate(checkpoint, features, data, split, beam_size=beam, batch_size=batch_size, out=out, device=device,
                 log=click.echo)
    click.echo(f"predictions: {r['predictions']}")


# ---------------------------------------------------------------------------------------------------------
# End to end: caption, bundle, demo (issue 7)
# ---------------------------------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--out", default="glied-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every stage's outputs; a second run reuses what exists.")
@click.option("--images", type=int, default=3000, show_default=True, help="Size of the shapes world.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out: str, images: int, seed: int) -> None:
    """The main job: the whole pipeline on the embedded synthetic shapes world."""
    from glied.pipeline.demo import DemoConfig, run_demo

    run_demo(out, DemoConfig(images=images, seed=seed))


if __name__ == "__main__":
    main()
