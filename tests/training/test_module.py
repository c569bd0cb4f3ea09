"""MILModule: losses, predictions, metrics and self-describing checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from milkit.errors import ConfigError
from milkit.models import (
    ABMIL,
    DSMIL,
    MILModelBase,
    MILOutput,
    TileScoreRegressor,
    critical_instance_logits,
)
from milkit.training.metrics import classification_metrics, regression_metrics
from milkit.training.module import CHECKPOINT_KEY, MILModule


def _batch(b: int = 3, n: int = 7, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    features = torch.randn(b, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False
    return features, mask


def test_abmil_loss_is_cross_entropy_and_predictions_softmax() -> None:
    features, mask = _batch()
    module = MILModule(ABMIL(5, 3, hidden_dim=8), class_names=["a", "b", "c"])
    targets = torch.tensor([0, 2, 1])
    output = module(features, mask)
    assert module.instance_loss_weight == 0.0
    assert torch.allclose(
        module.loss(output, mask, targets), F.cross_entropy(output.logits, targets)
    )
    assert torch.allclose(module.predictions(output, mask), output.logits.softmax(-1))


def test_dsmil_loss_halves_bag_and_critical_instance_terms() -> None:
    features, mask = _batch()
    module = MILModule(DSMIL(5, 2), class_names=["neg", "pos"])
    targets = torch.tensor([0, 1, 1])
    output = module(features, mask)
    instance = critical_instance_logits(output.tile_scores, mask)
    expected = 0.5 * F.cross_entropy(output.logits, targets) + 0.5 * F.cross_entropy(
        instance, targets
    )
    assert module.instance_loss_weight == 0.5
    assert torch.allclose(module.loss(output, mask, targets), expected)
    mixed = 0.5 * output.logits.softmax(-1) + 0.5 * instance.softmax(-1)
    assert torch.allclose(module.predictions(output, mask), mixed)


def test_class_weights_enter_the_loss() -> None:
    features, mask = _batch()
    module = MILModule(ABMIL(5, 2, hidden_dim=None), class_names=["neg", "pos"])
    module.loss_weights = torch.tensor([1.0, 3.0])
    targets = torch.tensor([0, 1, 1])
    output = module(features, mask)
    per_bag = F.cross_entropy(output.logits, targets, reduction="none")
    expected = (per_bag * torch.tensor([1.0, 3.0, 3.0])).mean()
    assert torch.allclose(module.loss(output, mask, targets), expected)
    # one bag per step, the default: its class weight must still scale its loss (torch's
    # weighted mean would divide it out again)
    single = module(features[2:], mask[2:])
    unweighted = F.cross_entropy(single.logits, targets[2:])
    assert torch.allclose(module.loss(single, mask[2:], targets[2:]), 3.0 * unweighted)


def test_regression_learns_the_scaled_target_and_predicts_in_units() -> None:
    features, mask = _batch()
    module = MILModule(TileScoreRegressor(5, hidden_dim=8), task="regression", target_scale=100.0)
    targets = torch.tensor([10.0, 50.0, 90.0])
    output = module(features, mask)
    assert module.class_names is None
    assert torch.allclose(
        module.loss(output, mask, targets), F.mse_loss(output.value, targets / 100)
    )
    assert torch.allclose(module.predictions(output, mask), output.value * 100)


def test_class_names_default_to_indices_and_unknown_n_classes_fails() -> None:
    assert MILModule(ABMIL(4, 3)).class_names == ["0", "1", "2"]

    class NoClasses(MILModelBase):
        def forward(
            self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
        ) -> MILOutput:
            raise NotImplementedError

    with pytest.raises(ConfigError, match="give class_names: NoClasses has no n_classes"):
        MILModule(NoClasses())


def test_a_model_outside_the_contract_is_refused_with_the_fix() -> None:
    class Plain(nn.Module):
        def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
            raise NotImplementedError

    with pytest.raises(ConfigError, match="Plain does not follow.*derive it from .*MILModelBase"):
        MILModule(Plain(), class_names=["a", "b"])


def test_the_instance_loss_weight_defaults_to_the_models_own() -> None:
    assert MILModule(DSMIL(4, 2)).instance_loss_weight == 0.5
    assert MILModule(ABMIL(4, 2)).instance_loss_weight == 0.0
    assert MILModule(DSMIL(4, 2), instance_loss_weight=0.2).instance_loss_weight == 0.2
    with pytest.raises(ConfigError, match="instance_loss_weight"):
        MILModule(ABMIL(4, 2), instance_loss_weight=2.0)


def test_features_are_cast_to_float32() -> None:
    features, mask = _batch()
    module = MILModule(ABMIL(5, 2, hidden_dim=None)).eval()
    assert torch.allclose(
        module(features.half(), mask).logits, module(features.half().float(), mask).logits
    )


def test_checkpoint_records_itself_and_holds_plain_data_only() -> None:
    module = MILModule(
        ABMIL(5, 2), class_names=["neg", "pos"], feature_dim=5, encoder="vit_s", target_name="label"
    )
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    record = checkpoint[CHECKPOINT_KEY]
    assert record["class_names"] == ["neg", "pos"] and record["feature_dim"] == 5
    assert record["encoder"] == "vit_s" and record["model_class"] == "milkit.models.abmil.ABMIL"
    assert "milkit_version" in record and record["target_name"] == "label"
    hparams = checkpoint["hyper_parameters"]
    assert "model" not in hparams and "optimizer" not in hparams  # objects, not data
    assert hparams["class_names"] == ["neg", "pos"]


def test_loading_a_checkpoint_of_other_classes_is_refused() -> None:
    module = MILModule(ABMIL(5, 2), class_names=["neg", "pos"], feature_dim=5)
    with pytest.raises(
        ConfigError, match=r"class_names \['a', 'b'\] but this run has \['neg', 'pos'\]"
    ):
        module.on_load_checkpoint({CHECKPOINT_KEY: {"class_names": ["a", "b"], "feature_dim": 5}})
    with pytest.raises(ConfigError, match="feature_dim 384 but this run has 5"):
        module.on_load_checkpoint(
            {CHECKPOINT_KEY: {"class_names": ["neg", "pos"], "feature_dim": 384}}
        )
    module.on_load_checkpoint({CHECKPOINT_KEY: {"class_names": ["neg", "pos"], "feature_dim": 5}})


def test_classification_metrics_match_their_definitions() -> None:
    metrics = classification_metrics(["a", "b/c"], "val/")
    probabilities = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    targets = torch.tensor([0, 0, 1, 1])
    metrics.update(probabilities, targets)
    values = {k: round(float(v), 4) for k, v in metrics.compute().items()}
    assert values["val/accuracy"] == 0.5
    assert values["val/recall/a"] == 0.5 and values["val/recall/b_c"] == 0.5
    assert values["val/balanced_accuracy"] == 0.5
    assert values["val/auroc"] == 0.75 and values["val/auroc/b_c"] == 0.75  # 3 of 4 pairs ranked


def test_regression_metrics_with_cutoff() -> None:
    metrics = regression_metrics("test/", cutoff=50.0, scale=100.0)
    predicted = torch.tensor([10.0, 40.0, 60.0, 90.0])
    truth = torch.tensor([20.0, 30.0, 70.0, 80.0])
    metrics.update(predicted, truth)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["test/mae"] == pytest.approx(10.0)
    assert values["test/mse"] == pytest.approx(100.0)
    assert values["test/spearman"] == pytest.approx(1.0)
    assert values["test/auroc"] == pytest.approx(1.0)  # no ties from a saturating sigmoid
    assert values["test/r2"] == pytest.approx(1 - 400 / 2600)  # SS_res 4·10², SS_tot 2·(30² + 20²)
