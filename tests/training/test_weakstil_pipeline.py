"""``pipelines/weakstil.py``: slides + slide scores -> features -> cross-validation -> heatmaps."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from milkit.synth import make_cohort
from milkit.training.prediction_file import read_predictions

PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "weakstil.py"


@pytest.fixture(scope="module")
def pipeline(load_pipeline: Callable[[str], ModuleType]) -> ModuleType:
    return load_pipeline("weakstil")


def test_help_documents_the_options() -> None:
    result = subprocess.run(
        [sys.executable, str(PIPELINE), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("slides_dir", "scores_csv", "--target", "--pooling", "--tile-subset", "`--`"):
        assert option in result.stdout


def test_stage_arguments_follow_the_options(pipeline: ModuleType, tmp_path: Path) -> None:
    argv = [str(tmp_path / "slides"), str(tmp_path / "s.csv"), str(tmp_path / "out")]
    args = pipeline.build_parser().parse_args(
        [
            *argv,
            "--pooling",
            "mean",
            "--tile-subset",
            "tumor_bed",
            "--mpp",
            "1.0",
            "--random-weights",
        ]
    )
    cv = pipeline.cv_argv(args, ["--trainer.max_epochs", "3"])
    assert (
        cv[cv.index("--config") + 1] == str(pipeline.EXPERIMENT) and pipeline.EXPERIMENT.is_file()
    )
    assert cv[cv.index("--model.model.init_args.pooling") + 1] == "mean"
    assert cv[cv.index("--data.tile_subset") + 1] == "tumor_bed"
    assert cv[cv.index("--data.features_dir") + 1] == str(tmp_path / "out/preprocessed/features")
    assert cv[-2:] == ["--trainer.max_epochs", "3"]  # given last, so they override
    pre = pipeline.preprocess_argv(args)
    assert pre[:3] == ["preprocess", argv[0], str(tmp_path / "out/preprocessed")]
    assert pre[pre.index("--mpp") + 1] == "1.0" and "--random-weights" in pre


@pytest.mark.slow
def test_the_whole_flow_on_synthetic_slides(
    pipeline: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = make_cohort(tmp_path / "cohort", n_slides=8, size_px=(2000, 2000), artefacts=False)
    out = tmp_path / "run"
    argv = [
        str(tmp_path / "cohort" / "slides"), str(labels), str(out),
        "--mpp", "1.0", "--tile-size", "96", "--encoder", "test_vit", "--random-weights",
        "--folds", "2",
        # 4 training slides per fold: half of them validate (R² needs two).
        "--", "--trainer.max_epochs", "2", "--data.num_workers", "0", "--data.val_fraction", "0.5",
        "--model.model.init_args.hidden_dim", "16",
    ]  # fmt: skip
    assert pipeline.run(argv) == 0
    printed = capsys.readouterr().out
    assert "slide-level results over folds" in printed and "r2" in printed

    summary = json.loads((out / "cv" / "cv_summary.json").read_text())
    assert summary["metrics"]["r2"]["n"] == 2
    with open(labels, newline="") as handle:
        slide_ids = sorted(row["slide_id"] for row in csv.DictReader(handle))
    predicted = sorted(p.stem for p in (out / "cv").glob("repeat0/fold*/predictions/*.h5"))
    assert predicted == slide_ids  # every slide held out once
    for path in (out / "cv").glob("repeat0/fold*/predictions/*.h5"):
        heatmaps = path.parent.parent / "heatmaps" / path.stem
        assert any(heatmaps.glob("score*.png")), f"no score heatmap in {heatmaps}"
        assert read_predictions(path).values("score").units == "% TILs"

    assert pipeline.run(argv) == 0  # finished stages are reused
    assert "reusing the cross-validation" in capsys.readouterr().out
