"""Lightning DDP on CPU (2 processes, gloo): training runs, test metrics are synced across ranks
(equal to a single-process test of the same checkpoint), and prediction writes each slide once.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from milkit.data.datamodule import MILDataModule
from milkit.synth.features import write_witness_cohort
from milkit.training.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _metrics(log_dir: Path) -> dict[str, float]:
    with open(log_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: float(value) for row in rows for key, value in row.items() if value and "/" in key}


@pytest.mark.slow
def test_ddp_fit_test_predict_on_two_cpu_processes(tmp_path: Path) -> None:
    cohort = write_witness_cohort(
        tmp_path / "cohort", n_bags=21, n_tiles=(6, 10), feature_dim=8, shift=4.0
    )
    held_out = MILDataModule(cohort.features_dir, cohort.labels_csv, n_folds=3).split.test
    assert len(held_out) % 2 == 1  # a padding sampler would count one bag twice on 2 ranks
    options = [
        "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--model", str(CONFIGS / "model" / "abmil_gated.yaml"),
        "--data.features_dir", str(cohort.features_dir),
        "--data.labels_csv", str(cohort.labels_csv),
        "--data.n_folds", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def milkit(*args: str) -> None:
        command = [sys.executable, "-m", "milkit.training.cli", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    milkit(
        "fit",
        *options,
        *ddp,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "fit"),
    )
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    milkit(
        "test",
        *options,
        *ddp,
        "--ckpt_path",
        str(checkpoint),
        "--trainer.default_root_dir",
        str(tmp_path / "ddp"),
    )
    synced = _metrics(tmp_path / "ddp" / "lightning_logs" / "version_0")
    single = build_cli(
        ["test", *options, "--data.num_workers", "0", "--ckpt_path", str(checkpoint),
         "--trainer.default_root_dir", str(tmp_path / "single")]
    )  # fmt: skip
    expected = {k: float(v) for k, v in single.trainer.callback_metrics.items()}
    assert set(synced) == set(expected) and "test/auroc" in synced
    for name, value in expected.items():
        assert synced[name] == pytest.approx(value, abs=1e-5), name

    milkit(
        "predict",
        *options,
        *ddp,
        "--ckpt_path",
        str(checkpoint),
        "--trainer.default_root_dir",
        str(tmp_path / "pred"),
    )
    with open(tmp_path / "pred" / "predictions.csv", newline="") as handle:
        ids = [row["slide_id"] for row in csv.DictReader(handle)]
    assert ids == sorted(cohort.labels)  # every slide once, gathered from both ranks
    assert len(list((tmp_path / "pred" / "predictions").glob("*.h5"))) == 21
