"""``ContinualModule``: the LightningModule of one stage of a continual run.

A fresh module wraps the (growing) model for every stage. Its classification loss is the
cross-entropy of each bag over its own task's classes (``-inf`` elsewhere), or over all classes
seen when the strategy uses one softmax (``joint``, ``replay``). BPPL (when its weight is > 0)
and the strategy's penalty are added; the strategy's projections run after ``backward`` and
after every optimiser step. Only parameters left trainable by the strategy are optimised.
Validation logs ``val/loss`` (the classification loss) and ``val/accuracy`` for early stopping.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from milkit.data.bags import BagBatch
from milkit.models.output import MILOutput
from milkit.training.continual.bppl import BPPL
from milkit.training.continual.strategies import Strategy
from milkit.training.module import batch_targets, model_logits


def own_task_attention(attention: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """Each bag's attention under its own task.

    Args:
        attention: ``(B, N)`` shared attention, or ``(B, N, T)`` one map per task (GDAT's
            ``attention_per_task``).
        tasks: ``(B,)`` task index of each bag.

    Returns:
        ``(B, N)``.
    """
    if attention.dim() == 2:
        return attention
    index = tasks.view(-1, 1, 1).expand(-1, attention.shape[1], 1)
    return attention.gather(2, index).squeeze(2)


class ContinualModule(pl.LightningModule):
    """Trains a multi-head MIL model on one stage of a task sequence."""

    # Buffers, declared so that attribute access is typed (not nn.Module.__getattr__'s union).
    task_of_class: torch.Tensor
    negative: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        task_of_class: torch.Tensor,
        negative: torch.Tensor,
        optimizer: OptimizerCallable,
        bppl: BPPL | None = None,
    ) -> None:
        """Wrap the model for a stage.

        Args:
            model: A model with one head per task (``GDATMIL``): ``model(features, mask,
                coords, task=None)`` returns logits over all heads' classes.
            strategy: The continual strategy (already grown and started for the stage).
            task_of_class: ``(C,)`` int64 task index of every class of the model's heads.
            negative: ``(C,)`` bool, True for negative (lesion-free) classes.
            optimizer: Optimiser factory, applied to the trainable parameters.
            bppl: Bag-prototype pseudo-labelling, or None.
        """
        super().__init__()
        self.model = model
        self.strategy = strategy
        self.optimizer_factory = optimizer
        self.bppl = bppl if bppl is not None and bppl.enabled else None
        self.register_buffer("task_of_class", task_of_class.long(), persistent=False)
        self.register_buffer("negative", negative.bool(), persistent=False)

    @staticmethod
    def run_model(model: nn.Module, batch: BagBatch) -> MILOutput:
        """Apply a multi-head model to a batch (features cast to float32, all heads).

        Args:
            model: The model (or a snapshot of it).
            batch: A padded batch.

        Returns:
            The output, logits ``(B, C)`` over all heads.
        """
        return model(batch.features.float(), batch.mask, batch.coords, task=None)

    def forward(self, batch: BagBatch) -> MILOutput:
        """Run the model on a batch (see :meth:`run_model`)."""
        return self.run_model(self.model, batch)

    def task_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Keep each bag's own task's logits, ``-inf`` elsewhere (a softmax per task).

        Args:
            logits: ``(B, C)`` logits over all classes.
            targets: ``(B,)`` global class indices.

        Returns:
            ``(B, C)`` float32 logits.
        """
        same_task = self.task_of_class[None, :] == self.task_of_class[targets][:, None]
        return logits.float().masked_fill(~same_task, float("-inf"))

    def classification_loss(self, output: MILOutput, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the bag's task (or all classes, for one-softmax strategies).

        Args:
            output: The model's output.
            targets: ``(B,)`` global class indices.

        Returns:
            The scalar loss.
        """
        logits = model_logits(output).float()
        if not self.strategy.global_softmax:
            logits = self.task_logits(logits, targets)
        return F.cross_entropy(logits, targets)

    def training_step(self, batch: BagBatch, batch_idx: int) -> torch.Tensor:
        output = self(batch)
        targets = batch_targets(batch)
        loss = self.classification_loss(output, targets)
        size = len(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        if self.bppl is not None:
            instance = self.bppl.loss(
                own_task_attention(output.attention, self.task_of_class[targets]),
                batch.features.float(),
                batch.mask,
                self.task_logits(model_logits(output), targets),
                targets,
                ~self.negative[targets],
            )
            self.log("train/bppl_loss", instance, on_step=False, on_epoch=True, batch_size=size)
            loss = loss + instance
        penalty = self.strategy.penalty(self, batch, output)
        if penalty is not None:
            self.log("train/penalty", penalty, on_step=False, on_epoch=True, batch_size=size)
            loss = loss + penalty
        return loss

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        output = self(batch)
        targets = batch_targets(batch)
        logits = model_logits(output).float()
        if not self.strategy.global_softmax:
            logits = self.task_logits(logits, targets)
        correct = (logits.argmax(dim=-1) == targets).float().mean()
        size = len(batch)
        self.log("val/loss", F.cross_entropy(logits, targets), batch_size=size)
        self.log("val/accuracy", correct, batch_size=size)

    def on_after_backward(self) -> None:
        self.strategy.after_backward(self.model)

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        """The optimiser step, then the strategy's weight projection."""
        super().optimizer_step(*args, **kwargs)  # type: ignore[arg-type]
        self.strategy.after_step(self.model)

    def on_train_epoch_end(self) -> None:
        if self.bppl is not None:
            self.log("train/bppl_threshold", self.bppl.end_epoch())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
