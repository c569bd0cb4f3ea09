"""A synthetic regression cohort for WeakSTIL-style training: a slide score that is the mean of
a tile quantity over one tissue class, with the tile truth to score tile predictions against.

Made independently of the tests' stroma cohort so a recipe cannot fit one generator's quirks:

- tissue: ``n_classes`` classes, each a Gaussian cloud around its own random centre; the
  *relevant* class (index 0) covers a fraction of each slide drawn from ``relevant_fraction``
  (a few percent to most of the slide), the rest is spread over the other classes at random;
- tile value: every relevant tile carries ``v`` in [0, 1] (the slide's level plus tile-to-tile
  spread, clipped), written into the features through a smooth non-linear map onto two random
  directions (``v`` and ``cos(pi v)``), so no single feature axis holds it;
- a distractor: the tiles of class 1 vary along the same directions with values that have
  nothing to do with the target, so a model must find the relevant class to read ``v``;
- raw scale: each feature dimension is finally scaled and offset at random (log-uniform scales
  0.1-10, offsets up to +-20), as raw encoder outputs are, so unstandardised inputs show;
- target: ``100 x`` the mean ``v`` over the slide's relevant tiles (a percentage).

Files hold ``features`` (float32) and ``coords`` only, the minimal layout any user's bags have.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from milkit.errors import ConfigError

RELEVANT, DISTRACTOR = 0, 1


@dataclass(frozen=True)
class ScoreCohort:
    """Where a synthetic score cohort was written and its truth.

    Attributes:
        features_dir: ``<slide_id>.h5`` with ``features`` (N, D) and ``coords`` (N, 2).
        labels_csv: ``slide_id,patient_id,score`` with scores in percent.
        scores: The target of each slide, in percent.
        tile_classes: ``(N,)`` tissue class per slide (0: relevant, 1: distractor, ...).
        tile_values: ``(N,)`` true ``v`` per slide, NaN off the relevant class.
    """

    features_dir: Path
    labels_csv: Path
    scores: dict[str, float]
    tile_classes: dict[str, np.ndarray]
    tile_values: dict[str, np.ndarray]


def write_score_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 120,
    n_tiles: tuple[int, int] = (60, 160),
    feature_dim: int = 48,
    n_classes: int = 4,
    relevant_fraction: tuple[float, float] = (0.05, 0.6),
    value_spread: float = 0.15,
    noise: float = 1.0,
    seed: int = 0,
) -> ScoreCohort:
    """Write the cohort described in the module docstring.

    Args:
        out_dir: Output folder; gets ``features/`` and ``scores.csv``.
        n_slides: Number of slides (one per patient).
        n_tiles: Inclusive range of tiles per slide.
        feature_dim: Feature length D (at least ``n_classes + 2``).
        n_classes: Tissue classes (at least 3: relevant, distractor, one more).
        relevant_fraction: Range of the relevant class's share of a slide's tiles.
        value_spread: Standard deviation of tile values around their slide's level.
        noise: Standard deviation of the isotropic noise of every tile.
        seed: Random seed; the same seed writes the same cohort.

    Returns:
        The cohort and its truth.

    Raises:
        ConfigError: Sizes or ranges that cannot make a cohort.
    """
    low, high = relevant_fraction
    if n_classes < 3 or feature_dim < n_classes + 2 or n_slides < 2:
        raise ConfigError(
            f"need n_classes >= 3, feature_dim >= n_classes + 2 and n_slides >= 2; got "
            f"{n_classes}, {feature_dim}, {n_slides}."
        )
    if not 0 < low <= high < 1 or not 1 <= n_tiles[0] <= n_tiles[1]:
        raise ConfigError(f"bad relevant_fraction {relevant_fraction} or n_tiles {n_tiles}.")
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((feature_dim, n_classes + 2)))[0].T
    centres, value_direction, curve_direction = 4.0 * directions[:n_classes], *directions[-2:]
    scale = np.exp(rng.uniform(np.log(0.1), np.log(10.0), feature_dim))
    offset = rng.uniform(-20.0, 20.0, feature_dim)
    out_dir = Path(out_dir)
    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    scores, classes_of, values_of = {}, {}, {}
    for index in range(n_slides):
        slide_id = f"score_{index:03d}"
        n = int(rng.integers(n_tiles[0], n_tiles[1] + 1))
        fraction = rng.uniform(low, high)
        others = rng.dirichlet(np.ones(n_classes - 1)) * (1 - fraction)
        classes = rng.choice(n_classes, size=n, p=[fraction, *others])
        classes[0] = RELEVANT  # every slide has the class its score is defined over
        relevant = classes == RELEVANT
        level = rng.uniform(0.05, 0.95)
        values = np.full(n, np.nan)
        values[relevant] = np.clip(level + value_spread * rng.standard_normal(relevant.sum()), 0, 1)
        carried = np.where(relevant, values, 0.0)
        distractor = classes == DISTRACTOR
        carried[distractor] = rng.uniform(0, 1, distractor.sum())  # unrelated to the score
        varies = relevant | distractor
        features = centres[classes] + noise * rng.standard_normal((n, feature_dim))
        features[varies] += 3.0 * (carried[varies, None] - 0.5) * value_direction
        features[varies] += 1.5 * np.cos(np.pi * carried[varies, None]) * curve_direction
        features = features * scale + offset
        with h5py.File(features_dir / f"{slide_id}.h5", "w") as file:
            file["features"] = features.astype(np.float32)
            file["coords"] = np.stack([np.arange(n) % 32, np.arange(n) // 32], 1) * 256
        scores[slide_id] = float(100 * values[relevant].mean())
        classes_of[slide_id], values_of[slide_id] = classes, values
    labels_csv = out_dir / "scores.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "score"])
        writer.writerows((s, f"patient_{s}", f"{scores[s]:.4f}") for s in scores)
    return ScoreCohort(features_dir, labels_csv, scores, classes_of, values_of)
