"""EXPERIMENTS ONLY: base vs GLIED, XE vs SCST on the shapes world with ORACLE box features.

Uses :class:`shapes_box_features.ShapesBoxFeatures` (ground-truth boxes through a fixed random projection, not the
real extractor), so its numbers tune the training recipe; they are not pipeline results.

    glied make-shapes W --count 3000 --seed 0 && glied prepare W/captions.json --out P --max-length 24
    python benchmarks/shapes_recipe.py --world W --prep P --out RUNS [--models base glied]

Recipe used (d_model 256 to fit minutes on 2 loaded cores; the paper size is 512): XE 8 epochs, lr 1e-3,
100 warm-up steps, 1 caption per image per epoch, batch 50; SCST 2 epochs, lr 5e-5, 2 samples per image,
greedy baseline. Test split, beam 3, pycocoevalcap.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes_box_features import ShapesBoxFeatures  # noqa: E402

from glied.pipeline.evaluate import evaluate  # noqa: E402
from glied.pipeline.train import DecoderTrainConfig, train  # noqa: E402

RECIPE = dict(epochs=8, scst_epochs=2, batch_size=50, d_model=256, d_embed=128, lr=1e-3, warmup_steps=100,
              scst_lr=5e-5, captions_per_image=1, scst_samples=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True)
    ap.add_argument("--prep", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["base", "glied"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = ShapesBoxFeatures(args.world)
    rows = []
    for m in args.models:
        run = Path(args.out) / m
        train(args.prep, src, run, DecoderTrainConfig(model=m, **RECIPE), resume=(run / "last.pt").is_file())
        for ck, label in (("xe.pt", "XE"), ("best.pt", "XE+SCST")):
            r = evaluate(run / ck, src, args.prep, "test", beam_size=3, out=run / f"eval_{label}")
            rows.append((m, label, r["metrics"]))
    print("\nmodel  stage     B-1    B-4    M      R      CIDEr-D   (oracle box features, test, beam 3)")
    for m, label, s in rows:
        print(f"{m:6s} {label:8s} {s['BLEU-1']:.3f}  {s['BLEU-4']:.3f}  {s['METEOR']:.3f}  {s['ROUGE-L']:.3f}"
              f"  {s['CIDEr']:.3f}")
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
