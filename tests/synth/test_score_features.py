"""The synthetic score cohort: percent targets from the relevant class's tiles, raw-scale features."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.errors import ConfigError
from milkit.synth.score_features import DISTRACTOR, RELEVANT, write_score_cohort


def test_targets_are_the_percent_mean_of_relevant_tile_values(tmp_path: Path) -> None:
    cohort = write_score_cohort(tmp_path, n_slides=30, seed=2)
    rows = cohort.labels_csv.read_text().splitlines()
    assert rows[0] == "slide_id,patient_id,score" and len(rows) == 31
    fractions = []
    for slide_id, score in cohort.scores.items():
        classes, values = cohort.tile_classes[slide_id], cohort.tile_values[slide_id]
        relevant = classes == RELEVANT
        assert (
            np.isnan(values[~relevant]).all()
            and ((values[relevant] >= 0) & (values[relevant] <= 1)).all()
        )
        assert score == pytest.approx(100 * values[relevant].mean())
        fractions.append(relevant.mean())
        with h5py.File(cohort.features_dir / f"{slide_id}.h5") as file:
            assert file["features"].shape == (len(classes), 48)
            assert file["coords"].shape == (len(classes), 2)
    assert min(fractions) < 0.15 and max(fractions) > 0.45  # the relevant share varies widely
    assert 0 <= min(cohort.scores.values()) and max(cohort.scores.values()) <= 100


def test_features_are_raw_scale_and_no_single_axis_holds_the_value(tmp_path: Path) -> None:
    cohort = write_score_cohort(tmp_path, n_slides=40, seed=3)
    features, values, distractor = [], [], []
    for slide_id in cohort.scores:
        with h5py.File(cohort.features_dir / f"{slide_id}.h5") as file:
            x = file["features"][()]
        classes = cohort.tile_classes[slide_id]
        features.append(x[classes == RELEVANT])
        values.append(cohort.tile_values[slide_id][classes == RELEVANT])
        distractor.append((classes == DISTRACTOR).sum())
    x, v = np.concatenate(features), np.concatenate(values)
    spread = x.std(0)
    assert spread.max() / spread.min() > 20  # dimensions on very different scales
    correlations = np.abs([np.corrcoef(x[:, d], v)[0, 1] for d in range(x.shape[1])])
    assert correlations.max() < 0.7  # the value is spread over several axes
    assert sum(distractor) > 0


def test_same_seed_same_cohort_and_bad_sizes_refused(tmp_path: Path) -> None:
    first = write_score_cohort(tmp_path / "a", n_slides=5, seed=7)
    again = write_score_cohort(tmp_path / "b", n_slides=5, seed=7)
    assert first.scores == again.scores
    with pytest.raises(ConfigError, match="n_classes >= 3"):
        write_score_cohort(tmp_path / "c", n_classes=2)
    with pytest.raises(ConfigError, match="relevant_fraction"):
        write_score_cohort(tmp_path / "d", relevant_fraction=(0.5, 0.2))
