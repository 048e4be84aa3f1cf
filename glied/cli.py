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


@cli.command("train-attributes")
@click.option("--data", required=True, type=click.Path(), help="Prepared data folder (glied prepare --out).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--images", type=click.Path(), default=None,
              help="Image folder (default: the prepared data's images_root).")
@click.option("--config", "config", type=click.Choice(["small", "resnet18", "resnet50", "resnet101"]),
              default="small", show_default=True, help="Model preset (small: the shapes world).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default per preset: small 6).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step (small: 32).")
@click.option("--lr", type=float, default=None, help="Adam learning rate (small: 3e-3, ResNets: 1e-4).")
@click.option("--vocab-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="K: the most frequent training-caption words kept.")
@click.option("--input-size", type=click.IntRange(min=32), default=None,
              help="Network input side (small: 128, ResNets: 565).")
@click.option("--stopwords/--no-stopwords", default=False, show_default=True,
              help="Drop English function words from the vocabulary (Fang keeps them).")
@click.option("--empty-labels", "empty_policy", type=click.Choice(["keep", "drop"]), default="keep",
              show_default=True, help="Images whose captions have no vocabulary word: all-negative, or dropped.")
@click.option("--backbone-weights", type=click.Path(), default=None,
              help="Local torchvision ResNet state dict to initialise the trunk (nothing is downloaded).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's; 1 is fastest for the small model on a busy machine).")
def train_attributes_cmd(data, out, images, config, epochs, batch_size, lr, vocab_size, input_size, stopwords,
                         empty_policy, backbone_weights, resume, seed, device, threads) -> None:
    """Train the MIL attribute-word detector (Fang et al. 2015) from the captions of prepared data."""
    from glied.pipeline.attributes import train_attributes

    if threads:
        import torch
        torch.set_num_threads(threads)

    s = train_attributes(data, out, images=images, config=config, epochs=epochs, batch_size=batch_size, lr=lr,
                         vocab_size=vocab_size, input_size=input_size, stopwords=stopwords,
                         empty_policy=empty_policy, resume=resume, seed=seed, backbone_weights=backbone_weights,
                         device=device, log=click.echo)
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
@click.option("--device", default="cpu", show_default=True)
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
