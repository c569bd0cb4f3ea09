"""The classic MIL benchmarks (MUSK1, MUSK2) through ``milkit cv``, beside Ilse et al. 2018.

Each data set is a CSV without header (``label, bag_id, f1 ... f166``, one row per instance;
the shared development copies live in ``../shared/benchmarks/``). The script writes one HDF5
file per bag with the raw features and dummy coordinates plus a labels CSV — what any user
with precomputed features would do — then runs ``milkit cv`` as a user would (a subprocess,
the shipped configs, nothing tuned per data set) with the paper's protocol, 10-fold
cross-validation repeated 5 times, for plain attention (``configs/experiments/abmil.yaml``)
and gated attention (``configs/experiments/abmil_gated.yaml``).

Prints, per data set and model, milkit's accuracy (mean ± SD and SEM over the 50 test folds)
and AUROC beside the published mean ± SEM, whether milkit matches (at or above the paper, or
within one SEM of it), and each cv's wall time.

Run: ``python benchmarks/classic_mil.py [--data-dir ../shared/benchmarks] [--folds 10]
[--repeats 5]`` (work files in ``benchmarks/_work/classic_mil/``, git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "classic_mil"
#: Ilse, Tomczak & Welling 2018, Table 1: accuracy mean and SEM (10-fold CV x 5).
PUBLISHED = {
    ("musk1", "abmil"): (0.892, 0.040),
    ("musk1", "abmil_gated"): (0.900, 0.050),
    ("musk2", "abmil"): (0.858, 0.048),
    ("musk2", "abmil_gated"): (0.863, 0.042),
}


def write_bags(csv_path: Path, out: Path) -> tuple[Path, Path, int]:
    """One ``<bag>.h5`` (``features`` float32, dummy ``coords``) per bag and ``labels.csv``.

    Returns:
        The features folder, the labels CSV and the number of bags.
    """
    table = np.loadtxt(csv_path, delimiter=",", ndmin=2)
    features_dir = out / "features"
    if out.exists():
        shutil.rmtree(out)
    features_dir.mkdir(parents=True)
    rows = []
    for bag_id in np.unique(table[:, 1]).astype(int):
        instances = table[table[:, 1] == bag_id]
        slide_id = f"bag{bag_id:03d}"
        with h5py.File(features_dir / f"{slide_id}.h5", "w") as file:
            file["features"] = instances[:, 2:].astype(np.float32)
            file["coords"] = np.stack([np.arange(len(instances)), np.zeros(len(instances))], 1)
        rows.append({"slide_id": slide_id, "label": int(instances[0, 0])})
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return features_dir, labels_csv, len(rows)


def run_cv(config: str, features_dir: Path, labels_csv: Path, out: Path, folds: int,
           repeats: int) -> tuple[dict, float]:  # fmt: skip
    """``milkit cv`` in a subprocess; returns its summary and wall seconds."""
    if out.exists():
        shutil.rmtree(out)
    command = [
        sys.executable, "-m", "milkit.cli", "cv",
        "--config", str(ROOT / "configs" / "experiments" / f"{config}.yaml"),
        "--data.features_dir", str(features_dir), "--data.labels_csv", str(labels_csv),
        "--folds", str(folds), "--repeats", str(repeats), "--seed", "0", "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return json.loads((out / "cv_summary.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    parser.add_argument("--sets", nargs="+", default=["musk1", "musk2"])
    parser.add_argument("--configs", nargs="+", default=["abmil", "abmil_gated"])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lines = [
        f"{args.folds}-fold cv x {args.repeats}, seed 0; accuracy mean ± SD (SEM), AUROC; "
        "paper: Ilse et al. 2018, mean ± SEM",
        "",
        "| set | model | milkit accuracy | milkit AUROC | paper accuracy | matches | cv wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.sets:
        features_dir, labels_csv, n_bags = write_bags(
            args.data_dir / f"{name}.csv", WORK / name / "bags"
        )
        for config in args.configs:
            summary, seconds = run_cv(
                config, features_dir, labels_csv, WORK / name / config, args.folds, args.repeats
            )
            accuracy, auroc = summary["metrics"]["accuracy"], summary["metrics"]["auroc"]
            paper_mean, paper_sem = PUBLISHED[(name, config)]
            if accuracy["mean"] >= paper_mean:
                verdict = "above"
            elif accuracy["mean"] >= paper_mean - max(accuracy["sem"], paper_sem):
                verdict = "within 1 SEM"
            else:
                verdict = "BELOW"
            lines.append(
                f"| {name} ({n_bags} bags) | {config} | {accuracy['mean']:.3f} ± "
                f"{accuracy['sd']:.3f} ({accuracy['sem']:.3f}) | {auroc['mean']:.3f} | "
                f"{paper_mean:.3f} ± {paper_sem:.3f} | {verdict} | {seconds:.0f} s |"
            )
            print(lines[-1], flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
