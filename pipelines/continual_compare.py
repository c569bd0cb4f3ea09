"""Every continual strategy on one task sequence, side by side (docs/papers.md D).

Runs ``milkit continual`` once per strategy on the same features, labels and seed (each run
resumable: finished runs are reused), then prints one table and writes
``OUT/comparison.json``: per strategy the class- and task-incremental average accuracy and
BWT, the mean tile AUROC of the last stage, the logit drift of earlier tasks, and the accuracy
matrices.

On your cohort (a ``task`` column in the labels, or see ``milkit continual --help``)::

    python pipelines/continual_compare.py FEATURES_DIR LABELS_CSV runs/compare \\
        --strategies finetune lora owlora -- --trainer.max_epochs 50

On a synthetic slide cohort made here (``--synthetic N``: N slides over the three organ
tasks, random ViT-tiny features at 0.5 µm/px, tile truth for the tile AUROC)::

    python pipelines/continual_compare.py --synthetic 120 runs/compare_synthetic

Anything after ``--`` goes to every ``milkit continual`` run unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milkit.cli import main as milkit_main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "continual" / "gdat_small_cpu.yaml"
ALL_STRATEGIES = ("joint", "finetune", "lora", "owlora", "ewc", "lwf", "replay")
#: results.json keys shown in the table, with their column titles.
COLUMNS = {
    "average_accuracy": "class-incr. acc",
    "bwt": "BWT",
    "task_average_accuracy": "task-incr. acc",
    "task_bwt": "task BWT",
    "average_tile_auroc": "tile AUROC",
    "logit_drift": "logit drift",
}


def build_parser() -> argparse.ArgumentParser:
    """The pipeline's arguments (``--help`` documents them)."""
    parser = argparse.ArgumentParser(
        prog="continual_compare.py",
        description="Run milkit continual once per strategy on the same tasks and compare. "
        "Options after `--` go to every run.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="FEATURES_DIR LABELS_CSV OUT_DIR, or only OUT_DIR with --synthetic")  # fmt: skip
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="make a synthetic cohort of N slides in OUT_DIR first")  # fmt: skip
    parser.add_argument("--strategies", nargs="+", default=list(ALL_STRATEGIES),
                        choices=ALL_STRATEGIES, help="strategies to run (default: all)")  # fmt: skip
    parser.add_argument("--config", type=Path, default=CONFIG, help="milkit continual config")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    return parser


def make_synthetic(out_dir: Path, n_slides: int, seed: int) -> tuple[Path, Path]:
    """Synthetic slides, random ViT-tiny features and tile truth; returns features and labels.

    Raises:
        SystemExit: If a stage fails (its message says where to look).
    """
    from milkit.synth.annotate import annotate_feature_files

    cohort, pre = out_dir / "cohort", out_dir / "preprocessed"
    labels = cohort / "labels.csv"
    if not labels.is_file():
        argv = ["synth", str(cohort), "--n-slides", str(n_slides), "--seed", str(seed),
                "--size-px", "2500", "2500"]  # fmt: skip
        if milkit_main(argv) != 0:
            raise SystemExit(f"continual_compare: milkit {' '.join(argv)} failed")
    argv = ["preprocess", str(cohort / "slides"), str(pre), "--mpp", "0.5", "--tile-size", "224",
            "--encoder", "vit_tiny_patch16_224", "--random-weights"]  # fmt: skip
    if milkit_main(argv) != 0:
        raise SystemExit(f"continual_compare: milkit {' '.join(argv)} failed; see {pre}")
    annotate_feature_files(pre / "features", cohort / "truth")
    return pre / "features", labels


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per strategy, one column per :data:`COLUMNS` entry (n/a where undefined)."""
    lines = [f"{'strategy':<10}" + "".join(f"{title:>17}" for title in COLUMNS.values())]
    for name, result in results.items():
        cells = [result.get(key) for key in COLUMNS]
        lines.append(
            f"{name:<10}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>17}" for v in cells)
        )
    return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    """Run the pipeline.

    Args:
        argv: The pipeline's options, optionally followed by ``--`` and continual options.

    Returns:
        0 on success, else the exit code of the first failed run (2: bad input).
    """
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]
    if args.synthetic is not None:
        if len(args.paths) != 1:
            parser.error("with --synthetic give only OUT_DIR")
        out_dir = args.paths[0]
        features_dir, labels_csv = make_synthetic(out_dir, args.synthetic, args.seed)
    elif len(args.paths) == 3:
        features_dir, labels_csv, out_dir = args.paths
    else:
        parser.error("give FEATURES_DIR LABELS_CSV OUT_DIR (or --synthetic N OUT_DIR)")
    # Lightning: imported only once there is work to do
    from milkit.training.continual import run as continual

    results = {}
    for strategy in args.strategies:
        run_dir = out_dir / strategy
        code = continual.main(
            ["--config", str(args.config), "--data.features_dir", str(features_dir),
             "--data.labels_csv", str(labels_csv), "--strategy", strategy,
             "--seed", str(args.seed), "--out", str(run_dir), *extra]
        )  # fmt: skip
        if code != 0:
            print(f"continual_compare: {strategy} failed (exit {code})", file=sys.stderr)
            return code
        results[strategy] = json.loads((run_dir / continual.RESULTS_JSON).read_text())
    comparison = {
        name: {key: result.get(key) for key in (*COLUMNS, "accuracy_matrix",
                                                 "task_accuracy_matrix", "tile_auroc_matrix")}
        for name, result in results.items()
    }  # fmt: skip
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    print(format_table(results))
    print(f"\nwrote {out_dir / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
