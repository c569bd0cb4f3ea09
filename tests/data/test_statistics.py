"""``feature_statistics``: exact per-dimension moments of every tile, a bounded draw of bags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.data import statistics
from milkit.data.bags import BagDataset, probe_bag
from milkit.data.statistics import FeatureStatistics, feature_statistics
from milkit.synth.features import write_witness_cohort


def _dataset(tmp_path: Path, **kwargs: object) -> BagDataset:
    cohort = write_witness_cohort(tmp_path, n_bags=6, feature_dim=5, dtype="float32", seed=1)
    paths = sorted(cohort.features_dir.glob("*.h5"))
    return BagDataset([probe_bag(p) for p in paths], **kwargs)  # type: ignore[arg-type]


def test_moments_of_every_tile_not_of_the_training_subsample(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, max_tiles=3, training=True)
    tiles = np.concatenate([dataset.read_all(i) for i in range(len(dataset))]).astype(np.float64)
    result = feature_statistics(dataset)
    assert result.n_tiles == len(tiles) > 3 * len(dataset) and result.n_bags == len(dataset)
    assert np.allclose(result.mean.numpy(), tiles.mean(0), atol=1e-5)
    assert np.allclose(result.std.numpy(), tiles.std(0), atol=1e-5)


def test_large_datasets_draw_a_seeded_subset_of_bags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statistics, "MAX_STATISTICS_BAGS", 4)
    dataset = _dataset(tmp_path)
    first, again = feature_statistics(dataset, seed=3), feature_statistics(dataset, seed=3)
    assert first.n_bags == 4 and torch.equal(first.mean, again.mean)


def test_unit_scale_only_when_every_dimension_is_within_a_few_units() -> None:
    def stats(mean: list[float], std: list[float]) -> FeatureStatistics:
        return FeatureStatistics(torch.tensor(mean), torch.tensor(std), n_tiles=10, n_bags=1)

    assert stats([0.5, -2.7, 0.0], [0.13, 1.1, 0.35]).unit_scale  # a random ViT's embeddings
    assert not stats([0.5, 40.0, 0.0], [1.0, 1.0, 1.0]).unit_scale  # an offset dimension
    assert not stats([0.0, 0.0, 0.0], [1.0, 80.0, 1.0]).unit_scale  # raw measurements
    assert not stats([0.0, 0.0, 0.0], [1e-3, 1e-3, 1.0]).unit_scale  # mostly tiny


def test_an_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one bag"):
        feature_statistics(BagDataset([]))
