"""Self-ViT-MIL on real H&E: do DINO features pretrained on the cohort beat random ones?

On the UCSB breast TMA images (58 H&E images, 32 benign / 26 malignant, one label per image;
the development copy lives in ``../shared/benchmarks/ucsb_breast/``), as a user would run it:
``milkit tile`` -> ``milkit pretrain`` with a DINO recipe -> ``milkit preprocess --encoder
local-dir:RUN/encoder`` -> ``milkit cv`` with the shipped ABMIL config. Two baselines get the same
tiles and the same cv: the recipe's architecture at random initialisation (``--random-weights``)
and a random ``vit_tiny_patch16_224`` (tiles resized to its 224 px).

Every arm runs once per seed (``--seeds``): the pretraining seed, and the seed of the random
draws. Each run's bag AUROC is ``milkit cv``'s mean over test folds, and the AUROC of the
out-of-fold predictions pooled over all images (one number per repeat, less noisy with 5-6
images per fold); the script prints both, mean ± SD over seeds, and the wall time of each stage.
The images carry no µm/px; 0.5 µm/px is assumed (40x TMA scans). Tiles of 64 px, kept when at
least a quarter is tissue (Ilse et al. 2018 dropped patches more than 75 % white).

Every stage resumes: a rerun reuses finished pretraining runs, feature files and cv folds
(``--fresh`` starts over). Work files in ``benchmarks/_work/ssl_real/`` (git-ignored).

Run: ``python benchmarks/ssl_real.py [--images ../shared/benchmarks/ucsb_breast]
[--recipe configs/ssl/dino_tiny_cpu.yaml] [--seeds 0 1 2] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "ssl_real"
ABMIL = ROOT / "configs" / "experiments" / "abmil.yaml"
#: Assumed scan resolution of the images, µm/px, and the tiling of every arm.
SLIDE_MPP = 0.5
TILING = ["--mpp", str(SLIDE_MPP), "--slide-mpp", str(SLIDE_MPP), "--tile-size", "64",
          "--min-tissue", "0.25"]  # fmt: skip
POSITIVE = "malignant"


@dataclass
class Arm:
    """One kind of features, with its AUROCs and stage times per seed."""

    name: str
    fold_auroc: list[float] = field(default_factory=list)
    pooled_auroc: list[float] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def timed(self, stage: str, seconds: float) -> None:
        """Record ``seconds`` of ``stage`` for this arm."""
        self.seconds.setdefault(stage, []).append(seconds)


def milkit(*args: str, capture: bool = False) -> tuple[float, str]:
    """``milkit ARGS`` in a subprocess, as a user would run it; returns wall seconds and stdout.

    Raises:
        SystemExit: The command failed (its output is shown).
    """
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "milkit.cli", *args], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"milkit {args[0]} failed (rc {result.returncode})")
    return seconds, result.stdout if capture else ""


def write_labels(images: Path, out: Path) -> Path:
    """milkit's labels CSV (``slide_id`` = file stem, ``label``) from the set's ``labels.csv``."""
    with (images / "labels.csv").open(newline="") as handle:
        rows = [
            {"slide_id": Path(row["file"]).stem, "label": row["label"]}
            for row in csv.DictReader(handle)
        ]
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return labels_csv


def pooled_auroc(cv_dir: Path, summary: dict) -> list[float]:
    """AUROC of the out-of-fold predictions of all images, one per cv repeat (``summary``:
    the folder's ``cv_summary.json``)."""
    by_repeat: dict[int, list[dict[str, str]]] = {}
    for run in summary["runs"]:
        with (cv_dir / run["dir"] / "predictions.csv").open(newline="") as handle:
            by_repeat.setdefault(run["repeat"], []).extend(csv.DictReader(handle))
    aurocs = []
    for rows in by_repeat.values():
        scores = torch.tensor([float(row[f"prob_{POSITIVE}"]) for row in rows])
        truth = torch.tensor([int(row["target"] == POSITIVE) for row in rows])
        aurocs.append(float(binary_auroc(scores, truth)))
    return aurocs


def evaluate(arm: Arm, seed: int, run: Path, images: Path, labels_csv: Path,
             encoder: list[str], args: argparse.Namespace) -> None:  # fmt: skip
    """Features of ``images`` with ``encoder`` (preprocess options) into ``run``, then ABMIL cv."""
    seconds, _ = milkit(
        "preprocess", str(images), str(run), *TILING, *encoder, "--batch-size", "128"
    )
    arm.timed("features", seconds)
    cv_dir = run / "cv"
    seconds, _ = milkit(
        "cv", "--config", str(ABMIL), "--data.features_dir", str(run / "features"),
        "--data.labels_csv", str(labels_csv), "--folds", str(args.folds),
        "--repeats", str(args.repeats), "--seed", "0", "--out", str(cv_dir),
    )  # fmt: skip
    arm.timed("cv", seconds)
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    arm.fold_auroc.append(summary["metrics"]["auroc"]["mean"])
    arm.pooled_auroc.append(statistics.fmean(pooled_auroc(cv_dir, summary)))
    print(
        f"  {arm.name} seed {seed}: AUROC {arm.fold_auroc[-1]:.3f} "
        f"(pooled {arm.pooled_auroc[-1]:.3f})",
        flush=True,
    )


def mean_sd(values: list[float]) -> str:
    """``mean ± SD`` (SD 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=Path, default=ROOT.parent / "shared" / "benchmarks" / "ucsb_breast"
    )
    parser.add_argument("--recipe", type=Path, action="append", default=None,
                        help="DINO config(s), in the order they apply (default: "
                        "configs/ssl/dino_tiny_cpu.yaml); repeatable")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--fresh", action="store_true", help="delete earlier work files first")
    args = parser.parse_args()
    if not (args.images / "labels.csv").is_file():
        raise SystemExit(
            f"{args.images}: no labels.csv; pass --images with the UCSB breast images "
            "(../shared/benchmarks/ucsb_breast/ in the development checkout)."
        )
    recipe = args.recipe or [ROOT / "configs" / "ssl" / "dino_tiny_cpu.yaml"]
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    labels_csv = write_labels(args.images, args.work)
    tiles = args.work / "tiles"
    tile_seconds, _ = milkit("tile", str(args.images), str(tiles), *TILING)

    pretrained = Arm("DINO-pretrained (recipe)")
    at_random = Arm("recipe architecture, random init")
    vit_tiny = Arm("vit_tiny_patch16_224, random init")
    for seed in args.seeds:
        run = args.work / f"seed{seed}"
        seconds, out = milkit(
            "pretrain", *[arg for config in recipe for arg in ("--config", str(config))],
            "--seed_everything", str(seed), "--data.slides_dir", str(args.images),
            "--data.coords_dir", str(tiles / "coords"), "--out", str(run / "pretrain"),
            "--trainer.enable_progress_bar", "false", capture=True,
        )  # fmt: skip
        done = re.search(r"this run (\d+) steps, .*\(([\d.]+) tiles/s\)", out)
        if done and int(done.group(1)) == 0:
            print(f"seed {seed}: pretraining finished in an earlier run (reused)", flush=True)
        else:
            pretrained.timed("pretrain", seconds)
            print(f"seed {seed}: pretraining {seconds:.0f} s"
                  + (f", {done.group(2)} tiles/s" if done else ""), flush=True)  # fmt: skip
        encoder = f"local-dir:{run / 'pretrain' / 'encoder'}"
        evaluate(pretrained, seed, run / "pretrained", args.images, labels_csv,
                 ["--encoder", encoder], args)  # fmt: skip
        random_weights = ["--random-weights", "--seed", str(seed)]
        evaluate(at_random, seed, run / "random_init", args.images, labels_csv,
                 ["--encoder", encoder, *random_weights], args)  # fmt: skip
        evaluate(vit_tiny, seed, run / "vit_tiny", args.images, labels_csv,
                 ["--encoder", "vit_tiny_patch16_224", *random_weights], args)  # fmt: skip

    arms = (pretrained, at_random, vit_tiny)
    print(
        f"\n{len(args.seeds)} seed(s); ABMIL {args.folds}-fold cv x {args.repeats}; "
        f"AUROC mean ± SD over seeds; tiling {tile_seconds:.0f} s\n"
        f"recipe: {' + '.join(str(config) for config in recipe)}\n"
        "| features | bag AUROC (fold mean) | bag AUROC (pooled) | seconds per seed |\n"
        "|---|---|---|---|"
    )
    for arm in arms:
        times = ", ".join(
            f"{stage} {statistics.fmean(values):.0f}" for stage, values in arm.seconds.items()
        )
        print(f"| {arm.name} | {mean_sd(arm.fold_auroc)} | {mean_sd(arm.pooled_auroc)} | {times} |")
    best_random = max(statistics.fmean(arm.fold_auroc) for arm in arms[1:])
    gain = statistics.fmean(pretrained.fold_auroc) - best_random
    print(f"pretrained - best random baseline: {gain:+.3f} bag AUROC (target >= +0.05)")


if __name__ == "__main__":
    main()
