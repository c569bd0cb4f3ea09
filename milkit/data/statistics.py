"""Per-dimension statistics of the tiles of a set of bags, to standardise features with.

One streaming pass in float64 (sums and sums of squares per bag), so memory does not grow
with the cohort, and the result does not depend on the order of the bags beyond rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from milkit.data.bags import BagDataset

#: At most this many bags are read for the statistics: beyond a few hundred bags of many
#: tiles each, more add I/O, not precision.
MAX_STATISTICS_BAGS = 512
#: Features count as on a unit scale when every dimension's |mean| and SD are at most this ...
UNIT_SCALE = 3.0
#: ... and the median dimension's SD is at least this.
MIN_MEDIAN_STD = 0.1


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and standard deviation of every feature dimension over the tiles of some bags.

    Attributes:
        mean: ``(D,)`` float32 per-dimension mean.
        std: ``(D,)`` float32 per-dimension (population) standard deviation.
        n_tiles: Number of tiles they were computed from.
        n_bags: Number of bags they were computed from.
    """

    mean: torch.Tensor
    std: torch.Tensor
    n_tiles: int
    n_bags: int

    @property
    def unit_scale(self) -> bool:
        """Whether the features are on a unit scale already, as a network's normalised outputs
        (a ViT's embeddings) are: every dimension's |mean| and SD at most :data:`UNIT_SCALE`
        and the median SD at least :data:`MIN_MEDIAN_STD`. Raw measurements (MUSK's integers
        in -300..300) are not."""
        return bool(
            (self.mean.abs() <= UNIT_SCALE).all()
            and (self.std <= UNIT_SCALE).all()
            and self.std.median() >= MIN_MEDIAN_STD
        )


def feature_statistics(dataset: BagDataset, *, seed: int = 0) -> FeatureStatistics:
    """Per-dimension mean and standard deviation of every tile of the dataset's bags.

    Every tile of each bag is used (the dataset's training subsample is not applied); with
    more than :data:`MAX_STATISTICS_BAGS` bags, that many are drawn with ``seed``.

    Args:
        dataset: The bags (e.g. a fold's training part).
        seed: Seed of the draw of bags from a large dataset.

    Returns:
        The statistics.

    Raises:
        ValueError: If the dataset has no bags.
    """
    if len(dataset) == 0:
        raise ValueError("feature statistics need at least one bag.")
    indices = np.arange(len(dataset))
    if len(indices) > MAX_STATISTICS_BAGS:
        draw = np.random.default_rng(seed).choice(indices, MAX_STATISTICS_BAGS, replace=False)
        indices = np.sort(draw)
    total = total_sq = None
    n_tiles = 0
    for index in indices:
        features = dataset.read_all(int(index)).astype(np.float64)
        bag_sum, bag_sq = features.sum(axis=0), np.square(features).sum(axis=0)
        total = bag_sum if total is None else total + bag_sum
        total_sq = bag_sq if total_sq is None else total_sq + bag_sq
        n_tiles += len(features)
    assert total is not None and total_sq is not None
    mean = total / n_tiles
    variance = np.maximum(total_sq / n_tiles - np.square(mean), 0.0)
    return FeatureStatistics(
        mean=torch.from_numpy(mean).float(),
        std=torch.from_numpy(np.sqrt(variance)).float(),
        n_tiles=n_tiles,
        n_bags=len(indices),
    )
