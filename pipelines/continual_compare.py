"""Every continual strategy on one task sequence, side by side (docs/papers.md D).

Runs ``milkit continual`` once per strategy and seed on the same features and labels (each run
resumable: finished runs are reused), then prints one table (mean ± SD over the seeds) and writes
``OUT/comparison.json``: per strategy the class- and task-incremental average accuracy and
BWT, the argmax-of-heads accuracy (no task prior), the tile AUROC at the end of the tasks learnt
before the last one, the logit drift of earlier tasks, each seed's values and its accuracy matrices.

On your cohort (a ``task`` column in the labels, or see ``milkit continual --help``)::

    python pipelines/continual_compare.py FEATURES_DIR LABELS_CSV runs/compare \\
        --strategies finetune lora owlora --seeds 0 1 2 -- --trainer.max_epochs 50

On synthetic feature tasks with tile truth (``--feature-tasks N``: N tasks of Gaussian bags
with witness tiles, :mod:`milkit.synth.continual_features`, 48/16/24 slides per task; each seed
writes its own tasks), the sequence of the README's table::

    python pipelines/continual_compare.py --feature-tasks 4 --seeds 0 1 2 runs/compare_features

On a synthetic slide cohort made here (``--synthetic N``: N slides over the three organ
tasks, random ViT-tiny features at 0.5 µm/px, tile truth for the tile AUROC)::

    python pipelines/continual_compare.py --synthetic 120 runs/compare_synthetic \\
        -- --data.shared_labels true

Anything after ``--`` goes to every ``milkit continual`` run unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milkit.cli import main as milkit_main
from milkit.configs import CONFIG_DIR

CONFIG = CONFIG_DIR / "continual" / "gdat_small_cpu.yaml"
ALL_STRATEGIES = ("joint", "finetune", "lora", "owlora", "ewc", "lwf", "replay")
MATRICES = ("accuracy_matrix", "task_accuracy_matrix", "tile_auroc_matrix")
#: results.json keys shown in the table, with their column titles.
COLUMNS = {
    "average_accuracy": "class-incr. acc",
    "bwt": "BWT",
    "task_average_accuracy": "task-incr. acc",
    "task_bwt": "task BWT",
    "earlier_tile_auroc": "earlier tile AUROC",
    "head_average_accuracy": "argmax of heads",
    "logit_drift": "logit drift",
}
#: The feature-task sequence of ``--feature-tasks`` (slides per task: train, val, test).
FEATURE_TASK_OPTIONS: dict[str, Any] = {
    "parts": (48, 16, 24),
    "witness_fraction": (0.1, 0.2),
    "shift": 4.0,
}


def build_parser() -> argparse.ArgumentParser:
    """The pipeline's arguments (``--help`` documents them)."""
    parser = argparse.ArgumentParser(
        prog="continual_compare.py",
        description="Run milkit continual once per strategy on the same tasks and compare. "
        "Options after `--` go to every run.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="FEATURES_DIR LABELS_CSV OUT_DIR, or only OUT_DIR with --synthetic "
                             "or --feature-tasks")  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="make a synthetic slide cohort of N slides in OUT_DIR first")  # fmt: skip
    source.add_argument("--feature-tasks", type=int, default=None, metavar="N",
                        help="write N synthetic feature tasks per seed in OUT_DIR first")  # fmt: skip
    parser.add_argument("--strategies", nargs="+", default=list(ALL_STRATEGIES),
                        choices=ALL_STRATEGIES, help="strategies to run (default: all)")  # fmt: skip
    parser.add_argument("--config", type=Path, default=CONFIG, help="milkit continual config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds; every strategy runs once per seed (default: 0)")  # fmt: skip
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


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and SD over seeds of every :data:`COLUMNS` value, and each seed's results.

    Args:
        runs: Per strategy, the ``results.json`` of each seed.

    Returns:
        Per strategy: ``<key>`` (mean, None where undefined), ``<key>_sd`` and ``seeds``
        (per seed: the values and the accuracy matrices).
    """
    comparison: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        row: dict[str, Any] = {}
        for key in COLUMNS:
            values = [r[key] for r in results if r.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_sd"] = float(np.std(values)) if values else None
        row["seeds"] = {
            str(r["seed"]): {key: r.get(key) for key in (*COLUMNS, *MATRICES)} for r in results
        }
        comparison[name] = row
    return comparison


def format_table(comparison: dict[str, dict[str, Any]]) -> str:
    """One row per strategy, one column per :data:`COLUMNS` entry: mean ± SD (n/a if undefined)."""

    def cell(row: dict[str, Any], key: str) -> str:
        mean, sd = row.get(key), row.get(f"{key}_sd")
        return "n/a" if mean is None else f"{mean:.3f} ± {sd:.3f}"

    lines = [f"{'strategy':<10}" + "".join(f"{title:>20}" for title in COLUMNS.values())]
    for name, row in comparison.items():
        lines.append(f"{name:<10}" + "".join(f"{cell(row, key):>20}" for key in COLUMNS))
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
    if args.synthetic is not None or args.feature_tasks is not None:
        if len(args.paths) != 1:
            parser.error("with --synthetic or --feature-tasks give only OUT_DIR")
        out_dir = args.paths[0]
    elif len(args.paths) == 3:
        features_dir, labels_csv, out_dir = args.paths
    else:
        parser.error(
            "give FEATURES_DIR LABELS_CSV OUT_DIR (or --synthetic N OUT_DIR, --feature-tasks N OUT_DIR)"
        )
    if args.synthetic is not None:
        features_dir, labels_csv = make_synthetic(out_dir, args.synthetic, args.seeds[0])
    # Lightning: imported only once there is work to do
    from milkit.training.continual import run as continual

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.strategies}
    for seed in args.seeds:
        if args.feature_tasks is not None:
            from milkit.synth.continual_features import write_feature_tasks

            tasks_dir = out_dir / f"tasks_seed{seed}"
            if not (tasks_dir / "labels.csv").is_file():
                write_feature_tasks(
                    tasks_dir, n_tasks=args.feature_tasks, seed=seed, **FEATURE_TASK_OPTIONS
                )
            features_dir, labels_csv = tasks_dir / "features", tasks_dir / "labels.csv"
        for strategy in args.strategies:
            run_dir = out_dir / (strategy if len(args.seeds) == 1 else f"{strategy}_seed{seed}")
            code = continual.main(
                ["--config", str(args.config), "--data.features_dir", str(features_dir),
                 "--data.labels_csv", str(labels_csv), "--strategy", strategy,
                 "--seed", str(seed), "--out", str(run_dir), *extra]
            )  # fmt: skip
            if code != 0:
                print(f"continual_compare: {strategy} failed (exit {code})", file=sys.stderr)
                return code
            runs[strategy].append(json.loads((run_dir / continual.RESULTS_JSON).read_text()))
    comparison = summarize(runs)
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    seeds = " ".join(str(seed) for seed in args.seeds)
    print(f"\nmean ± SD over seed(s) {seeds}:\n{format_table(comparison)}")
    print(f"\nwrote {out_dir / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
