"""Per-dimension feature standardisation, the first step of every MIL model's input.

Tile features straight from an encoder (or raw benchmark features) have dimensions on very
different scales; an attention MLP trained with one learning rate sees the large ones only.
:class:`FeatureStandardizer` maps each dimension to zero mean and unit variance with statistics
fitted on the training part alone (the training module fits it; this module only holds and
applies them). The statistics are buffers, so every checkpoint carries them and prediction
applies exactly what training used. Before it is fitted, or when standardisation is off, it is
the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from milkit.errors import ConfigError

#: A dimension whose standard deviation is below this is constant: it is centred, not scaled.
MIN_STD = 1e-6


class FeatureStandardizer(nn.Module):
    """``(x - mean) / std`` per feature dimension; the identity until :meth:`fit` is called.

    Attributes:
        mean: ``(D,)`` float32, or ``(0,)`` when not fitted.
        std: ``(D,)`` float32, or ``(0,)`` when not fitted.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))

    @property
    def fitted(self) -> bool:
        """Whether statistics are set (else the module is the identity)."""
        return self.mean.numel() > 0

    def fit(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the statistics.

        Args:
            mean: ``(D,)`` per-dimension mean of the training tiles.
            std: ``(D,)`` per-dimension standard deviation; values below :data:`MIN_STD`
                (constant dimensions) are replaced by 1.

        Raises:
            ConfigError: Shapes that are not one equal ``(D,)``, or non-finite values.
        """
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ConfigError(
                f"standardisation needs (D,) mean and std, got {tuple(mean.shape)} and "
                f"{tuple(std.shape)}."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ConfigError(
                "the training features hold NaN or infinite values; re-extract the feature "
                "files or set --model.standardize off."
            )
        device = self.mean.device
        self.mean = mean.detach().to(device, torch.float32).clone()
        self.std = torch.where(std < MIN_STD, torch.ones_like(std), std).to(device, torch.float32)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Standardise features.

        Args:
            features: ``(..., D)`` float features.

        Returns:
            ``(..., D)`` standardised features (the input itself when not fitted).
        """
        if not self.fitted:
            return features
        return (features - self.mean) / self.std

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The statistics' size is only known once fitted: take the checkpoint's, fitted or not.
        for name in ("mean", "std"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
