"""The MIL model contract (docs/design.md §6): what every model offers the training modules.

A MIL model is a plain ``nn.Module`` called as ``model(features, mask, coords=None)`` on a padded
batch and returning a :class:`~milkit.models.output.MILOutput`. Besides that call, the training
modules read two class attributes instead of checking model classes:

- ``default_instance_loss_weight``: the weight of the critical-instance loss a model is trained
  with unless the config says otherwise (0.5 for DSMIL's dual stream, docs/papers.md B; 0 elsewhere);
- ``supports_tasks``: whether the model has one head per task (``add_task``, ``n_tasks`` and a
  ``task`` argument), which continual learning needs.

Every model of :mod:`milkit.models` derives from :class:`MILModelBase`, which holds the defaults;
a user's own model may do the same, or provide the attributes itself (:class:`MILModel` is the
structural type).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from milkit.errors import ConfigError
from milkit.models.output import MILOutput


@runtime_checkable
class MILModel(Protocol):
    """What :class:`~milkit.training.module.MILModule` and continual training rely on."""

    default_instance_loss_weight: float
    supports_tasks: bool

    def __call__(
        self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
    ) -> MILOutput:
        """Run the model on ``features (B, N, D)``, ``mask (B, N)`` and ``coords (B, N, 2)``."""
        ...


class MultiTaskMILModel(MILModel, Protocol):
    """A MIL model with one head per task, as continual learning grows it.

    Attributes:
        heads: One classifier per task, in task order.
        n_classes_per_task: Classes of each head.
    """

    heads: nn.ModuleList
    n_classes_per_task: list[int]

    @property
    def n_tasks(self) -> int:
        """Number of task heads."""
        ...

    def add_task(self, n_classes: int) -> int:
        """Append a head for a new task of ``n_classes`` classes; returns its index."""
        ...

    def task_modules(self, task: int) -> list[nn.Module]:
        """The modules that serve only task ``task`` (its head, at least)."""
        ...

    def __call__(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        coords: torch.Tensor | None = None,
        task: int | None = None,
    ) -> MILOutput:
        """As :class:`MILModel`, with one task's head (``task``) or all heads (None)."""
        ...


class MILModelBase(nn.Module):
    """Base class of milkit's MIL models: the contract's defaults."""

    default_instance_loss_weight: ClassVar[float] = 0.0
    supports_tasks: ClassVar[bool] = False


def require_task_heads(model_class: type) -> None:
    """Refuse a model class without one head per task, before it is built.

    Args:
        model_class: The configured model class.

    Raises:
        ConfigError: The class is outside the contract or has a single head.
    """
    try:
        supports_tasks = bool(model_class.supports_tasks)  # type: ignore[attr-defined]
    except AttributeError:
        supports_tasks = False
    if not supports_tasks:
        raise ConfigError(
            f"{model_class.__module__}.{model_class.__qualname__} has no per-task heads "
            "(supports_tasks, add_task, n_tasks); continual runs need a multi-head model such "
            "as milkit.models.GDATMIL."
        )


def require_mil_model(model: nn.Module) -> MILModel:
    """Refuse a model that does not follow the contract, naming what it lacks.

    Args:
        model: The model to check.

    Returns:
        The model, typed by the contract.

    Raises:
        ConfigError: The model lacks a contract attribute.
    """
    if not isinstance(model, MILModel):
        raise ConfigError(
            f"{type(model).__name__} does not follow milkit's MIL model contract (milkit.models.contract): it "
            "needs the class attributes default_instance_loss_weight and supports_tasks; "
            "derive it from milkit.models.MILModelBase."
        )
    return model
