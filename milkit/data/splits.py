"""Train/validation/test splits that never cut a patient (docs/papers.md E).

Splits come from a ``split`` column, from a ``fold`` column, or are generated: a stratified
k-fold over patients (every patient's slides land in one fold, and each fold's class mix
follows the cohort's), with the validation part carved out of the training folds the same way.
Everything is deterministic given the seed. Written with numpy alone (no scikit-learn).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from milkit.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Indices of the rows in each part.

    Attributes:
        train: ``(n_train,)`` int64 row indices, sorted.
        val: ``(n_val,)`` int64 row indices, sorted.
        test: ``(n_test,)`` int64 row indices, sorted.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_group_folds(
    strata: Sequence[Hashable] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    n_folds: int,
    *,
    seed: int,
) -> np.ndarray:
    """Assign rows to folds: whole groups (patients) per fold, strata (classes) balanced.

    Groups are shuffled with ``seed``, ordered largest first, and each goes to the fold where
    the per-stratum fold fractions end up most even (ties: the fold with fewest rows, then the
    lowest index). A group with mixed strata counts towards each of them.

    Args:
        strata: ``(n,)`` stratum of each row (class name, or a target bin for regression).
        groups: ``(n,)`` group of each row (patient id).
        n_folds: Number of folds K >= 2.
        seed: Random seed; the same seed gives the same folds.

    Returns:
        ``(n,)`` int64 fold index in ``[0, K)`` of each row.

    Raises:
        ConfigError: If ``n_folds < 2`` or the inputs differ in length.
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, got {n_folds}.")
    if len(strata) != len(groups):
        raise ConfigError(f"{len(strata)} strata for {len(groups)} groups.")
    _, stratum_of = np.unique(np.asarray(strata, dtype=str), return_inverse=True)
    group_names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    counts = np.zeros((len(group_names), stratum_of.max(initial=-1) + 1))
    np.add.at(counts, (group_of, stratum_of), 1.0)
    totals = counts.sum(axis=0)
    order = np.random.default_rng(seed).permutation(len(group_names))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    fold_counts = np.zeros((n_folds, counts.shape[1]))
    fold_of_group = np.empty(len(group_names), dtype=np.int64)
    for group in order:
        fractions = fold_counts / totals
        candidates = (fold_counts + counts[group]) / totals  # row f: fold f after taking it
        costs = np.empty(n_folds)
        for fold in range(n_folds):
            trial = fractions.copy()
            trial[fold] = candidates[fold]
            costs[fold] = trial.std(axis=0).sum()
        sizes = fold_counts.sum(axis=1)
        # .round(9): the rounding round() does on a numpy float, in a form numpy types.
        best = min(range(n_folds), key=lambda f: (costs[f].round(9), sizes[f], f))
        fold_counts[best] += counts[group]
        fold_of_group[group] = best
    return fold_of_group[group_of]


def quantile_strata(values: Sequence[float], n_bins: int) -> np.ndarray:
    """Bin numeric targets by quantile, so regression folds get similar target ranges.

    Args:
        values: ``(n,)`` numbers.
        n_bins: Number of bins (fewer when values repeat).

    Returns:
        ``(n,)`` int64 bin index.
    """
    array = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(array, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, array, side="right").astype(np.int64)


def make_split(
    strata: Sequence[Hashable] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    *,
    fold: int,
    n_folds: int,
    val_fraction: float,
    seed: int,
    folds: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
) -> Split:
    """The train/val/test rows of one fold.

    Precedence: ``splits`` (a ``split`` column: used as is; a validation part is carved from
    ``train`` only when no row says ``val``), then ``folds`` (a ``fold`` column: fold ``fold``
    is the test part), then generated folds (:func:`stratified_group_folds` with ``seed``).
    The validation part is about ``val_fraction`` of the training rows, grouped and stratified.

    Args:
        strata: ``(n,)`` stratum per row.
        groups: ``(n,)`` patient per row.
        fold: Index of the test fold.
        n_folds: Number of generated folds (ignored with ``folds`` or ``splits``).
        val_fraction: Fraction of the training rows to validate on, in [0, 0.5]; 0 for none.
        seed: Seed of the generated folds and of the validation carve-out.
        folds: ``(n,)`` given fold per row, or None.
        splits: ``(n,)`` given ``"train"``/``"val"``/``"test"`` per row, or None.

    Returns:
        The split.

    Raises:
        ConfigError: Bad ``fold``, ``n_folds`` or ``val_fraction``.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in [0, 0.5], got {val_fraction}.")
    strata_array = np.asarray(strata, dtype=str)
    group_array = np.asarray(groups, dtype=str)
    rows = np.arange(len(strata_array))
    if splits is not None:
        split_array = np.asarray(splits, dtype=str)
        test, train = rows[split_array == "test"], rows[split_array == "train"]
        val = rows[split_array == "val"]
        if len(val):
            return Split(train, val, test)
    else:
        if folds is not None:
            fold_array = np.asarray(folds, dtype=np.int64)
            available = sorted(set(fold_array.tolist()))
            if fold not in available:
                raise ConfigError(
                    f"fold {fold} is not in the labels CSV's fold column (it has {available})."
                )
        else:
            if not 0 <= fold < n_folds:
                raise ConfigError(f"fold must be in [0, {n_folds}), got {fold}.")
            fold_array = stratified_group_folds(strata_array, group_array, n_folds, seed=seed)
        test, train = rows[fold_array == fold], rows[fold_array != fold]
    if val_fraction == 0 or len(train) == 0:
        return Split(train, np.empty(0, np.int64), test)
    n_parts = max(2, round(1.0 / val_fraction))
    # The carve-out's own seed differs per test fold, so folds do not share a pattern.
    part = stratified_group_folds(
        strata_array[train], group_array[train], n_parts, seed=seed * 1_000_003 + fold + 1
    )
    return Split(train[part != 0], train[part == 0], test)
