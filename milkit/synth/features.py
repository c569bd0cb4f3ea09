"""A synthetic MIL feature cohort with known witness tiles (tests, benchmarks, demo).

Bags of Gaussian tile features; a positive bag holds a few *witness* tiles shifted along one
hidden direction, a negative bag none. The files hold only ``features`` and ``coords`` (the
minimal CLAM-style layout), as bags that never came from a slide would. The witness mask of
every bag is returned, so attention can be scored against it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from milkit.errors import ConfigError

_GRID_COLUMNS = 64
_TILE_SIZE_LEVEL0 = 256


@dataclass(frozen=True)
class WitnessCohort:
    """Where a synthetic cohort was written and its ground truth.

    Attributes:
        features_dir: Folder of ``<slide_id>.h5`` feature files.
        labels_csv: ``slide_id,patient_id,label`` with labels ``negative``/``positive``.
        labels: Label of each slide.
        witnesses: ``(N,)`` bool per slide, True for witness tiles.
    """

    features_dir: Path
    labels_csv: Path
    labels: dict[str, str]
    witnesses: dict[str, np.ndarray]


def write_witness_cohort(
    out_dir: str | Path,
    *,
    n_bags: int = 40,
    n_tiles: tuple[int, int] = (30, 60),
    feature_dim: int = 32,
    n_witnesses: tuple[int, int] = (2, 6),
    shift: float = 3.0,
    positive_fraction: float = 0.5,
    slides_per_patient: int = 1,
    dtype: str = "float16",
    seed: int = 0,
) -> WitnessCohort:
    """Write Gaussian bags with shifted witness tiles in positives, and their labels CSV.

    Args:
        out_dir: Output folder; gets ``features/`` and ``labels.csv``.
        n_bags: Number of bags (slides).
        n_tiles: Inclusive range of tiles per bag.
        feature_dim: Feature length D.
        n_witnesses: Inclusive range of witness tiles per positive bag.
        shift: Length of the witness shift, in units of the noise's standard deviation.
        positive_fraction: Fraction of positive bags (rounded; at least one of each class).
        slides_per_patient: Consecutive slides sharing a patient id (and its label).
        dtype: Stored feature type, ``"float16"`` or ``"float32"``.
        seed: Random seed.

    Returns:
        The cohort's paths and ground truth.

    Raises:
        ConfigError: Sizes that cannot make a cohort with both classes.
    """
    if n_bags < 2 or not 0 < n_witnesses[0] <= n_witnesses[1] <= n_tiles[0]:
        raise ConfigError(
            f"need n_bags >= 2 and 0 < witnesses <= tiles; got {n_bags}, {n_witnesses}, {n_tiles}."
        )
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(feature_dim)
    direction /= np.linalg.norm(direction)
    n_patients = -(-n_bags // slides_per_patient)
    n_positive = min(max(round(n_patients * positive_fraction), 1), n_patients - 1)
    patient_positive = rng.permutation(np.arange(n_patients) < n_positive)
    features_dir = Path(out_dir) / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, str] = {}
    witnesses: dict[str, np.ndarray] = {}
    rows = []
    for index in range(n_bags):
        patient = index // slides_per_patient
        slide_id = f"slide_{index:04d}"
        n = int(rng.integers(n_tiles[0], n_tiles[1] + 1))
        features = rng.standard_normal((n, feature_dim))
        witness = np.zeros(n, dtype=bool)
        if patient_positive[patient]:
            k = int(rng.integers(n_witnesses[0], n_witnesses[1] + 1))
            witness[rng.choice(n, size=k, replace=False)] = True
            features[witness] += shift * direction
        cells = np.arange(n)
        coords = np.stack([cells % _GRID_COLUMNS, cells // _GRID_COLUMNS], axis=1)
        with h5py.File(features_dir / f"{slide_id}.h5", "w") as file:
            file.create_dataset("features", data=features.astype(dtype))
            file.create_dataset("coords", data=(coords * _TILE_SIZE_LEVEL0).astype(np.int64))
        labels[slide_id] = "positive" if patient_positive[patient] else "negative"
        witnesses[slide_id] = witness
        rows.append((slide_id, f"patient_{patient:04d}", labels[slide_id]))
    labels_csv = Path(out_dir) / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label"])
        writer.writerows(rows)
    return WitnessCohort(features_dir, labels_csv, labels, witnesses)
