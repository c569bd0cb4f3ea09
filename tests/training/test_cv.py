"""``milkit cv``: K folds x R repeats, a summary of every metric, deterministic given the seed."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from milkit.synth.features import WitnessCohort, write_witness_cohort
from milkit.training.cv import format_table, main, summarize

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> WitnessCohort:
    return write_witness_cohort(
        tmp_path_factory.mktemp("cohort"), n_bags=24, n_tiles=(6, 10), feature_dim=8,
        slides_per_patient=2, shift=4.0,
    )  # fmt: skip


def _cv(cohort: WitnessCohort, out: Path, *extra: str) -> int:
    return main(_cv_args(cohort, out, *extra))


def _cv_args(cohort: WitnessCohort, out: Path, *extra: str) -> list[str]:
    return (
        [
            "--config", str(CONFIGS / "experiments" / "abmil.yaml"),
            "--data.features_dir", str(cohort.features_dir),
            "--data.labels_csv", str(cohort.labels_csv),
            "--data.num_workers", "0",
            "--model.model.init_args.hidden_dim", "16",
            "--trainer.max_epochs", "3",
            "--seed", "3",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip


def test_cv_writes_per_fold_values_and_statistics(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cv"
    assert _cv(cohort, out, "--folds", "3", "--repeats", "2", "--jobs", "2") == 0
    printed = capsys.readouterr().out
    assert "cv: 6 runs in 2 processes" in printed
    summary = json.loads((out / "cv_summary.json").read_text())
    assert (summary["folds"], summary["repeats"], summary["seed"]) == (3, 2, 3)
    for run in summary["runs"]:  # the final model of each fold, trained on every other fold
        assert run["epochs"] == 3 and run["n_val"] == 0
        assert run["n_train"] + run["n_test"] == len(cohort.labels)
        assert run["checkpoint"] == f"{run['dir']}/checkpoints/final.ckpt"
    assert [(run["repeat"], run["fold"]) for run in summary["runs"]] == [
        (r, k) for r in range(2) for k in range(3)
    ]
    for name in ("auroc", "accuracy", "balanced_accuracy", "f1", "auroc/positive", "loss"):
        stats = summary["metrics"][name]
        values = np.array(stats["values"], dtype=float)
        assert len(values) == 6 and stats["n"] == 6
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["sd"] == pytest.approx(values.std(ddof=1))
        assert stats["sem"] == pytest.approx(values.std(ddof=1) / math.sqrt(6))
    for repeat in range(2):
        predicted = []
        for fold in range(3):
            run_dir = out / f"repeat{repeat}" / f"fold{fold}"
            assert (run_dir / "checkpoints" / "final.ckpt").is_file()
            with open(run_dir / "predictions.csv", newline="") as handle:
                ids = [row["slide_id"] for row in csv.DictReader(handle)]
            assert sorted(p.stem for p in (run_dir / "predictions").glob("*.h5")) == ids
            predicted += ids
        assert sorted(predicted) == sorted(cohort.labels)  # every slide held out once per repeat
    table = (out / "cv_summary.md").read_text()
    assert "| auroc |" in table and table.strip() in printed

    # the same seed in one process gives the very same numbers as two worker processes
    again = tmp_path / "again"
    assert _cv(cohort, again, "--folds", "3", "--repeats", "1", "--jobs", "1") == 0
    repeated = json.loads((again / "cv_summary.json").read_text())
    for name, stats in repeated["metrics"].items():
        assert stats["values"] == summary["metrics"][name]["values"][:3], name


def test_cv_results_do_not_depend_on_the_number_of_loader_workers(
    cohort: WitnessCohort, tmp_path: Path
) -> None:
    # Bags read from disk (not memory) by worker processes, tile subsamples drawn in training.
    summaries = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        extra = ("--folds", "2", "--jobs", "1", "--data.in_memory", "false")
        extra += ("--data.max_tiles", "5", "--data.num_workers", workers)
        assert _cv(cohort, out, *extra) == 0
        summaries.append(json.loads((out / "cv_summary.json").read_text()))
    for name, stats in summaries[0]["metrics"].items():
        assert stats["values"] == summaries[1]["metrics"][name]["values"], name


def test_a_slide_without_tiles_is_left_out_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write_tileless: Callable[[Path, str], Path]
) -> None:
    small = write_witness_cohort(
        tmp_path / "cohort", n_bags=12, n_tiles=(6, 10), feature_dim=8, shift=4.0
    )
    # a glass-only slide in the labels, as preprocess leaves it: coordinates without tiles
    write_tileless(small.features_dir.parent / "coords", "glass")
    with small.labels_csv.open("a") as labels:
        labels.write("glass,glass_patient,negative\n")
    line = len(small.labels_csv.read_text().splitlines())
    assert _cv(small, tmp_path / "cv", "--folds", "2", "--jobs", "1") == 0
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert summary["left_out"] == [{"slide_id": "glass", "line": line}]
    assert all(run["n_train"] + run["n_test"] == 12 for run in summary["runs"])
    printed = capsys.readouterr().out
    assert f"left out 1 slide(s) of {small.labels_csv} without tiles" in printed
    assert f"glass (line {line})" in (tmp_path / "cv" / "cv_summary.md").read_text()

    assert _cv(small, tmp_path / "strict", "--data.strict", "true") == 2
    assert "slide 'glass' has no feature file" in capsys.readouterr().err


def test_a_killed_cv_resumes_without_redoing_finished_runs(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ("--folds", "3", "--jobs", "1", "--trainer.max_epochs", "30")
    assert _cv(cohort, whole, *extra) == 0
    command = [sys.executable, "-m", "milkit.training.cv", *_cv_args(cohort, resumed, *extra)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold1 = resumed / "repeat0" / "fold1" / "result.json"
    while not fold1.is_file() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as soon as fold 1 is done
    process.wait()
    assert fold1.is_file() and not (resumed / "cv_summary.json").exists(), "not killed in time"
    finished = [p for p in (resumed / "repeat0").glob("fold[01]/**/*") if p.is_file()]
    mtimes = {path: path.stat().st_mtime_ns for path in finished}
    capsys.readouterr()

    assert _cv(cohort, resumed, *extra) == 0  # the same command again
    assert f"cv: resuming in {resumed}: 2 of 3 runs are done" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in finished} == mtimes  # not retrained
    summaries = [json.loads((out / "cv_summary.json").read_text()) for out in (whole, resumed)]
    assert summaries[1]["metrics"] == summaries[0]["metrics"]
    assert (resumed / "repeat0" / "fold2" / "predictions.csv").is_file()

    assert _cv(cohort, resumed, *extra, "--trainer.max_epochs", "4") == 2
    assert "holds a cross-validation with another configuration" in capsys.readouterr().err


def test_cv_refuses_a_used_folder_and_a_split_column(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("x")
    assert _cv(cohort, tmp_path / "used") == 2
    assert "is not empty; choose a new --out" in capsys.readouterr().err
    labels = tmp_path / "split.csv"
    rows = cohort.labels_csv.read_text().splitlines()
    labels.write_text("\n".join([rows[0] + ",split"] + [r + ",train" for r in rows[1:]]) + "\n")
    assert _cv(cohort, tmp_path / "new", "--data.labels_csv", str(labels)) == 2
    assert "has a split column" in capsys.readouterr().err


def test_cv_with_monitor_tests_the_best_epoch_of_a_validation_part(
    cohort: WitnessCohort, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    extra = ("--folds", "3", "--jobs", "1", "--monitor", "val/auroc", "--monitor_mode", "max")
    assert _cv(cohort, out, *extra, "--patience", "1") == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["monitor"] == "val/auroc"
    for run in summary["runs"]:
        assert run["n_val"] > 0 and run["checkpoint"] == f"{run['dir']}/checkpoints/best.ckpt"
        assert (out / run["checkpoint"]).is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--patience", "2"), "--patience stops on a validation metric: give --monitor"),
        (("--jobs", "0"), "--jobs must be >= 1"),
        (("--monitor", "val/loss", "--data.val_fraction", "0"), "needs a validation part"),
    ],
)
def test_cv_refuses_options_that_cannot_work(
    cohort: WitnessCohort,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    assert _cv(cohort, tmp_path / "cv", *extra) == 2
    assert message in capsys.readouterr().err


def test_summary_statistics_skip_undefined_values() -> None:
    runs = [{"metrics": {"auroc": 0.5, "r2": None}}, {"metrics": {"auroc": 1.0, "r2": 0.2}}]
    summary = summarize(runs, folds=2, repeats=1, seed=0)
    assert summary["metrics"]["auroc"]["mean"] == 0.75
    assert summary["metrics"]["auroc"]["sd"] == pytest.approx(math.sqrt(0.125))
    assert summary["metrics"]["r2"] == {
        "values": [None, 0.2],
        "mean": 0.2,
        "sd": None,
        "sem": None,
        "n": 1,
    }
    table = format_table(summary)
    assert "| auroc | 0.7500 ± 0.3536 | 0.2500 | 0.5000 | 1.0000 | 2 |" in table
    assert "| r2 | 0.2000 | - | 0.2000 | 0.2000 | 1 |" in table
