"""Continual-learning strategies: what changes in the model and the loss from task to task.

A run trains in *stages*: one per task, or a single stage over every task for ``joint``. Every
stage adds a linear head per new task (class-incremental evaluation concatenates all heads).

- ``joint`` (upper bound): one stage on all tasks' data, one softmax over all classes.
- ``finetune`` (lower bound): the whole model trains on each task in turn (its own head's
  cross-entropy); nothing protects earlier tasks.
- ``lora``: the first task trains the whole model; each later task adds a LoRA adapter to the
  adapted Linear layers (:mod:`milkit.models.lora_model`) and trains only the newest adapters and
  the new task's own modules (its head, and its attention pooling with GDAT's
  ``attention_per_task``). Everything else is frozen, LayerNorms and earlier heads included.
- ``owlora`` (CoMEL, docs/papers.md D.3): ``lora`` plus the orthogonality penalty λ and the
  projection of the new adapters' gradients (after ``backward``) and weights (after the
  optimiser step, so Adam cannot leak) off the earlier adapters' and W0's principal subspaces;
  milkit adds an option (``--lora.protect_features true``) that also protects the principal
  directions of what each adapted layer saw on earlier tasks' slides, recorded after every
  stage, so that earlier tasks' outputs stay unchanged rather than only change less. It is off
  by default: it keeps task-incremental accuracy, but the new tasks learn on nearly fixed
  features, and on the synthetic feature tasks class-incremental accuracy was lower.

``ewc``, ``lwf`` and ``replay`` live in :mod:`milkit.training.continual.baselines`; the
registry of names is :data:`milkit.training.continual.run.STRATEGIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from milkit.data.bags import BagBatch
from milkit.models.contract import MultiTaskMILModel
from milkit.models.lora_model import (
    add_lora_adapters,
    apply_lora,
    lora_layers,
    lora_orthogonality_penalty,
    project_lora_gradients,
    project_lora_weights,
    protect_seen_inputs,
)
from milkit.models.output import MILOutput
from milkit.training.continual.tasks import ContinualData, Item, TaskSequence

if TYPE_CHECKING:
    from milkit.training.continual.module import ContinualModule


@dataclass
class LoRAOptions:
    """Adapters of the ``lora`` and ``owlora`` strategies.

    Args:
        rank: Adapter rank r (CoMEL: 16).
        targets: ``fnmatch`` patterns of the Linear layers to adapt; None for the model's
            ``lora_targets`` (GDAT: embedding, qkv, projections, MLP, first layer of a shared
            pooling).
        penalty: λ of the orthogonality penalty (``owlora`` only; CoMEL: 1).
        protect_adapters: ``owlora``: keep new adapters off earlier adapters' subspaces.
        protect_base: ``owlora``: keep new adapters off W0's principal subspaces.
        energy: Fraction of W0's squared singular values its protected subspaces cover.
        protect_features: ``owlora``: also keep new adapters off the principal directions of
            the inputs every adapted layer saw on earlier tasks' training slides (milkit's
            addition, which keeps earlier tasks' outputs unchanged; off is the paper's method).
        feature_energy: Fraction of those inputs' energy that is protected; higher keeps old
            outputs closer, lower leaves new tasks more room.
    """

    rank: int = 16
    targets: list[str] | None = None
    penalty: float = 1.0
    protect_adapters: bool = True
    protect_base: bool = True
    energy: float = 0.99
    protect_features: bool = False
    feature_energy: float = 0.99


@dataclass(frozen=True)
class StageContext:
    """What a strategy may need to know about the stage being trained.

    Attributes:
        stage: Stage index (0 for the first).
        tasks: Indices of the tasks learnt in this stage.
        sequence: All tasks.
        data: The data options (loader settings).
        seed: The stage's seed.
    """

    stage: int
    tasks: tuple[int, ...]
    sequence: TaskSequence
    data: ContinualData
    seed: int


class Strategy:
    """Sequential fine-tuning; the base of every strategy, whose hooks the others override.

    Hook order per stage: :meth:`grow` (also replayed on resume, to rebuild the structure
    before a checkpoint loads), :meth:`start`, training (:meth:`penalty`,
    :meth:`after_backward`, :meth:`after_step` per batch), :meth:`finish`.
    """

    name: ClassVar[str] = "finetune"
    joint: ClassVar[bool] = False
    global_softmax: ClassVar[bool] = False

    def grow(self, model: nn.Module, context: StageContext) -> None:
        """Add the stage's heads (the first stage's heads come with the model).

        Args:
            model: The model (with ``add_task``).
            context: The stage.
        """
        if context.stage > 0:
            for task in context.tasks:
                cast(MultiTaskMILModel, model).add_task(context.sequence.tasks[task].n_classes)

    def start(self, model: nn.Module, context: StageContext) -> None:
        """Choose what trains in this stage (here: everything).

        Args:
            model: The model, grown for this stage.
            context: The stage.
        """
        model.requires_grad_(True)

    def train_items(self, context: StageContext) -> list[Item]:
        """The training slides of the stage.

        Args:
            context: The stage.

        Returns:
            ``(task, row)`` pairs: the training parts of the stage's tasks.
        """
        return [item for task in context.tasks for item in context.sequence.items(task, "train")]

    def penalty(
        self, module: ContinualModule, batch: BagBatch, output: MILOutput
    ) -> torch.Tensor | None:
        """An extra loss term for a training batch, or None.

        Args:
            module: The training module (``module.model`` is the network).
            batch: The batch.
            output: The model's output on it.

        Returns:
            A scalar, or None.
        """
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``backward`` and the optimiser step."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def finish(self, module: ContinualModule, context: StageContext) -> None:
        """Called after the stage, with its best weights loaded.

        Args:
            module: The training module.
            context: The stage.
        """

    def state_dict(self) -> dict[str, Any]:
        """What must be saved with the model to resume after this stage (plain data/tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Finetune(Strategy):
    """Sequential fine-tuning of the whole model (the lower bound)."""


class Joint(Strategy):
    """All tasks in one stage, one softmax over all classes (the upper bound)."""

    name = "joint"
    joint = True
    global_softmax = True


class LoRA(Strategy):
    """Plain LoRA: the first task trains everything, later tasks only new adapters and heads.

    Args:
        options: Adapter options (penalty and protections are ignored).
    """

    name = "lora"

    def __init__(self, options: LoRAOptions) -> None:
        self.options = options
        self.stage = 0

    @property
    def protected(self) -> bool:
        """Whether new adapters are projected (owlora)."""
        return False

    def grow(self, model: nn.Module, context: StageContext) -> None:
        """Wrap the target layers (first stage) or add an adapter to each (later stages)."""
        if context.stage == 0:
            protect = self.protected
            apply_lora(
                model,
                self.options.targets,
                self.options.rank,
                protect_adapters=protect and self.options.protect_adapters,
                protect_base=protect and self.options.protect_base,
                energy=self.options.energy,
                protect_features=protect and self.options.protect_features,
            )
        else:
            add_lora_adapters(model)
        super().grow(model, context)

    def start(self, model: nn.Module, context: StageContext) -> None:
        """Everything trains in the first stage; later, only the newest adapters and task modules."""
        self.stage = context.stage
        if context.stage == 0:
            model.requires_grad_(True)
            return
        model.requires_grad_(False)
        for layer in lora_layers(model):
            for parameters in (layer.lora_A, layer.lora_B, layer.lora_scale):
                parameters[-1].requires_grad_(True)
        for task in context.tasks:
            for module in cast(MultiTaskMILModel, model).task_modules(task):
                module.requires_grad_(True)


class OWLoRA(LoRA):
    """Orthogonal weighted LoRA (CoMEL): LoRA plus penalty and projections."""

    name = "owlora"

    @property
    def protected(self) -> bool:
        """New adapters are projected."""
        return True

    def penalty(
        self, module: ContinualModule, batch: BagBatch, output: MILOutput
    ) -> torch.Tensor | None:
        """``λ · Σ_layers (‖A Aᵀ − I‖² + ‖Bᵀ B − I‖²) / r²`` of the newest adapters."""
        if self.stage == 0 or self.options.penalty == 0:
            return None
        return self.options.penalty * lora_orthogonality_penalty(module.model)

    def after_backward(self, model: nn.Module) -> None:
        """Project the newest adapters' gradients off the protected subspaces."""
        if self.stage > 0:
            project_lora_gradients(model)

    def after_step(self, model: nn.Module) -> None:
        """Project the newest adapters' weights back (Adam leaves the subspace otherwise)."""
        if self.stage > 0:
            project_lora_weights(model)

    def finish(self, module: ContinualModule, context: StageContext) -> None:
        """Protect the inputs each adapted layer saw on the stage's training slides."""
        if not self.options.protect_features:
            return
        model = module.model
        device = next(model.parameters()).device
        loader = context.sequence.loader(self.train_items(context), batch_size=1)  # no padding

        def run() -> None:
            for batch in loader:
                module(module.transfer_batch_to_device(batch, device, 0))

        was_training = model.training
        model.eval()
        protect_seen_inputs(model, run, self.options.feature_energy)
        model.train(was_training)
