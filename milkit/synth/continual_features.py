"""Synthetic continual MIL tasks on tile features, with tile truth (tests, demo, benchmarks).

Task ``t`` has its own background shift ``b_t`` and positive direction ``d_t`` (random, of
lengths ``background`` and 1). A tile is ``b_t + ε`` with ``ε ~ N(0, I)``; a positive slide
holds a few *witness* tiles shifted by ``shift · d_t``, a negative slide none. Labels are
``"<task>_negative"`` and ``"<task>_positive"`` (new classes in every task), and every file
holds ``features``, ``coords`` and ``tile_labels`` (1 on witnesses), the tile truth that
:mod:`milkit.training.continual.metrics` scores localisation against.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from milkit.errors import ConfigError

_GRID_COLUMNS = 32
_TILE_SIZE_LEVEL0 = 256


@dataclass(frozen=True)
class FeatureTasks:
    """Where the tasks were written.

    Attributes:
        features_dir: Folder of ``<slide_id>.h5`` files.
        labels_csv: ``slide_id,patient_id,label,task,split``.
        tasks: Task names in order.
    """

    features_dir: Path
    labels_csv: Path
    tasks: tuple[str, ...]


def write_feature_tasks(
    out_dir: str | Path,
    *,
    n_tasks: int = 4,
    parts: tuple[int, int, int] = (40, 12, 24),
    n_tiles: tuple[int, int] = (20, 40),
    witness_fraction: tuple[float, float] = (0.05, 0.15),
    feature_dim: int = 16,
    shift: float = 3.0,
    background: float = 2.0,
    seed: int = 0,
) -> FeatureTasks:
    """Write ``n_tasks`` tasks of Gaussian bags with witness tiles, and one labels CSV.

    Args:
        out_dir: Output folder; gets ``features/`` and ``labels.csv``.
        n_tasks: Number of tasks (named ``t0``, ``t1``, ...).
        parts: Slides per task in train, val and test (half of each positive, rounded down).
        n_tiles: Inclusive range of tiles per slide.
        witness_fraction: Range of the fraction of witness tiles in a positive slide (at
            least one witness).
        feature_dim: Feature length D.
        shift: Witness shift along the task's direction, in noise standard deviations.
        background: Length of each task's background shift.
        seed: Random seed.

    Returns:
        The paths and task names.

    Raises:
        ConfigError: Sizes that cannot make two classes in every part.
    """
    if n_tasks < 1 or min(parts) < 2 or not 0 < n_tiles[0] <= n_tiles[1] <= _GRID_COLUMNS**2:
        raise ConfigError(
            f"need n_tasks >= 1, >= 2 slides per part and 0 < min tiles <= max tiles <= "
            f"{_GRID_COLUMNS**2}; got "
            f"{n_tasks}, {parts}, {n_tiles}."
        )
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    names = tuple(f"t{t}" for t in range(n_tasks))
    for task in names:
        offset = rng.standard_normal(feature_dim)
        offset *= background / np.linalg.norm(offset)
        direction = rng.standard_normal(feature_dim)
        direction /= np.linalg.norm(direction)
        for part, count in zip(("train", "val", "test"), parts, strict=True):
            for index in range(count):
                slide_id = f"{task}_{part}_{index:03d}"
                positive = index % 2 == 1
                _write_bag(
                    features_dir / f"{slide_id}.h5",
                    rng,
                    int(rng.integers(n_tiles[0], n_tiles[1] + 1)),
                    offset,
                    direction * shift if positive else None,
                    witness_fraction,
                )
                label = f"{task}_{'positive' if positive else 'negative'}"
                rows.append((slide_id, f"patient_{slide_id}", label, task, part))
    labels_csv = out_dir / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label", "task", "split"])
        writer.writerows(rows)
    return FeatureTasks(features_dir, labels_csv, names)


def _write_bag(
    path: Path,
    rng: np.random.Generator,
    n: int,
    offset: np.ndarray,
    witness_shift: np.ndarray | None,
    witness_fraction: tuple[float, float],
) -> None:
    """One slide: ``n`` tiles around ``offset``, witnesses shifted when ``witness_shift``."""
    features = rng.standard_normal((n, len(offset))) + offset
    truth = np.zeros(n, dtype=np.uint8)
    if witness_shift is not None:
        fraction = rng.uniform(*witness_fraction)
        chosen = rng.choice(n, size=max(1, round(fraction * n)), replace=False)
        truth[chosen] = 1
        features[chosen] += witness_shift
    cells = rng.permutation(_GRID_COLUMNS * _GRID_COLUMNS)[:n]
    coords = np.stack([cells % _GRID_COLUMNS, cells // _GRID_COLUMNS], axis=1) * _TILE_SIZE_LEVEL0
    with h5py.File(path, "w") as file:
        file.create_dataset("features", data=features.astype(np.float32))
        file.create_dataset("coords", data=coords.astype(np.int64))
        file.create_dataset("tile_labels", data=truth)
