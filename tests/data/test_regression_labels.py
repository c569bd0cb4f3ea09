"""Regression cohorts: bad slide scores and tile subsets are reported, with every row, before
anything trains; a tile subset (e.g. the tumour bed) is all a bag is made of."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.data.bags import BagDataset, probe_bag
from milkit.data.datamodule import MILDataModule
from milkit.errors import FeatureFileError, LabelsError

N_TILES = 8
DIM = 4


def _bag(folder: Path, slide_id: str, subset: np.ndarray | None = None, seed: int = 0) -> Path:
    """A CLAM-style feature file with ``N_TILES`` tiles and, optionally, ``tumor_bed``."""
    rng = np.random.default_rng(seed)
    path = folder / f"{slide_id}.h5"
    with h5py.File(path, "w") as file:
        file["features"] = rng.standard_normal((N_TILES, DIM)).astype(np.float32)
        file["coords"] = np.stack([np.arange(N_TILES) * 256, np.zeros(N_TILES)], 1).astype(np.int64)
        if subset is not None:
            file["tumor_bed"] = subset
    return path


def _cohort(tmp_path: Path, scores: list[str], subsets: list[np.ndarray | None]) -> MILDataModule:
    features = tmp_path / "features"
    features.mkdir()
    lines = ["slide_id,stil_score"]
    for index, (score, subset) in enumerate(zip(scores, subsets, strict=True)):
        _bag(features, f"s{index}", subset, seed=index)
        lines.append(f"s{index},{score}")
    labels = tmp_path / "scores.csv"
    labels.write_text("\n".join(lines) + "\n")
    return MILDataModule(
        features, labels, target="stil_score", task="regression", target_scale=100.0,
        tile_subset="tumor_bed" if any(s is not None for s in subsets) else None,
    )  # fmt: skip


def test_bad_slide_scores_are_listed_by_line_before_training(tmp_path: Path) -> None:
    scores = ["12.5", "lots", "NaN", "", "-5", "100.1", "inf", "0", "100"]
    data = _cohort(tmp_path, scores, [None] * len(scores))
    with pytest.raises(LabelsError) as info:
        data.setup("fit")
    message = str(info.value)
    assert "6 problem(s)" in message
    assert "line 3: slide 's1': target 'lots' is not a number in column 'stil_score'" in message
    assert "line 4: slide 's2': missing target ('NaN' reads as no value)" in message
    assert "line 5: slide 's3': missing target in column" in message
    assert "line 6: slide 's4': target -5 is outside [0, 100]" in message
    assert "line 7: slide 's5': target 100.1 is outside [0, 100]" in message
    assert "--data.target_scale" in message
    assert "line 8: slide 's6': target 'inf' is not finite" in message
    for good in (2, 9, 10):  # 12.5, 0 and 100 are in range
        assert f"line {good}:" not in message


def test_scores_in_range_give_float_targets_in_units(tmp_path: Path) -> None:
    data = _cohort(tmp_path, ["0", "37.5", "100"], [None] * 3)
    assert data.cohort.targets() == [0.0, 37.5, 100.0]
    assert data.n_classes == 1 and data.class_names is None


def test_tile_subset_problems_are_listed_for_every_slide(tmp_path: Path) -> None:
    half = np.arange(N_TILES) < N_TILES // 2
    subsets = [
        half,  # fine
        np.zeros(N_TILES, dtype=bool),  # empty
        None,  # missing
        np.ones(N_TILES - 1, dtype=bool),  # wrong length
        np.full(N_TILES, 0.5, dtype=np.float32),  # not a mask
        np.zeros(N_TILES, dtype=np.uint8),  # empty, as 0/1 integers
    ]
    data = _cohort(tmp_path, ["10"] * len(subsets), subsets)
    with pytest.raises(FeatureFileError) as info:
        data.setup("fit")
    message = str(info.value)
    assert "5 problem(s)" in message
    assert f"line 3: slide 's1': tile subset 'tumor_bed' selects none of its {N_TILES}" in message
    assert "line 4: slide 's2': " in message and "no tile-subset dataset 'tumor_bed'" in message
    assert "--data.tile_subset" in message
    assert "line 5: slide 's3': " in message and f"one value per tile ({N_TILES},)" in message
    assert "line 6: slide 's4': " in message and "must hold booleans (or 0/1)" in message
    assert "line 7: slide 's5': tile subset 'tumor_bed' selects none" in message
    assert "line 2:" not in message


def test_a_bag_holds_only_its_tile_subset(tmp_path: Path) -> None:
    subsets = [np.arange(N_TILES) % 2 == 0, (np.arange(N_TILES) < 3).astype(np.uint8)]
    data = _cohort(tmp_path, ["10", "60"], subsets)
    dataset = BagDataset(data.cohort.bags, data.cohort.targets(), tile_subset="tumor_bed")
    for bag, subset, item in zip(data.cohort.bags, subsets, dataset, strict=True):
        keep = subset.astype(bool)
        with h5py.File(bag.path, "r") as file:
            np.testing.assert_array_equal(item.features.numpy(), file["features"][()][keep])
            np.testing.assert_array_equal(item.coords.numpy(), file["coords"][()][keep])
    # Subsampling in training draws from the subset only.
    sampled = BagDataset(
        [probe_bag(data.cohort.bags[0].path)], [10.0], max_tiles=2, training=True,
        tile_subset="tumor_bed",
    )[0]  # fmt: skip
    assert len(sampled.coords) == 2
    assert set(sampled.coords[:, 0].tolist()) <= {x * 256 for x in range(0, N_TILES, 2)}


def test_the_datamodule_batches_only_subset_tiles(tmp_path: Path) -> None:
    subsets = [np.arange(N_TILES) < k for k in (2, 5, 3, 8, 1, 6)]
    data = _cohort(tmp_path, ["5", "15", "25", "35", "45", "55"], subsets)
    data.predict_split = "all"
    data.batch_size = 6
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch.mask.sum(dim=1).tolist() == [2, 5, 3, 8, 1, 6]
    assert batch.targets.tolist() == [5.0, 15.0, 25.0, 35.0, 45.0, 55.0]
