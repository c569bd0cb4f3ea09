"""The small DINO recipe end to end on a synthetic cohort: time, throughput and k-NN accuracy.

Writes a cohort of synthetic slides in which every tissue class occurs (``make_knn_cohort``:
12 slides of 2 x 2 mm at 1 µm/px, three organ palettes, tiles of 64 px), pretrains
``configs/ssl/dino_tiny_cpu.yaml`` on its tiles with ``milkit pretrain``, and scores the exported
teacher and the same architecture at random initialisation with a k-NN classifier (k = 20,
cosine) on tiles of known class (background on glass, stroma, tumour, lymphocyte aggregate),
labelled on the even slides and tested on the odd ones, class-balanced.

Prints the wall time of each stage, the training throughput in tiles/s (each tile gives 2 global
and ``n_local_crops`` local crops) and both k-NN accuracies. Target: the whole run in at most
10 minutes on 2 CPU cores.

Run: ``python benchmarks/pretrain_small.py`` (work files in ``benchmarks/_work/``, git-ignored);
``--stain-spread 0.5`` makes the slides' staining differ as much as between sites, and
``--overlay configs/ssl/multi_site.yaml`` adds the settings for such slides to the recipe.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

from milkit.features.encoders import load_encoder
from milkit.ssl import pretrain as pretrain_cli
from milkit.ssl.knn import KnnResult, knn_by_slide, knn_random_init, knn_supervised_reference
from milkit.synth.knn_cohort import make_knn_cohort, synthetic_tile_labels
from milkit.synth.layout import ONE_LAB_STAIN_SPREAD

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ssl" / "dino_tiny_cpu.yaml"


def loss_trend(run: Path) -> tuple[float, float]:
    """Mean training loss over the first and the last quarter of the steps logged in ``run``."""
    losses = []
    for metrics_csv in sorted(run.rglob("metrics.csv")):  # one per logger version
        with metrics_csv.open() as handle:
            losses += [
                float(row["train/loss"]) for row in csv.DictReader(handle) if row["train/loss"]
            ]
    if not losses:
        raise SystemExit(
            f"no training loss logged under {run}: the run was shorter than the recipe's "
            "trainer.log_every_n_steps; give more steps (--max-steps)."
        )
    quarter = max(1, len(losses) // 4)
    return sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter


def pretrain(
    configs: list[Path], cohort: Path, coords: Path, run: Path, overrides: list[str]
) -> float:
    """``milkit pretrain`` of one recipe into ``run`` (CSV-logged); returns its wall seconds.

    Args:
        configs: The recipe (YAML), then any overlays, in the order they apply.
        cohort: The `make_knn_cohort` folder (``slides/`` inside).
        coords: Its coordinate folder.
        run: The run folder (``encoder/`` is written inside).
        overrides: ``KEY=VALUE`` recipe overrides, e.g. ``trainer.max_steps=400``.
    """
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run)},
    }
    argv = [
        *[arg for config in configs for arg in ("--config", str(config))],
        "--data.slides_dir", str(cohort / "slides"),
        "--data.coords_dir", str(coords),
        "--out", str(run),
        "--trainer.logger", json.dumps(logger),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    for override in overrides:
        key, _, value = override.partition("=")
        argv += [f"--{key}", value]
    started = time.perf_counter()
    if pretrain_cli.main(argv) != 0:
        raise SystemExit(f"pretraining failed: {run}")
    return time.perf_counter() - started


def knn_scores(run: Path, labelled: list) -> tuple[KnnResult, KnnResult]:
    """k-NN results of the exported teacher and of its architecture at random initialisation."""
    encoder_id = f"local-dir:{run / 'encoder'}"
    random = knn_random_init(encoder_id, labelled)
    return random, knn_by_slide(load_encoder(encoder_id), labelled)


def cohort_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape the synthetic cohort (shared with ``pretrain_sweep.py``)."""
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "pretrain")
    parser.add_argument("--n-slides", type=int, default=12)
    parser.add_argument("--size-px", type=int, default=2048)
    parser.add_argument("--mpp", type=float, default=1.0, help="scan and tiling resolution")
    parser.add_argument("--tile-size-px", type=int, default=64)
    parser.add_argument(
        "--stain-spread",
        type=float,
        default=ONE_LAB_STAIN_SPREAD,
        help="per-slide stain strength spread (0.5: slides pooled from several sites)",
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="the DINO recipe")
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="a config given after the recipe (e.g. configs/ssl/multi_site.yaml); "
                        "repeatable")  # fmt: skip


def build_cohort(args: argparse.Namespace) -> Path:
    """A fresh `make_knn_cohort` in ``args.work / "cohort"``; returns its coordinate folder."""
    shutil.rmtree(args.work, ignore_errors=True)
    return make_knn_cohort(
        args.work / "cohort",
        n_slides=args.n_slides,
        size_px=args.size_px,
        mpp=args.mpp,
        tile_size_px=args.tile_size_px,
        stain_spread=args.stain_spread,
        workers=os.cpu_count() or 1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cohort_options(parser)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    coords = build_cohort(args)
    cohort_s = time.perf_counter() - started

    run = args.work / "run"
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"trainer.max_steps={args.max_steps}")
    pretrain_s = pretrain(
        [args.config, *args.overlay], args.work / "cohort", coords, run, overrides
    )

    first, last = loss_trend(run)  # before the k-NN minutes: fails fast if nothing was logged
    knn_started = time.perf_counter()
    truth = args.work / "cohort" / "truth"
    labelled = synthetic_tile_labels(coords, truth)
    random, trained = knn_scores(run, labelled)
    knn_s = time.perf_counter() - knn_started
    total_s = time.perf_counter() - started
    training = synthetic_tile_labels(coords, truth, max_per_class=200, seed=1)
    ceiling_seeds = (0, 1, 2)
    ceiling = knn_supervised_reference(
        f"local-dir:{run / 'encoder'}", labelled, training, seeds=ceiling_seeds
    )

    print(
        f"cohort {args.n_slides} slides: {cohort_s:.0f} s | pretrain: {pretrain_s:.0f} s | "
        f"k-NN: {knn_s:.0f} s | total: {total_s:.0f} s ({total_s / 60:.1f} min, target <= 10)\n"
        f"loss first quarter {first:.3f} -> last quarter {last:.3f}\n"
        f"k-NN (k=20, {trained.n_train} labelled and {trained.n_test} test tiles per class): "
        f"random init {random.accuracy:.3f} (embed std {random.embed_std:.4f}), "
        f"pretrained {trained.accuracy:.3f} (embed std {trained.embed_std:.4f}), "
        f"difference {100 * (trained.accuracy - random.accuracy):+.1f} points\n"
        f"supervised reference (same architecture trained with the labels, mean of "
        f"{len(ceiling_seeds)} trainings, not timed): {ceiling.accuracy:.3f}; the pretrained "
        f"encoder gained {100 * (trained.accuracy - random.accuracy):+.1f} of the "
        f"{100 * (ceiling.accuracy - random.accuracy):.1f} points between random init and it"
    )


if __name__ == "__main__":
    main()
