"""Attention pooling over padded bags of tiles: the building block every MIL head shares.

A batch of bags is ``features (B, N, D)`` with ``mask (B, N)`` (True = real tile, False =
padding). Attention is a masked softmax over the tile axis, so padded positions get exactly
zero weight and the weights over each bag's real tiles sum to 1 (docs/design.md §6).

References: Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple Instance Learning"
(plain attention ``softmax(wᵀ tanh(V h))`` and gated attention
``softmax(wᵀ (tanh(V h) ⊙ sigmoid(U h)))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from milkit.errors import BagBatchError, ConfigError


class Pooled(NamedTuple):
    """The result of attention pooling.

    Attributes:
        embedding: ``(B, D)`` for one head, ``(B, H, D)`` for ``H > 1`` heads: ``Σ_i a_i h_i``.
        attention: ``(B, N)`` for one head, ``(B, N, H)`` for ``H > 1`` heads.
    """

    embedding: torch.Tensor
    attention: torch.Tensor


def check_positive(owner: str, **values: int | float) -> None:
    """Reject non-positive sizes in a constructor with a message naming the argument.

    Args:
        owner: Class name shown in the message (e.g. ``"ABMIL"``).
        **values: Argument names and values that must be > 0.

    Raises:
        ConfigError: If any value is not > 0.
    """
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}: {name} must be > 0, got {value!r}; fix it in the config.")


def check_dropout(owner: str, dropout: float) -> None:
    """Reject a dropout probability outside [0, 1).

    Args:
        owner: Class name shown in the message.
        dropout: The probability to check.

    Raises:
        ConfigError: If ``dropout`` is not in [0, 1).
    """
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{owner}: dropout must be in [0, 1), got {dropout!r}.")


def check_bags(features: torch.Tensor, mask: torch.Tensor) -> None:
    """Validate a padded batch of bags.

    Args:
        features: ``(B, N, D)`` tile features.
        mask: ``(B, N)`` bool, True for real tiles.

    Raises:
        BagBatchError: If the shapes disagree, the mask is not bool, or a bag is all padding.
    """
    if features.dim() != 3:
        raise BagBatchError(
            f"features must be (B, N, D), got shape {tuple(features.shape)}; "
            "add a batch axis with features[None] for a single bag."
        )
    check_mask(mask, features.shape[:2])


def check_mask(mask: torch.Tensor, batch_shape: Sequence[int]) -> None:
    """Validate a tile mask against the ``(B, N)`` shape it must have.

    Args:
        mask: ``(B, N)`` bool, True for real tiles.
        batch_shape: The expected ``(B, N)``.

    Raises:
        BagBatchError: If the shape or dtype is wrong, or a bag has no real tile.
    """
    if tuple(mask.shape) != tuple(batch_shape):
        raise BagBatchError(
            f"mask has shape {tuple(mask.shape)} but the tiles are {tuple(batch_shape)}; "
            "the mask must be (B, N) with one entry per tile."
        )
    if mask.dtype != torch.bool:
        raise BagBatchError(
            f"mask must be bool (True = real tile), got {mask.dtype}; pass mask.bool()."
        )
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise BagBatchError(
            f"bag(s) at batch index {empty} have no real tile (mask all False); "
            "drop slides without tiles before batching."
        )


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the tile axis that gives padded tiles exactly zero weight.

    Computed in at least float32 (also under bf16 autocast) so the weights sum to 1.

    Args:
        scores: ``(B, N)`` or ``(B, N, H)`` unnormalised scores, one column per head.
        mask: ``(B, N)`` bool, True for real tiles.

    Returns:
        Weights with the shape of ``scores``, dtype at least float32; 0 on padding and summing to
        1 over the real tiles of each bag (per head).

    Raises:
        BagBatchError: If the mask does not fit ``scores`` or a bag has no real tile.
    """
    check_mask(mask, scores.shape[:2])
    keep = mask if scores.dim() == 2 else mask.unsqueeze(-1)
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
    return wide.masked_fill(~keep, float("-inf")).softmax(dim=1)


def attention_pool(
    features: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The attention-weighted sum ``Σ_i a_i h_i`` over each bag's tiles.

    Padded rows are zeroed first, so non-finite junk in padding cannot leak in as ``0 · inf``.

    Args:
        features: ``(B, N, D)`` instance embeddings.
        attention: ``(B, N)`` or ``(B, N, H)`` weights (0 on padding).
        mask: ``(B, N)`` bool, True for real tiles.

    Returns:
        ``(B, D)`` for 2-d attention, ``(B, H, D)`` for 3-d attention.
    """
    clean = features.masked_fill(~mask.unsqueeze(-1), 0.0)
    weights = attention.to(clean.dtype)
    if weights.dim() == 2:
        return (weights.unsqueeze(1) @ clean).squeeze(1)
    return weights.transpose(1, 2) @ clean


def instance_mlp(in_dim: int, hidden_dim: int | None, dropout: float) -> tuple[nn.Module, int]:
    """The optional per-tile input MLP of the MIL heads: Linear -> ReLU -> Dropout.

    Args:
        in_dim: Tile feature size D.
        hidden_dim: Output size; 0 or None for no MLP (identity).
        dropout: Dropout probability after the ReLU.

    Returns:
        The module, mapping ``(..., D)`` to ``(..., E)``, and its output size ``E``.

    Raises:
        ConfigError: If ``hidden_dim`` is negative.
    """
    if hidden_dim is not None and hidden_dim < 0:
        raise ConfigError(f"hidden_dim must be >= 0 (0 or null: no input MLP), got {hidden_dim}.")
    if not hidden_dim:
        return nn.Identity(), in_dim
    mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
    return mlp, hidden_dim


class AttentionPooling(nn.Module):
    """Attention pooling (Ilse et al. 2018): ``a_i = softmax_i(wᵀ tanh(V h_i))``, ``z = Σ a_i h_i``.

    With ``n_heads = H > 1`` there are H score vectors w sharing V (one attention map per head,
    e.g. one per class).

    Attributes:
        tanh_proj: The ``V`` layer, ``D -> attention_dim``.
        score: The ``w`` layer, ``attention_dim -> H``.
    """

    def __init__(
        self, in_dim: int, attention_dim: int = 128, n_heads: int = 1, dropout: float = 0.0
    ) -> None:
        """Build the layers.

        Args:
            in_dim: Instance embedding size D.
            attention_dim: Hidden size of the attention network.
            n_heads: Number of attention heads (branches) H.
            dropout: Dropout on the attention hidden layer.

        Raises:
            ConfigError: If a size is not positive or dropout is outside [0, 1).
        """
        super().__init__()
        check_positive(
            type(self).__name__, in_dim=in_dim, attention_dim=attention_dim, n_heads=n_heads
        )
        check_dropout(type(self).__name__, dropout)
        self.n_heads = n_heads
        self.tanh_proj = nn.Linear(in_dim, attention_dim)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(attention_dim, n_heads)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """The attention network's hidden layer ``tanh(V h)``.

        Args:
            features: ``(B, N, D)``.

        Returns:
            ``(B, N, attention_dim)``.
        """
        return torch.tanh(self.tanh_proj(features))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores (no mask applied).

        Args:
            features: ``(B, N, D)``.

        Returns:
            ``(B, N, H)``.
        """
        return self.score(self.dropout(self.hidden(features)))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> Pooled:
        """Attend over each bag's real tiles and pool them.

        Args:
            features: ``(B, N, D)`` instance embeddings.
            mask: ``(B, N)`` bool, True for real tiles.

        Returns:
            ``Pooled(embedding, attention)``: ``(B, D)`` and ``(B, N)`` for one head,
            ``(B, H, D)`` and ``(B, N, H)`` for ``H > 1``.

        Raises:
            BagBatchError: If the batch is malformed or a bag is all padding.
        """
        check_bags(features, mask)
        scores = self.scores(features)
        if self.n_heads == 1:
            scores = scores.squeeze(-1)
        attention = masked_softmax(scores, mask)
        return Pooled(attention_pool(features, attention, mask), attention)


class GatedAttentionPooling(AttentionPooling):
    """Gated attention pooling (Ilse et al. 2018):
    ``a_i = softmax_i(wᵀ (tanh(V h_i) ⊙ sigmoid(U h_i)))``, ``z = Σ a_i h_i``.

    Attributes:
        tanh_proj: The ``V`` layer, ``D -> attention_dim``.
        gate_proj: The ``U`` layer, ``D -> attention_dim``.
        score: The ``w`` layer, ``attention_dim -> H``.
    """

    def __init__(
        self, in_dim: int, attention_dim: int = 128, n_heads: int = 1, dropout: float = 0.0
    ) -> None:
        """Build the layers.

        Args:
            in_dim: Instance embedding size D.
            attention_dim: Hidden size of the attention network.
            n_heads: Number of attention heads (branches) H.
            dropout: Dropout on the gated hidden layer.

        Raises:
            ConfigError: If a size is not positive or dropout is outside [0, 1).
        """
        super().__init__(in_dim, attention_dim, n_heads, dropout)
        self.gate_proj = nn.Linear(in_dim, attention_dim)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """The gated hidden layer ``tanh(V h) ⊙ sigmoid(U h)``.

        Args:
            features: ``(B, N, D)``.

        Returns:
            ``(B, N, attention_dim)``.
        """
        return torch.tanh(self.tanh_proj(features)) * torch.sigmoid(self.gate_proj(features))
