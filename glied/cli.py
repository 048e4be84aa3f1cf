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


@cli.command("train-detector")
@click.option("--annotations", required=True, type=click.Path(dir_okay=False),
              help="COCO-format instances.json with per-box attribute_ids.")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False),
              help="Directory the file_name entries are relative to.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoint, logs).")
@click.option("--config", "preset", default="small", show_default=True, help="Model preset.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the training config's).")
@click.option("--batch-size", type=int, default=None, help="Images per step.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (AdamW).")
@click.option("--input-size", type=int, default=None, help="Input side in pixels for the small preset.")
@click.option("--split", default="train", show_default=True, help="Training split (train|val|test|all).")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="Karpathy captions.json giving each image's split (when instances.json has none).")
@click.option("--max-images", type=int, default=None, help="Train on the first N images only.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
def train_detector_cmd(annotations, images_dir, out, preset, epochs, batch_size, lr, input_size, split, split_file,
                       max_images, resume, seed, threads) -> None:
    """Train the small bottom-up detector (boxes, classes, attributes) on COCO-format annotations."""
    from glied.pipeline.detector import train_detector

    summary = train_detector(annotations, images_dir, out, preset=preset, epochs=epochs, batch_size=batch_size,
                             lr=lr, resume=resume, seed=seed, split=None if split == "all" else split,
                             split_file=split_file, input_size=input_size, max_images=max_images,
                             threads=threads, log=click.echo)
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
# MIL attribute words: train-attributes, evaluate-attributes (issue 4)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Feature cache: extract, import-features, export-features, merge-caches (issue 5)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# GLIED decoder: train, evaluate (issue 6)
# ---------------------------------------------------------------------------------------------------------


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
