"""LoRA over a whole model: wrap its Linear layers, add adapters per task, apply OWLoRA's
penalty and projections to every layer, and record what each layer saw
(:func:`protect_seen_inputs`). The layer itself is :class:`milkit.models.lora.LoRALinear`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import cast

import torch
from torch import nn

from milkit.errors import ConfigError
from milkit.models.lora import LoRALinear


def apply_lora(
    module: nn.Module,
    target: Sequence[str] | None = None,
    rank: int = 16,
    *,
    protect_adapters: bool = True,
    protect_base: bool = True,
    energy: float = 0.99,
    protect_features: bool = False,
) -> list[LoRALinear]:
    """Replace matching ``nn.Linear`` submodules by :class:`LoRALinear` wrappers, in place.

    Args:
        module: The model to adapt.
        target: ``fnmatch`` patterns over dotted submodule names (``"blocks.*.attn.qkv"``);
            None uses the model's ``lora_targets`` class attribute (e.g. ``GDATMIL``'s).
        rank: Adapter rank r.
        protect_adapters: See :class:`LoRALinear`.
        protect_base: See :class:`LoRALinear`.
        energy: See :class:`LoRALinear`.
        protect_features: See :class:`LoRALinear`.

    Returns:
        The new LoRA layers, in module order (each without adapters yet).

    Raises:
        ConfigError: If there are no patterns or a pattern matches no (not yet adapted) Linear.
    """
    patterns = list(target if target is not None else getattr(module, "lora_targets", ()))
    if not patterns:
        raise ConfigError(
            f"apply_lora: no target patterns for {type(module).__name__}; pass target=[...] "
            "with the names of the Linear layers to adapt."
        )
    wrapped = {
        f"{name}.base" for name, sub in module.named_modules() if isinstance(sub, LoRALinear)
    }
    linears = {
        name: sub
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear) and name and name not in wrapped
    }
    unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in linears)]
    if unmatched:
        raise ConfigError(
            f"apply_lora: pattern(s) {unmatched} match no Linear layer of "
            f"{type(module).__name__} (adaptable layers: {sorted(linears)}); fix the target "
            "patterns (layers already wrapped in LoRALinear no longer match)."
        )
    layers = []
    for name, linear in linears.items():
        if any(fnmatchcase(name, p) for p in patterns):
            parent_name, _, child = name.rpartition(".")
            layer = LoRALinear(
                linear,
                rank,
                protect_adapters=protect_adapters,
                protect_base=protect_base,
                energy=energy,
                protect_features=protect_features,
            )
            setattr(module.get_submodule(parent_name), child, layer)
            layers.append(layer)
    return layers


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    """All :class:`LoRALinear` layers of a model, in module order.

    Args:
        module: The model.

    Returns:
        The layers (empty if ``apply_lora`` was never called).
    """
    return [sub for sub in module.modules() if isinstance(sub, LoRALinear)]


def _require_lora(module: nn.Module) -> list[LoRALinear]:
    """The model's LoRA layers, or a ConfigError naming the fix."""
    layers = lora_layers(module)
    if not layers:
        raise ConfigError(
            f"{type(module).__name__} has no LoRALinear layer; call apply_lora(model) first."
        )
    return layers


def add_lora_adapters(module: nn.Module) -> None:
    """Call :meth:`LoRALinear.add_adapter` on every LoRA layer (start of a new task).

    Only the LoRA layers are frozen/unfrozen here; freezing the rest of the model (norms, old
    heads) is the training code's decision. Warns once, naming the layers, when the protections
    leave some layer fewer free directions than the rank.

    Args:
        module: A model that went through :func:`apply_lora`.

    Raises:
        ConfigError: If the model has no LoRA layer.
    """
    _require_lora(module)
    cramped = []
    for name, layer in module.named_modules():
        if isinstance(layer, LoRALinear):
            layer.add_adapter(warn=False)
            free_in, free_out = layer.free_directions()
            if min(free_in, free_out) < layer.rank:
                cramped.append(f"{name} {free_in}/{free_out}")
    if cramped:
        warnings.warn(
            f"LoRALinear: the protections leave fewer directions free (input/output) than the "
            f"rank in {len(cramped)} layer(s): {', '.join(cramped)}; their new adapters can only "
            "learn within them. Lower energy / feature_energy or switch a protection off if the "
            "new task does not learn.",
            stacklevel=2,
        )


def lora_orthogonality_penalty(module: nn.Module) -> torch.Tensor:
    """The sum over LoRA layers of :meth:`LoRALinear.orthogonality_penalty`.

    Args:
        module: A model that went through :func:`apply_lora`.

    Returns:
        A differentiable scalar (multiply by λ in the loss).

    Raises:
        ConfigError: If the model has no LoRA layer.
    """
    return torch.stack([layer.orthogonality_penalty() for layer in _require_lora(module)]).sum()


def project_lora_gradients(module: nn.Module) -> None:
    """Call :meth:`LoRALinear.project_gradients` on every LoRA layer (after ``backward``).

    Args:
        module: A model that went through :func:`apply_lora`.

    Raises:
        ConfigError: If the model has no LoRA layer.
    """
    for layer in _require_lora(module):
        layer.project_gradients()


def project_lora_weights(module: nn.Module) -> None:
    """Call :meth:`LoRALinear.project_weights` on every LoRA layer (after the optimiser step).

    Args:
        module: A model that went through :func:`apply_lora`.

    Raises:
        ConfigError: If the model has no LoRA layer.
    """
    for layer in _require_lora(module):
        layer.project_weights()


@torch.no_grad()
def protect_seen_inputs(module: nn.Module, run: Callable[[], object], energy: float) -> list[int]:
    """Record what every LoRA layer sees while ``run()`` runs the model, and protect it.

    Call after a task, with ``run`` feeding that task's data through ``module`` (unpadded, e.g.
    one bag per batch: padding rows would be protected too). Only layers with
    ``protect_features`` on store the directions.

    Args:
        module: A model that went through :func:`apply_lora`.
        run: Runs the model over the task's data.
        energy: Fraction of each layer's input energy ``Σ |x|²`` to protect, in (0, 1].

    Returns:
        The number of protected feature directions of each layer, in module order.

    Raises:
        ConfigError: If the model has no LoRA layer or ``energy`` is outside (0, 1].
    """
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"protect_seen_inputs: energy must be in (0, 1], got {energy!r}.")
    layers = _require_lora(module)
    grams = {  # only the layers that keep what they saw are recorded
        layer: layer.base.weight.new_zeros(
            layer.in_features, layer.in_features, dtype=torch.float64
        )
        for layer in layers
        if layer.protect_features
    }

    def accumulate(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        grams[cast(LoRALinear, layer)] += x.T @ x

    handles = [layer.register_forward_pre_hook(accumulate) for layer in grams]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [
        layer.add_protected_inputs(grams[layer], energy) if layer in grams else 0
        for layer in layers
    ]
