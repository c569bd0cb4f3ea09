"""Synthetic cohorts: labels.csv, determinism, patients and tasks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from milkit.cli import main
from milkit.errors import ConfigError
from milkit.slides.reader import open_slide
from milkit.synth import LABEL_COLUMNS, load_truth, make_cohort, plan_cohort

SIZE_PX = (640, 512)


def read_labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done: list[int] = []
    labels = make_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=6, seed=7, size_px=SIZE_PX, progress=done.append
    )
    assert done == [1] * 6
    return labels


def test_labels_columns_and_values(cohort: Path) -> None:
    rows = read_labels(cohort)
    assert cohort.read_text().splitlines()[0] == ",".join(LABEL_COLUMNS)
    assert [r["slide_id"] for r in rows] == [f"slide_{i:03d}" for i in range(6)]
    for row in rows:
        assert row["label"] in ("tumor", "normal") and row["task"] in ("breast", "colon", "lung")
        fraction, stil = float(row["tumor_fraction"]), float(row["stil_score"])
        assert (0 < fraction <= 0.6) if row["label"] == "tumor" else fraction == 0
        assert 0 <= stil <= 100
        assert (cohort.parent / "slides" / f"{row['slide_id']}.svs").is_file()
    for task in ("breast", "colon", "lung"):  # both labels in every task
        assert {r["label"] for r in rows if r["task"] == task} == {"tumor", "normal"}


def test_scores_match_the_truth_maps(cohort: Path) -> None:
    for row in read_labels(cohort):
        truth = load_truth(cohort.parent / "truth" / f"{row['slide_id']}.h5")
        stroma = np.isin(truth.class_map, (1, 3))
        assert float(row["stil_score"]) == pytest.approx(
            100 * truth.til_density[stroma].mean(), abs=0.006
        )
        tissue = np.isin(truth.class_map, (1, 2, 3)).sum()
        assert float(row["tumor_fraction"]) == pytest.approx(
            (truth.class_map == 2).sum() / tissue, abs=6e-5
        )
        assert truth.attrs["slide_id"] == row["slide_id"] and truth.attrs["task"] == row["task"]
        assert truth.downsample == pytest.approx(8.0 / 0.5) and truth.mpp == 8.0


def test_same_seed_same_bytes_other_seed_other_slides(cohort: Path, tmp_path: Path) -> None:
    again = make_cohort(tmp_path / "again", n_slides=6, seed=7, size_px=SIZE_PX, workers=2)
    assert again.read_bytes() == cohort.read_bytes()
    for name in ("slide_000.svs", "slide_003.svs"):
        with (
            open_slide(cohort.parent / "slides" / name) as a,
            open_slide(again.parent / "slides" / name) as b,
        ):
            np.testing.assert_array_equal(a.read_level(0), b.read_level(0))
    other = make_cohort(tmp_path / "other", n_slides=2, seed=8, size_px=SIZE_PX)
    with (
        open_slide(cohort.parent / "slides" / "slide_000.svs") as a,
        open_slide(other.parent / "slides" / "slide_000.svs") as b,
    ):
        assert np.abs(a.read_level(0).astype(int) - b.read_level(0).astype(int)).mean() > 5


def test_plan_pairs_patients_and_balances_tasks() -> None:
    plan = plan_cohort(30, seed=1, tasks=("breast", "colon", "lung"), artefacts=True)
    assert [s.params.task for s in plan[:4]] == ["breast", "colon", "lung", "breast"]
    slides_per_patient: dict[str, list[int]] = {}
    for i, slide in enumerate(plan):
        slides_per_patient.setdefault(slide.patient_id, []).append(i)
    pairs = [ids for ids in slides_per_patient.values() if len(ids) == 2]
    assert pairs and max(len(ids) for ids in slides_per_patient.values()) == 2
    for first, second in pairs:  # a patient's slides share organ and label
        assert plan[first].params.task == plan[second].params.task
        assert plan[first].params.tumor == plan[second].params.tumor
    for task in ("breast", "colon", "lung"):
        assert sum(s.params.tumor for s in plan if s.params.task == task) == 5
    assert len({s.params.seed for s in plan}) == 30
    assert plan == plan_cohort(30, seed=1, tasks=("breast", "colon", "lung"), artefacts=True)


def test_stain_spread_reaches_every_slide_and_bad_values_stop_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = plan_cohort(6, seed=1, tasks=("breast",), artefacts=False, stain_spread=0.5)
    assert {s.params.stain_spread for s in plan} == {0.5}
    same = plan_cohort(6, seed=1, tasks=("breast",), artefacts=False)
    assert [s.params.seed for s in same] == [s.params.seed for s in plan]  # only staining differs
    assert main(["synth", str(tmp_path / "out"), "--stain-spread", "1.5"]) == 2
    assert "stain_spread must be in [0, 0.9], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any slide is written


def test_bad_cohort_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown synthetic task 'liver'"):
        make_cohort(tmp_path, n_slides=2, tasks=("breast", "liver"))
    with pytest.raises(ConfigError, match="n_slides must be positive"):
        make_cohort(tmp_path, n_slides=0)
    assert not list(tmp_path.iterdir())
