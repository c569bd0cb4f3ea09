"""``MILModule``: the LightningModule that trains any MIL model of :mod:`milkit.models`.

The model is a plain ``nn.Module`` (chosen by ``class_path`` in YAML); this module owns the
loss, the metrics, the optimiser and what a checkpoint records about itself (docs/design.md §2).

Inputs: features not on a unit scale already (raw measurements, not a ViT's embeddings) are
standardised per dimension with the training part's statistics before the model sees them
(``standardize``); the statistics are buffers, so checkpoints carry them. The
learning rate decays to 0 along a cosine over the run (``lr_decay``): the default recipe
trains a fixed number of epochs and uses the final model (configs/trainer/cpu.yaml says why).

Losses: classification is cross-entropy on the bag logits (optionally class-weighted). With an
instance-loss weight w > 0 (DSMIL's default is 0.5; docs/papers.md B) it is
``(1 - w)·CE(bag) + w·CE(c_m)``, where ``c_m`` are the critical instance's logits, and the
predicted probabilities mix the two streams the same way. Regression is MSE between the
model's value in [0, 1] and ``target / target_scale``; predictions are reported in target units.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torchmetrics import MeanMetric, MetricCollection

import milkit
from milkit.data.bags import BagBatch
from milkit.data.labels import TaskType
from milkit.errors import ConfigError
from milkit.models.contract import require_mil_model
from milkit.models.dsmil import critical_instance_logits
from milkit.models.output import MILOutput
from milkit.models.standardize import FeatureStandardizer
from milkit.training.metrics import classification_metrics, regression_metrics
from milkit.training.prediction_file import SlidePrediction

Standardize = Literal["auto", "on", "off"]
LRDecay = Literal["cosine", "none"]

#: Key of the self-description a checkpoint carries besides Lightning's own entries.
CHECKPOINT_KEY = "milkit"
#: Checkpoint entry holding torch's CPU generator state when it was written.
RNG_KEY = "milkit_rng_state"


class MILModule(pl.LightningModule):
    """Trains, evaluates and applies a MIL model on padded batches of bags."""

    def __init__(
        self,
        model: nn.Module,
        task: TaskType = "classification",
        class_names: list[str] | None = None,
        feature_dim: int | None = None,
        encoder: str | None = None,
        target_name: str | None = None,
        target_scale: float = 1.0,
        target_units: str | None = None,
        instance_loss_weight: float | None = None,
        regression_cutoff: float | None = None,
        standardize: Standardize = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_decay: LRDecay = "cosine",
        scheduler_monitor: str = "val/loss",
    ) -> None:
        """Wrap a model.

        Args:
            model: A MIL model following :mod:`milkit.models.contract`: called with
                ``features (B, N, D)``, ``mask (B, N)`` and ``coords (B, N, 2)``, it returns a
                :class:`~milkit.models.output.MILOutput`. Its ``in_dim`` (and ``n_classes``)
                are filled in from the data by ``milkit fit``.
            task: ``"classification"`` (``logits``) or ``"regression"`` (``value``).
            class_names: Class names in index order (from the data); default ``"0"``,
                ``"1"``, ... up to the model's ``n_classes``.
            feature_dim: Feature length the model was built for (from the data; recorded in
                checkpoints and checked against the data on load).
            encoder: Id of the encoder that made the features (from the files; recorded).
            target_name: Name of the target (the labels CSV's column; recorded).
            target_scale: Regression targets are learnt as ``target / target_scale``.
            target_units: Units of the regression target, e.g. ``"% TILs"`` (recorded in
                checkpoints and prediction files, shown on heatmaps).
            instance_loss_weight: Weight w of the critical-instance loss; None for the model's
                ``default_instance_loss_weight`` (0.5 for DSMIL, 0 otherwise).
            regression_cutoff: Target threshold of the high-vs-low AUROC (regression).
            standardize: Standardise every feature dimension to zero mean and unit variance
                with statistics of the training part's tiles (fitted at the start of ``fit``,
                saved in checkpoints, applied by ``validate``/``test``/``predict``):
                ``"auto"`` when the features are not on a unit scale already (every
                dimension's mean and SD within 3, as a ViT's embeddings are; raw measurements
                are not), ``"on"`` always, ``"off"`` never. Rescaling a network's embeddings
                dimension by dimension lifts its many weak dimensions to the strength of the
                few strong ones: on the demo's ViT features that cost 12 points of attention
                localisation for 10 of bag AUROC (3 seeds).
            optimizer: Optimiser factory (``class_path`` + ``init_args`` in YAML).
            lr_scheduler: Learning-rate scheduler factory, or None for ``lr_decay``.
            lr_decay: Without ``lr_scheduler``: ``"cosine"`` decays the learning rate to 0
                over the run's optimiser steps (``trainer.max_epochs``), so the final model is
                the one to use; ``"none"`` keeps it constant.
            scheduler_monitor: Metric a ``ReduceLROnPlateau`` scheduler watches.

        Raises:
            ConfigError: Unknown task, a model outside the contract, or class names that
                cannot be determined.
        """
        super().__init__()
        with warnings.catch_warnings():
            # From YAML the model is recorded as class_path + init_args; a model object passed
            # from Python is not data and is left out of checkpoints (on_save_checkpoint).
            warnings.filterwarnings("ignore", r"Attribute 'model' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if task not in ("classification", "regression"):
            raise ConfigError(f"task must be classification or regression, got {task!r}.")
        if standardize not in get_args(Standardize) or lr_decay not in get_args(LRDecay):
            raise ConfigError(
                f"standardize must be one of {get_args(Standardize)} and lr_decay one of "
                f"{get_args(LRDecay)}; got {standardize!r}, {lr_decay!r}."
            )
        contract = require_mil_model(model)
        self.model = model
        self.standardizer = FeatureStandardizer()
        self.standardize = standardize
        self.lr_decay = lr_decay
        self.task = task
        self.feature_dim = feature_dim
        self.encoder = encoder
        self.target_name = target_name
        self.target_scale = target_scale
        self.target_units = target_units
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_monitor = scheduler_monitor
        if instance_loss_weight is None:
            instance_loss_weight = contract.default_instance_loss_weight
        if not 0.0 <= instance_loss_weight <= 1.0:
            raise ConfigError(
                f"instance_loss_weight must be in [0, 1], got {instance_loss_weight}."
            )
        self.instance_loss_weight = instance_loss_weight
        self.register_buffer("loss_weights", None, persistent=False)
        self.class_names: list[str] | None = None
        if task == "classification":
            if class_names is None:
                n_classes = getattr(model, "n_classes", None)
                if n_classes is None:
                    raise ConfigError(f"give class_names: {type(model).__name__} has no n_classes.")
                class_names = [str(i) for i in range(n_classes)]
            self.class_names = list(class_names)
        self.regression_cutoff = regression_cutoff
        self.val_metrics = self._make_metrics("val/")
        self.test_metrics = self._make_metrics("test/")
        # Sample-weighted means synced by torchmetrics: exact under DDP with uneven shares.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._train_loss_sum, self._train_bags = torch.zeros(()), 0  # reset every epoch

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
    ) -> MILOutput:
        """Run the model.

        Args:
            features: ``(B, N, D)`` tile features of any float type (cast to float32 here).
            mask: ``(B, N)`` bool, True for real tiles.
            coords: ``(B, N, 2)`` int64 level-0 ``(x, y)`` of the tiles (spatial models such as
                GDAT group tiles by them).

        Returns:
            The model's output.
        """
        return self.model(self.standardizer(features.float()), mask, coords)

    def predictions(self, output: MILOutput, mask: torch.Tensor) -> torch.Tensor:
        """Slide predictions from a model output.

        Args:
            output: The model's output for a batch.
            mask: ``(B, N)`` bool tile mask.

        Returns:
            ``(B, C)`` class probabilities, or ``(B,)`` values in target units.
        """
        if self.task == "regression":
            return model_value(output) * self.target_scale
        probabilities = model_logits(output).float().softmax(dim=-1)
        if self.instance_loss_weight > 0:
            tile_scores = _model_tile_scores(output)
            instance = critical_instance_logits(tile_scores, mask).float().softmax(dim=-1)
            w = self.instance_loss_weight
            probabilities = (1 - w) * probabilities + w * instance
        return probabilities

    def loss(self, output: MILOutput, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch.

        Args:
            output: The model's output.
            mask: ``(B, N)`` bool tile mask.
            targets: ``(B,)`` class indices, or values in target units.

        Returns:
            The scalar loss.
        """
        if self.task == "regression":
            return F.mse_loss(model_value(output).float(), targets.float() / self.target_scale)
        w = self.instance_loss_weight
        logits = model_logits(output).float()
        loss = (1 - w) * weighted_cross_entropy(logits, targets, self.loss_weights)
        if w > 0:
            instance = critical_instance_logits(_model_tile_scores(output), mask).float()
            loss = loss + w * weighted_cross_entropy(instance, targets, self.loss_weights)
        return loss

    def setup(self, stage: str) -> None:
        """On ``fit``: fit the standardisation and take the class weights of the training part
        from the datamodule (when it offers them; a resumed run then loads the checkpoint's
        statistics over the fitted ones, which are the same)."""
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.task == "classification":
            weights = getattr(datamodule, "class_weights", None)
            self.loss_weights = weights.to(self.device) if weights is not None else None
        statistics = getattr(datamodule, "feature_statistics", None)
        if self.standardize == "off" or self.standardizer.fitted or statistics is None:
            return
        training = statistics()
        if self.standardize == "on" or not training.unit_scale:
            self.standardizer.fit(training.mean, training.std)

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_bags = 0

    def training_step(self, batch: BagBatch, batch_idx: int) -> torch.Tensor:
        """Loss of one batch; its mean over the epoch is logged as ``train/loss`` at the end
        of the epoch (a per-step log costs more than a step on small bags)."""
        output = self(batch.features, batch.mask, batch.coords)
        loss = self.loss(output, batch.mask, batch_targets(batch))
        self._train_loss_sum += loss.detach() * len(batch)
        self._train_bags += len(batch)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._train_bags:
            mean = self._train_loss_sum / self._train_bags
            self.log("train/loss", mean, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        """Accumulate ``val/`` loss and metrics (logged at the end of the epoch)."""
        self._evaluate(batch, self.val_metrics, self.val_loss)

    def test_step(self, batch: BagBatch, batch_idx: int) -> None:
        """Accumulate ``test/`` loss and metrics (logged at the end of the epoch)."""
        self._evaluate(batch, self.test_metrics, self.test_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics, self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics, self.test_loss)

    def predict_step(self, batch: BagBatch, batch_idx: int) -> list[SlidePrediction]:
        """Per-slide predictions with attention and tile scores, padding removed."""
        output = self(batch.features, batch.mask, batch.coords)
        predicted = self.predictions(output, batch.mask).float().cpu().numpy()
        results = []
        for b, slide_id in enumerate(batch.slide_ids):
            real = batch.mask[b]
            target = batch.targets[b].item() if batch.targets is not None else None
            probabilities = predicted[b] if self.task == "classification" else None
            results.append(
                SlidePrediction(
                    slide_id=slide_id,
                    slide_path=batch.slide_paths[b],
                    feature_path=batch.feature_paths[b],
                    coords=batch.coords[b][real].cpu().numpy(),
                    attention=output.attention[b][real].float().cpu().numpy(),
                    tile_scores=(
                        output.tile_scores[b][real].float().cpu().numpy()
                        if output.tile_scores is not None
                        else None
                    ),
                    probabilities=probabilities,
                    prediction=self._label(predicted[b]),
                    target=self._label(target) if target is not None else None,
                )
            )
        return results

    def configure_optimizers(self) -> Any:
        """The optimiser over all parameters, with the scheduler when one is configured."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            if self.lr_decay == "none":
                return optimizer
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ConfigError(
                    "lr_decay cosine needs a fixed length: set --trainer.max_epochs (or "
                    "max_steps), or --model.lr_decay none."
                )
            total_steps = max(int(estimated), 1)
            cosine = LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": cosine, "interval": "step"},
            }
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what the checkpoint is, and keep it loadable with ``weights_only=True``."""
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            # A module built in Python (not from YAML) holds objects here; they are not data.
            hparams = {k: v for k, v in hparams.items() if _is_plain(v)}
            if isinstance(hparams.get("model"), dict):
                hparams["model"] = _accepted_init_args(hparams["model"], type(self.model))
            checkpoint["hyper_parameters"] = hparams
        checkpoint[CHECKPOINT_KEY] = {
            "milkit_version": milkit.__version__,
            "task": self.task,
            "class_names": self.class_names,
            "feature_dim": self.feature_dim,
            "encoder": self.encoder,
            "target_name": self.target_name,
            "target_scale": self.target_scale,
            "target_units": self.target_units,
            "standardized": self.standardizer.fitted,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
        }
        # Dropout draws from torch's generator: a resumed run continues its sequence, so it
        # ends with the weights of an uninterrupted one.
        checkpoint[RNG_KEY] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose classes or feature size disagree with this run's data.

        Raises:
            ConfigError: Class names or feature length differ.
        """
        state = checkpoint.get("state_dict")
        if state is not None and "standardizer.mean" not in state:
            # Written before standardisation existed: those models saw raw features.
            state["standardizer.mean"], state["standardizer.std"] = torch.zeros(0), torch.ones(0)
        if RNG_KEY in checkpoint:
            torch.set_rng_state(checkpoint[RNG_KEY])
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        for key, mine, flag in (
            ("class_names", self.class_names, "--data.class_names"),
            ("feature_dim", self.feature_dim, "features from the same encoder"),
        ):
            theirs = saved.get(key)
            if theirs is not None and mine is not None and theirs != mine:
                raise ConfigError(
                    f"the checkpoint was trained with {key} {theirs!r} but this run has {mine!r}; "
                    f"use {flag}."
                )

    def _make_metrics(self, prefix: str) -> MetricCollection:
        if self.class_names is not None:
            return classification_metrics(self.class_names, prefix)
        return regression_metrics(prefix, self.regression_cutoff, self.target_scale)

    def _evaluate(self, batch: BagBatch, metrics: MetricCollection, loss_mean: MeanMetric) -> None:
        output = self(batch.features, batch.mask, batch.coords)
        targets = batch_targets(batch)
        loss = self.loss(output, batch.mask, targets)
        loss_mean.update(loss.detach(), weight=len(batch))
        metrics.update(self.predictions(output, batch.mask), targets)

    def _log_metrics(self, stage: str, metrics: MetricCollection, loss_mean: MeanMetric) -> None:
        if not self.trainer.sanity_checking:  # a couple of batches: their metrics mean nothing
            values = {**metrics.compute(), f"{stage}/loss": loss_mean.compute()}
            # torchmetrics has synced the states across ranks; sync_dist averages equal values.
            self.log_dict(values, sync_dist=True)
        metrics.reset()
        loss_mean.reset()

    def _label(self, value: np.ndarray | float | int) -> str | float:
        """A class name from probabilities or an index; a float for regression."""
        if self.class_names is None:
            return float(value)
        index = int(np.argmax(value)) if isinstance(value, np.ndarray) else int(value)
        return self.class_names[index]


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy with per-class weights, averaged over the batch's bags.

    ``F.cross_entropy(weight=...)`` divides by the batch's summed weights, so with one bag per
    step (the default) every weight cancels and the classes are not balanced at all; here each
    bag's loss is scaled by its class's weight and the batch mean is taken.

    Args:
        logits: ``(B, C)`` class logits.
        targets: ``(B,)`` class indices.
        weights: ``(C,)`` class weights (mean 1 over the training bags), or None.

    Returns:
        The scalar loss.
    """
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (losses * weights[targets]).mean() if weights is not None else losses.mean()


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate factor of a cosine decay from 1 at step 0 to 0 at ``total_steps``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def batch_targets(batch: BagBatch) -> torch.Tensor:
    """The batch's targets, which training and evaluation need.

    Args:
        batch: A batch of labelled bags.

    Returns:
        ``(B,)`` class indices or values.

    Raises:
        ConfigError: If the bags have no targets (no labels CSV).
    """
    if batch.targets is None:
        raise ConfigError("the batch has no targets: training and evaluation need a labels CSV.")
    return batch.targets


def model_logits(output: MILOutput) -> torch.Tensor:
    """The output's class logits; a model without them cannot do classification."""
    if output.logits is None:
        raise ConfigError("the model returned no logits; classification needs a classifier.")
    return output.logits


def model_value(output: MILOutput) -> torch.Tensor:
    """The output's slide value; a model without one cannot do regression."""
    if output.value is None:
        raise ConfigError("the model returned no value; regression needs a regression model.")
    return output.value


def _model_tile_scores(output: MILOutput) -> torch.Tensor:
    """The output's instance logits, which the critical-instance loss needs."""
    if output.tile_scores is None:
        raise ConfigError(
            "the model returned no tile scores; instance_loss_weight > 0 needs a model with "
            "instance logits (DSMIL)."
        )
    return output.tile_scores


def _accepted_init_args(config: dict[str, Any], model_class: type) -> dict[str, Any]:
    """A model's ``class_path``/``init_args`` without arguments its class does not take.

    The data links fill ``n_classes`` into every model's config, and a regressor has none;
    left in the checkpoint, it would make ``--ckpt_path`` fail to parse.
    """
    init_args = config.get("init_args")
    parameters = inspect.signature(model_class).parameters
    if not isinstance(init_args, dict) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return config
    return {**config, "init_args": {k: v for k, v in init_args.items() if k in parameters}}


def _is_plain(value: Any) -> bool:
    """Whether a value is plain data (what ``torch.load(weights_only=True)`` reads back)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False
