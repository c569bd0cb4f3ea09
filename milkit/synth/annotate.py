"""Tile truth of a synthetic cohort, attached to its feature files and used to score tile outputs.

Feature files of synthetic slides can carry their tiles' ground truth beside the features, so
training code that scores localisation (tile AUROC, Dice) finds it without knowing about
:mod:`milkit.synth`:

- ``tile_labels`` (N,) uint8: 1 where the tile is mostly tumour (tumour fraction >= 0.5);
- ``tile_tumor_fraction`` (N,) float32;
- ``tile_til_density`` (N,) float32: mean lymphocyte density over the tile's stroma, in [0, 1]
  (NaN where the tile holds no stroma);
- ``tile_class`` (N,) uint8: the majority class (:data:`milkit.synth.CLASS_NAMES`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from milkit.atomic import atomic_write
from milkit.errors import FeatureFileError
from milkit.features.h5 import file_status
from milkit.features.tile_file import read_coords
from milkit.synth.truth import load_truth, tile_truth

TRUTH_DATASETS = ("tile_labels", "tile_tumor_fraction", "tile_til_density", "tile_class")


def annotate_feature_files(
    features_dir: str | Path, truth_dir: str | Path, *, tumor_threshold: float = 0.5
) -> list[Path]:
    """Add the tile truth datasets to every finished feature file with a truth map.

    Each file is rewritten atomically (copy, add, rename), so a crash leaves the old file.

    Args:
        features_dir: Folder of ``<slide_id>.h5`` feature files.
        truth_dir: Folder of ``<slide_id>.h5`` truth maps from :func:`milkit.synth.make_cohort`.
        tumor_threshold: Tumour fraction from which a tile counts as tumour.

    Returns:
        The files annotated.
    """
    annotated = []
    for path in sorted(Path(features_dir).glob("*.h5")):
        truth_path = Path(truth_dir) / path.name
        if not truth_path.is_file() or file_status(path) != "complete":
            continue
        coords = read_coords(path)
        if coords.tile_size_level0 is None:
            raise FeatureFileError(f"{path}: no tile size in the file; cannot derive tile truth.")
        truth = tile_truth(load_truth(truth_path), coords.coords, coords.tile_size_level0)
        values = {
            "tile_labels": (truth.tumor_fraction >= tumor_threshold).astype(np.uint8),
            "tile_tumor_fraction": truth.tumor_fraction.astype(np.float32),
            "tile_til_density": truth.til_density.astype(np.float32),
            "tile_class": truth.majority_class.astype(np.uint8),
        }
        with atomic_write(path) as tmp:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as file:
                for name, array in values.items():
                    if name in file:
                        del file[name]
                    file.create_dataset(name, data=array)
        annotated.append(path)
    return annotated


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half); NaN when only one class is present.

    Args:
        scores: ``(N,)`` higher means more positive.
        labels: ``(N,)`` 0/1.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based), then the Mann-Whitney U statistic.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def read_tile_truth(path: str | Path) -> dict[str, np.ndarray]:
    """The tile truth datasets of an annotated feature file (missing ones left out)."""
    with h5py.File(path, "r") as file:
        return {name: file[name][()] for name in TRUTH_DATASETS if name in file}
