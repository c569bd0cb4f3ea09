"""R² on tiny validation parts."""

from __future__ import annotations

import math

import pytest
import torch

from milkit.training.metrics import regression_metrics


def test_r2_is_nan_not_an_error_on_one_slide_and_exact_on_more() -> None:
    metrics = regression_metrics("val/")
    metrics.update(torch.tensor([0.3]), torch.tensor([0.5]))
    assert math.isnan(float(metrics.compute()["val/r2"]))
    metrics.update(torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.8]))
    preds, target = torch.tensor([0.3, 0.1, 0.9]), torch.tensor([0.5, 0.2, 0.8])
    expected = 1 - ((preds - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert float(metrics.compute()["val/r2"]) == pytest.approx(float(expected), rel=1e-5)
