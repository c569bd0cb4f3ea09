"""The baselines EWC, LwF and experience replay (docs/papers.md D: "optionally EWC, LwF and replay").

All three fine-tune the whole model like ``finetune`` (:mod:`milkit.training.continual.strategies`)
and add one thing:

- ``ewc``: the (online) elastic weight consolidation penalty ``weight/2 · Σ F (θ − θ*)²``, F
  the diagonal empirical Fisher of the tasks learnt so far (summed), θ* the weights after the
  last task;
- ``lwf``: distillation of the earlier heads' outputs of the model as it was before the task
  (``weight · T² · KL`` per earlier head, averaged);
- ``replay``: a memory of ``per_task`` training slides per earlier task (class-balanced)
  trained alongside the task's slides, with one softmax over all classes seen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from milkit.data.bags import BagBatch
from milkit.errors import ConfigError
from milkit.models.output import MILOutput
from milkit.training.continual.strategies import StageContext, Strategy
from milkit.training.continual.tasks import Item
from milkit.training.module import model_logits

if TYPE_CHECKING:
    from milkit.training.continual.module import ContinualModule


@dataclass
class EWCOptions:
    """Elastic weight consolidation.

    Args:
        weight: Strength of the quadratic penalty.
    """

    weight: float = 100.0


@dataclass
class LwFOptions:
    """Learning without forgetting.

    Args:
        weight: Weight of the distillation loss.
        temperature: Softmax temperature T of the distillation.
    """

    weight: float = 1.0
    temperature: float = 2.0


@dataclass
class ReplayOptions:
    """Experience replay.

    Args:
        per_task: Training slides kept per finished task (class-balanced).
    """

    per_task: int = 8


class EWC(Strategy):
    """Online elastic weight consolidation on top of fine-tuning.

    Args:
        options: Penalty strength.
    """

    name = "ewc"

    def __init__(self, options: EWCOptions) -> None:
        self.options = options
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(
        self, module: ContinualModule, batch: BagBatch, output: MILOutput
    ) -> torch.Tensor | None:
        """``weight/2 · Σ F (θ − θ*)²`` over the parameters known at the last task's end."""
        if not self.fisher:
            return None
        total = output.attention.new_zeros(())
        for name, parameter in module.model.named_parameters():
            if name in self.fisher:
                fisher = self.fisher[name].to(parameter.device)
                anchor = self.anchor[name].to(parameter.device)
                total = total + (fisher * (parameter - anchor) ** 2).sum()
        return self.options.weight / 2 * total

    def finish(self, module: ContinualModule, context: StageContext) -> None:
        """Add this task's diagonal empirical Fisher (one bag at a time) and move the anchor."""
        model = module.model
        device = next(model.parameters()).device
        parameters = dict(model.named_parameters())
        fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
        loader = context.sequence.loader(self.train_items(context), batch_size=1)
        was_training = model.training
        model.eval()
        for batch in loader:
            model.zero_grad()
            batch = module.transfer_batch_to_device(batch, device, 0)
            module.classification_loss(module(batch), batch.targets).backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    fisher[name] += parameter.grad.detach() ** 2 / len(loader)
        model.zero_grad()
        model.train(was_training)
        for name, value in fisher.items():
            previous = self.fisher.get(name)
            self.fisher[name] = value.cpu() if previous is None else previous + value.cpu()
            self.anchor[name] = parameters[name].detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        """The summed Fisher and the anchor weights."""
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the Fisher and anchor."""
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))


class LwF(Strategy):
    """Learning without forgetting: distil the earlier heads of the model before the task.

    Args:
        options: Distillation weight and temperature.
    """

    name = "lwf"

    def __init__(self, options: LwFOptions) -> None:
        if options.temperature <= 0:
            raise ConfigError(f"--lwf.temperature must be > 0, got {options.temperature}.")
        self.options = options
        self.teacher: nn.Module | None = None
        self.old_slices: list[slice] = []

    def start(self, model: nn.Module, context: StageContext) -> None:
        """Snapshot the model as the teacher of the earlier tasks' heads."""
        super().start(model, context)
        first_new = min(context.tasks)
        self.old_slices = [
            slice(task.offset, task.offset + task.n_classes)
            for task in context.sequence.tasks[:first_new]
        ]
        self.teacher = None
        if self.old_slices:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def penalty(
        self, module: ContinualModule, batch: BagBatch, output: MILOutput
    ) -> torch.Tensor | None:
        """``weight · T² · KL(teacher ‖ student)`` per earlier head, averaged over heads."""
        if self.teacher is None:
            return None
        logits = model_logits(output)
        self.teacher.to(logits.device)
        with torch.no_grad():
            old = model_logits(module.run_model(self.teacher, batch)).float()
        temperature = self.options.temperature
        losses = [
            F.kl_div(
                (logits[:, part].float() / temperature).log_softmax(dim=-1),
                (old[:, part] / temperature).softmax(dim=-1),
                reduction="batchmean",
            )
            for part in self.old_slices
        ]
        return self.options.weight * temperature**2 * torch.stack(losses).mean()


class Replay(Strategy):
    """Experience replay: a class-balanced memory of earlier tasks' training slides.

    Args:
        options: Memory size per task.
    """

    name = "replay"
    global_softmax = True

    def __init__(self, options: ReplayOptions) -> None:
        if options.per_task < 1:
            raise ConfigError(f"--replay.per_task must be >= 1, got {options.per_task}.")
        self.options = options
        self.memory: list[Item] = []

    def train_items(self, context: StageContext) -> list[Item]:
        """The stage's training slides plus the memory."""
        return super().train_items(context) + list(self.memory)

    def finish(self, module: ContinualModule, context: StageContext) -> None:
        """Keep ``per_task`` training slides of each learnt task, alternating classes."""
        rng = np.random.default_rng([context.seed, 7])
        for task in context.tasks:
            rows = context.sequence.tasks[task].split.train
            targets = context.sequence.tasks[task].targets[rows]
            by_class = [list(rng.permutation(rows[targets == c])) for c in np.unique(targets)]
            chosen: list[Item] = []
            while len(chosen) < self.options.per_task and any(by_class):
                for members in by_class:
                    if members and len(chosen) < self.options.per_task:
                        chosen.append((task, int(members.pop())))
            self.memory += chosen

    def state_dict(self) -> dict[str, Any]:
        """The memory as ``[task, row]`` pairs."""
        return {"memory": [list(item) for item in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the memory."""
        self.memory = [(int(task), int(row)) for task, row in state.get("memory", [])]
