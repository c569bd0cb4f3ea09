"""``FeatureStandardizer``: identity until fitted, per-dimension z-scores, carried by state dicts."""

from __future__ import annotations

import pytest
import torch

from milkit.errors import ConfigError
from milkit.models.standardize import FeatureStandardizer


def test_identity_until_fitted_then_z_scores_per_dimension() -> None:
    features = torch.randn(2, 5, 3) * torch.tensor([1.0, 10.0, 100.0]) + torch.tensor([5.0, -3, 0])
    standardizer = FeatureStandardizer()
    assert not standardizer.fitted and standardizer(features) is features
    mean, std = torch.tensor([5.0, -3.0, 0.0]), torch.tensor([1.0, 10.0, 100.0])
    standardizer.fit(mean, std)
    assert torch.allclose(standardizer(features), (features - mean) / std)


def test_constant_dimension_is_centred_not_blown_up() -> None:
    standardizer = FeatureStandardizer()
    standardizer.fit(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]))
    out = standardizer(torch.tensor([[2.0, 4.0]]))
    assert out.tolist() == [[0.0, 2.0]]


def test_statistics_travel_in_the_state_dict_into_an_unfitted_module() -> None:
    trained = FeatureStandardizer()
    trained.fit(torch.arange(4.0), torch.full((4,), 2.0))
    fresh = FeatureStandardizer()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.fitted and torch.equal(fresh.mean, trained.mean)
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), trained(x))
    # and an unfitted state makes a fitted module the identity again
    trained.load_state_dict(FeatureStandardizer().state_dict())
    assert not trained.fitted and trained(x) is x


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\(D,\) mean and std"):
        FeatureStandardizer().fit(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="NaN or infinite.*standardize off"):
        FeatureStandardizer().fit(torch.tensor([float("nan")]), torch.ones(1))
