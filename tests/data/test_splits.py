"""Splits: patients never cut, classes stratified, deterministic given the seed."""

from __future__ import annotations

import numpy as np
import pytest

from milkit.data.splits import make_split, quantile_strata, stratified_group_folds
from milkit.errors import ConfigError


def _cohort(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """90 slides of 40 patients (1-4 slides each), ~1/3 positive patients."""
    rng = np.random.default_rng(seed)
    groups, strata = [], []
    for patient in range(40):
        label = "pos" if rng.random() < 0.35 else "neg"
        for _ in range(rng.integers(1, 5)):
            groups.append(f"p{patient}")
            strata.append(label)
    return np.array(strata), np.array(groups)


def test_folds_never_cut_a_patient_and_are_stratified() -> None:
    strata, groups = _cohort()
    folds = stratified_group_folds(strata, groups, 5, seed=3)
    for group in set(groups):
        assert len(set(folds[groups == group])) == 1
    overall = np.mean(strata == "pos")
    for fold in range(5):
        in_fold = folds == fold
        assert 0.1 * len(strata) < in_fold.sum() < 0.3 * len(strata)
        assert abs(np.mean(strata[in_fold] == "pos") - overall) < 0.15


def test_folds_are_deterministic_given_the_seed() -> None:
    strata, groups = _cohort()
    first = stratified_group_folds(strata, groups, 4, seed=7)
    assert np.array_equal(first, stratified_group_folds(strata, groups, 4, seed=7))
    assert not np.array_equal(first, stratified_group_folds(strata, groups, 4, seed=8))


def test_generated_split_parts_are_disjoint_grouped_and_cover_all() -> None:
    strata, groups = _cohort()
    split = make_split(strata, groups, fold=2, n_folds=5, val_fraction=0.25, seed=1)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(strata)
    assert set().union(*parts) == set(range(len(strata)))
    patient_sets = [set(groups[list(p)]) for p in parts]
    assert not (patient_sets[0] & patient_sets[1] or patient_sets[0] & patient_sets[2])
    assert not patient_sets[1] & patient_sets[2]
    assert 0.15 < len(split.val) / (len(split.train) + len(split.val)) < 0.35
    assert {"pos", "neg"} <= set(strata[split.val])


def test_every_row_is_tested_exactly_once_over_the_folds() -> None:
    strata, groups = _cohort()
    tested = np.concatenate(
        [
            make_split(strata, groups, fold=k, n_folds=4, val_fraction=0.2, seed=5).test
            for k in range(4)
        ]
    )
    assert sorted(tested.tolist()) == list(range(len(strata)))


def test_fold_column_defines_the_test_part() -> None:
    strata = np.array(["a", "b"] * 6)
    groups = np.array([f"p{i}" for i in range(12)])
    given = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    split = make_split(strata, groups, fold=2, n_folds=5, val_fraction=0.25, seed=0, folds=given)
    assert split.test.tolist() == [4, 5, 6, 7]
    assert len(split.val) == 2 and not set(split.val) & set(split.test)
    with pytest.raises(
        ConfigError, match=r"fold 0 is not in the labels CSV's fold column \(it has \[1, 2, 3\]\)"
    ):
        make_split(strata, groups, fold=0, n_folds=5, val_fraction=0.2, seed=0, folds=given)


def test_split_column_is_used_as_given() -> None:
    strata = np.array(["a", "b", "a", "b", "a", "b"])
    groups = np.array(["p0", "p1", "p2", "p3", "p4", "p5"])
    given = ["train", "train", "val", "test", "train", "train"]
    split = make_split(strata, groups, fold=0, n_folds=5, val_fraction=0.2, seed=0, splits=given)
    assert split.train.tolist() == [0, 1, 4, 5]
    assert split.val.tolist() == [2] and split.test.tolist() == [3]
    without_val = ["train", "train", "train", "test", "train", "train"]
    carved = make_split(
        strata, groups, fold=0, n_folds=5, val_fraction=0.2, seed=0, splits=without_val
    )
    assert len(carved.val) >= 1 and carved.test.tolist() == [3]


def test_regression_strata_are_quantile_bins() -> None:
    bins = quantile_strata(np.arange(100.0), 4)
    assert np.bincount(bins).tolist() == [25, 25, 25, 25]
    assert len(set(quantile_strata([1.0, 1.0, 1.0], 4).tolist())) == 1  # one stratum


def test_bad_options_raise() -> None:
    strata, groups = _cohort()
    with pytest.raises(ConfigError, match="n_folds must be at least 2"):
        stratified_group_folds(strata, groups, 1, seed=0)
    with pytest.raises(ConfigError, match=r"fold must be in \[0, 5\)"):
        make_split(strata, groups, fold=5, n_folds=5, val_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        make_split(strata, groups, fold=0, n_folds=5, val_fraction=0.8, seed=0)
