"""Wall time of ``milkit cv`` against a plain PyTorch loop doing the same work, on MUSK1.

Both train the shipped ABMIL recipe (``configs/experiments/abmil.yaml``: its network, AdamW
settings, cosine decay, class weights and epoch count) on the same 10 folds — the folds ``milkit cv`` makes —
one bag per step, standardise the features with each fold's training statistics and test the
final model. The plain loop holds every bag in memory, uses one intra-op thread and no
framework: the floor for this work on this machine. ``milkit cv`` runs in this process (its
imports are paid before the clock starts, as the plain loop's are), first with ``--jobs 1``,
then with its default ``--jobs`` (folds in parallel processes when cores are free). The three
are run in turn, ``--rounds`` times, and each one's best time is kept: on a shared machine the
speed drifts by tens of percent within minutes.

Prints the wall times, the ratios milkit / plain (target: <= 1.5) and both mean accuracies
(they should agree within noise: same recipe, different random streams).

Run: ``python benchmarks/cv_speed.py [--data ../shared/benchmarks/musk1.csv] [--repeats 1]``
(work files in ``benchmarks/_work/cv_speed/``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from classic_mil import write_bags  # noqa: E402

from milkit.data.datamodule import MILDataModule  # noqa: E402
from milkit.models import ABMIL  # noqa: E402
from milkit.training import cv  # noqa: E402
from milkit.training.module import cosine_factor  # noqa: E402

ROOT = HERE.parent
WORK = HERE / "_work" / "cv_speed"
EXPERIMENT = ROOT / "configs" / "experiments" / "abmil.yaml"


def recipe() -> tuple[dict, dict, int]:
    """The experiment's model init args, optimiser init args and epoch count."""
    model = yaml.safe_load((ROOT / "configs" / "model" / "abmil.yaml").read_text())
    trainer = yaml.safe_load((ROOT / "configs" / "trainer" / "cpu.yaml").read_text())
    return model["model"]["init_args"], model["optimizer"]["init_args"], trainer["max_epochs"]


def plain_cv(features_dir: Path, labels_csv: Path, folds: int, repeats: int) -> list[float]:
    """The same cross-validation as a bare loop; returns each fold's test accuracy."""
    model_args, optimizer_args, epochs = recipe()
    accuracies = []
    bags: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        for fold in range(folds):
            data = MILDataModule(features_dir, labels_csv, n_folds=folds, fold=fold,
                                 split_seed=repeat, val_fraction=0.0)  # fmt: skip
            rows, targets = data.cohort.rows, data.cohort.targets()
            for row in rows:
                if row.slide_id not in bags:
                    with h5py.File(features_dir / f"{row.slide_id}.h5") as file:
                        bags[row.slide_id] = torch.from_numpy(file["features"][()]).float()
            train, test = data.split.train, data.split.test
            torch.manual_seed(repeat * folds + fold)
            tiles = torch.cat([bags[rows[i].slide_id] for i in train])
            mean, std = tiles.mean(0), tiles.std(0, unbiased=False).clamp_min(1e-6)
            x = {i: ((bags[rows[i].slide_id] - mean) / std)[None] for i in range(len(rows))}
            y = torch.tensor(targets)
            counts = torch.bincount(y[torch.as_tensor(train)], minlength=2).float()
            class_weights = len(train) / (2 * counts)  # the recipe's balance: loss_weights
            model = ABMIL(tiles.shape[1], 2, **model_args)
            optimizer = torch.optim.AdamW(model.parameters(), **optimizer_args)
            total = epochs * len(train)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step, total=total: cosine_factor(step, total)
            )
            model.train()
            for _ in range(epochs):
                for position in torch.randperm(len(train)).tolist():
                    i = int(train[position])
                    mask = torch.ones(x[i].shape[:2], dtype=torch.bool)
                    logits = model(x[i], mask).logits
                    loss = class_weights[y[i]] * F.cross_entropy(logits, y[i : i + 1])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            model.eval()
            with torch.no_grad():
                correct = [
                    int(model(x[int(i)], torch.ones(x[int(i)].shape[:2], dtype=torch.bool))
                        .logits.argmax(-1)) == int(y[int(i)])
                    for i in test
                ]  # fmt: skip
            accuracies.append(float(np.mean(correct)))
    return accuracies


def milkit_cv(features_dir: Path, labels_csv: Path, folds: int, repeats: int, jobs: list[str],
              out: Path) -> list[float]:  # fmt: skip
    """``milkit cv`` with the experiment config; returns each fold's test accuracy."""
    if out.exists():
        shutil.rmtree(out)
    code = cv.main([
        "--config", str(EXPERIMENT), "--data.features_dir", str(features_dir),
        "--data.labels_csv", str(labels_csv), "--folds", str(folds), "--repeats", str(repeats),
        "--seed", "0", "--out", str(out), *jobs,
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(f"milkit cv failed with exit code {code}")
    summary = json.loads((out / cv.SUMMARY_JSON).read_text())
    return summary["metrics"]["accuracy"]["values"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "benchmarks" / "musk1.csv"
    )
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best kept")
    args = parser.parse_args()
    features_dir, labels_csv, n_bags = write_bags(args.data, WORK / "bags")
    contenders = {
        "plain PyTorch, 1 thread": None,
        "milkit cv --jobs 1": ["--jobs", "1"],
        "milkit cv (default jobs)": [],
    }
    best: dict[str, tuple[float, list[float]]] = {}
    threads = torch.get_num_threads()
    for _ in range(args.rounds):  # interleaved, best of each: shared machines drift
        for name, jobs in contenders.items():
            start = time.perf_counter()
            if jobs is None:
                torch.set_num_threads(1)
                accuracy = plain_cv(features_dir, labels_csv, args.folds, args.repeats)
                torch.set_num_threads(threads)
            else:
                accuracy = milkit_cv(
                    features_dir, labels_csv, args.folds, args.repeats, jobs, WORK / "run"
                )
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, accuracy)
    _, _, epochs = recipe()
    print(f"\n{args.data.name}: {n_bags} bags, {args.folds}-fold x {args.repeats}, {epochs} epochs")
    plain_s = best["plain PyTorch, 1 thread"][0]
    print(
        f"{'run (best of ' + str(args.rounds) + ')':<26} {'wall s':>7} {'x plain':>8} {'accuracy':>9}"
    )
    for name, (seconds, accuracy) in best.items():
        print(f"{name:<26} {seconds:7.1f} {seconds / plain_s:8.2f} {np.mean(accuracy):9.3f}")
    print("target: milkit cv <= 1.5 x plain")


if __name__ == "__main__":
    main()
