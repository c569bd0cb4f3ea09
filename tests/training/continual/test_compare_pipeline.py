"""``pipelines/continual_compare.py``: one continual run per strategy, one comparison."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from milkit.synth.continual_features import write_feature_tasks


@pytest.fixture(scope="module")
def pipeline(load_pipeline: Callable[[str], ModuleType]) -> ModuleType:
    return load_pipeline("continual_compare")


def test_every_strategy_runs_on_the_same_tasks_and_is_compared(
    pipeline: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = write_feature_tasks(tmp_path / "tasks", n_tasks=2, parts=(6, 4, 4), n_tiles=(6, 10),
                                feature_dim=8)  # fmt: skip
    out = tmp_path / "compare"
    argv = [str(tasks.features_dir), str(tasks.labels_csv), str(out), "--strategies", "joint",
            "owlora", "--seeds", "0", "1", "--", "--trainer.max_epochs", "1"]  # fmt: skip
    assert pipeline.run(argv) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison) == ["joint", "owlora"]
    for name, row in comparison.items():
        values = []
        for seed in (0, 1):
            results = json.loads((out / f"{name}_seed{seed}" / "results.json").read_text())
            assert results["strategy"] == name and results["seed"] == seed
            assert row["seeds"][str(seed)]["accuracy_matrix"] == results["accuracy_matrix"]
            values.append(results["average_accuracy"])
        assert row["average_accuracy"] == pytest.approx(np.mean(values))
        assert row["average_accuracy_sd"] == pytest.approx(np.std(values))
    assert comparison["joint"]["bwt"] is None and comparison["owlora"]["bwt"] is not None
    table = capsys.readouterr().out
    assert "class-incr. acc" in table and "earlier tile AUROC" in table and "seed(s) 0 1" in table
    owlora_row = next(line for line in table.splitlines() if line.startswith("owlora"))
    owlora = comparison["owlora"]
    assert f"{owlora['average_accuracy']:.3f} ± {owlora['average_accuracy_sd']:.3f}" in owlora_row
    # A second call reuses the finished runs (milkit continual resumes after the last stage).
    model = out / "owlora_seed1" / "stage1_t1" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert pipeline.run(argv) == 0
    assert model.stat().st_mtime_ns == stamp


def test_feature_tasks_are_written_once_per_seed(pipeline: ModuleType, tmp_path: Path) -> None:
    argv = [str(tmp_path), "--feature-tasks", "2", "--seeds", "3", "--strategies", "finetune",
            "--", "--trainer.max_epochs", "1"]  # fmt: skip
    assert pipeline.run(argv) == 0
    labels = (tmp_path / "tasks_seed3" / "labels.csv").read_text().splitlines()
    assert labels[0] == "slide_id,patient_id,label,task,split"
    assert len(labels) - 1 == 2 * sum(pipeline.FEATURE_TASK_OPTIONS["parts"])
    results = json.loads((tmp_path / "finetune" / "results.json").read_text())
    assert results["tasks"] == ["t0", "t1"] and results["seed"] == 3


def test_bad_paths_are_refused(pipeline: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        pipeline.run([str(tmp_path / "only_out")])
    with pytest.raises(SystemExit):
        pipeline.run(["--synthetic", "6", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        pipeline.run(["--synthetic", "6", "--feature-tasks", "2", str(tmp_path / "a")])
