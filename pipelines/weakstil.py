"""WeakSTIL end to end: a slide folder and a CSV of slide-level sTIL scores -> tile TIL maps.

Three milkit stages, each resumable, with nothing of its own in between (docs/papers.md C):

1. ``milkit preprocess SLIDES OUT/preprocessed``: tissue, tiles at ``--mpp``, tile features;
2. ``milkit cv --config configs/experiments/weakstil.yaml``: the tile-score regressor trained
   on the slide scores, K-fold cross-validated; ``OUT/cv/cv_summary.json`` holds R², Pearson,
   Spearman, MAE and the high-vs-low AUROC (mean ± SD over folds), and every held-out slide
   gets ``predictions/<slide_id>.h5`` with tile scores s_i and attention a_i;
3. ``milkit heatmap`` on every fold: the tile scores drawn over the slides in % TILs.

Example (anything after ``--`` goes to ``milkit cv`` unchanged)::

    python pipelines/weakstil.py slides/ stil_scores.csv runs/weakstil --folds 5 \\
        -- --trainer.max_epochs 100 --data.num_workers 4

The CSV needs ``slide_id`` (the slide file's name without its extension) and the score column
(``--target``, in [0, 100]); ``patient_id`` keeps a patient's slides in one fold. A tumour-bed
restriction (``--tile-subset tumor_bed``) needs that boolean dataset in every feature file of
``OUT/preprocessed/features``: add it after the first run and rerun (finished stages are reused).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from milkit.cli import main as milkit_main

EXPERIMENT = Path(__file__).resolve().parent.parent / "configs" / "experiments" / "weakstil.yaml"
SUMMARY_METRICS = ("r2", "pearson", "spearman", "mae", "auroc")


def build_parser() -> argparse.ArgumentParser:
    """The pipeline's arguments (``--help`` documents them)."""
    parser = argparse.ArgumentParser(
        prog="weakstil.py",
        description="WeakSTIL: preprocess slides, cross-validate the tile-score regressor on "
        "slide-level sTIL scores, draw tile TIL heatmaps. Options after `--` go to `milkit cv`.",
    )
    parser.add_argument("slides_dir", type=Path, help="folder of slides")
    parser.add_argument("scores_csv", type=Path, help="CSV with slide_id and the score column")
    parser.add_argument("out_dir", type=Path, help="output folder (preprocessed/, cv/)")
    parser.add_argument("--target", default="stil_score", help="score column (default stil_score)")
    parser.add_argument(
        "--pooling",
        choices=("attention", "mean"),
        default="attention",
        help="slide score from the tile scores: gated-attention weights or the plain mean",
    )
    parser.add_argument(
        "--tile-subset",
        default=None,
        metavar="NAME",
        help="boolean dataset in each feature file restricting the tiles (e.g. tumor_bed)",
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the folds (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and training")
    parser.add_argument("--mpp", type=float, default=0.5, help="tiling resolution, µm/px")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --mpp")
    parser.add_argument(
        "--encoder", default="vit_small_patch16_224", help="tile encoder (see milkit preprocess)"
    )
    parser.add_argument(
        "--encoder-weights", type=Path, default=None, help="local checkpoint of the encoder"
    )
    parser.add_argument(
        "--random-weights", action="store_true", help="randomly initialised encoder (tests only)"
    )
    parser.add_argument(
        "--slide-mpp", type=float, default=None, help="scan µm/px of slides that record none"
    )
    parser.add_argument("--no-heatmaps", action="store_true", help="stop after cross-validation")
    return parser


def preprocess_argv(args: argparse.Namespace) -> list[str]:
    """``milkit preprocess`` arguments of the pipeline's options."""
    argv = ["preprocess", str(args.slides_dir), str(args.out_dir / "preprocessed")]
    argv += ["--mpp", str(args.mpp), "--tile-size", str(args.tile_size), "--encoder", args.encoder]
    if args.encoder_weights is not None:
        argv += ["--encoder-weights", str(args.encoder_weights)]
    if args.slide_mpp is not None:
        argv += ["--slide-mpp", str(args.slide_mpp)]
    return argv + (["--random-weights"] if args.random_weights else [])


def cv_argv(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """``milkit cv`` arguments: the WeakSTIL experiment, the pipeline's options, then ``extra``."""
    argv = [
        "--config", str(EXPERIMENT),
        "--data.features_dir", str(args.out_dir / "preprocessed" / "features"),
        "--data.labels_csv", str(args.scores_csv),
        "--data.target", args.target,
        "--model.model.init_args.pooling", args.pooling,
        "--folds", str(args.folds),
        "--repeats", str(args.repeats),
        "--seed", str(args.seed),
        "--out", str(args.out_dir / "cv"),
    ]  # fmt: skip
    if args.tile_subset is not None:
        argv += ["--data.tile_subset", args.tile_subset]
    return argv + list(extra)


def run(argv: Sequence[str]) -> int:
    """Run the pipeline.

    Args:
        argv: The pipeline's options, optionally followed by ``--`` and ``milkit cv`` options.

    Returns:
        0 on success, else the exit code of the stage that failed (1: some slides failed, see
        the stage's ``errors.csv``; 2: bad input, message on stderr).
    """
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    extra = argv[split + 1 :]
    from milkit.training import cv  # Lightning: imported only once there is work to do

    code = milkit_main(preprocess_argv(args))
    if code != 0:
        print(f"weakstil: preprocessing failed for some slides (exit {code}); fix or remove them "
              f"(see {args.out_dir / 'preprocessed'}) and rerun.", file=sys.stderr)  # fmt: skip
        return code

    cv_dir = args.out_dir / "cv"
    summary_path = cv_dir / cv.SUMMARY_JSON
    if summary_path.is_file():
        print(f"weakstil: reusing the cross-validation in {cv_dir}")
    else:
        code = cv.main(cv_argv(args, extra))
        if code != 0:
            return code
    summary = json.loads(summary_path.read_text())

    fold_dirs = [cv_dir / entry["dir"] for entry in summary["runs"]]
    failed = []
    if not args.no_heatmaps:
        for fold_dir in fold_dirs:
            heatmap = ["heatmap", str(fold_dir), "--slides-dir", str(args.slides_dir)]
            if args.slide_mpp is not None:
                heatmap += ["--slide-mpp", str(args.slide_mpp)]
            if milkit_main(heatmap) != 0:
                failed.append(fold_dir)

    print("\nweakstil: slide-level results over folds (mean ± SD)")
    for name in SUMMARY_METRICS:
        stats = summary["metrics"].get(name)
        if stats and stats["mean"] is not None:
            print(f"  {name:<9} {stats['mean']:.3f} ± {stats['sd'] or 0.0:.3f} (n={stats['n']})")
    print(f"  summary   {summary_path}")
    if not args.no_heatmaps:
        print(f"  heatmaps  {cv_dir}/repeat*/fold*/heatmaps/")
    for fold_dir in failed:
        print(f"weakstil: some heatmaps failed; see {fold_dir / 'heatmaps'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
