"""Tile-score regression from a slide-level value (WeakSTIL; Schirris et al. 2022).

Every tile gets a score ``s_i = sigmoid(φ(h_i))`` in [0, 1] and the slide value is a weighted
mean of the tile scores, ``ŷ = Σ_i a_i s_i``, also in [0, 1] (docs/papers.md C). The weights are
uniform over the real tiles (``pooling="mean"``) or gated attention over the tile features
(``pooling="attention"``, the later ECTIL form), which can learn to weight e.g. stroma when the
target (sTIL%) is defined over one tissue type.

Restricting the regression to a tile subset (e.g. the tumour bed) needs nothing here: the data
layer ANDs the subset into ``mask``, and tiles outside it get zero weight like padding.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from milkit.errors import ConfigError
from milkit.models.contract import MILModelBase
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    GatedAttentionPooling,
    check_bags,
    check_dropout,
    check_positive,
    masked_softmax,
)

PoolingMode = Literal["mean", "attention"]


class TileScoreRegressor(MILModelBase):
    """Per-tile scores in [0, 1] pooled into one slide value in [0, 1]."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        dropout: float = 0.25,
        pooling: PoolingMode = "attention",
        attention_dim: int = 128,
    ) -> None:
        """Build the network.

        Args:
            in_dim: Tile feature size D (the encoder's embedding size).
            hidden_dim: Hidden size of the tile MLP φ (Linear, ReLU, Dropout, Linear).
            dropout: Dropout probability in the tile MLP and the attention network.
            pooling: ``"mean"``: the slide value is the mean tile score over real tiles;
                ``"attention"``: gated attention over the tile features weights the scores.
            attention_dim: Hidden size of the gated attention network (unused for ``"mean"``).

        Raises:
            ConfigError: If a size is not positive, dropout is outside [0, 1) or ``pooling``
                is unknown.
        """
        super().__init__()
        check_positive("TileScoreRegressor", in_dim=in_dim, hidden_dim=hidden_dim)
        check_dropout("TileScoreRegressor", dropout)
        if pooling not in get_args(PoolingMode):
            raise ConfigError(
                f"TileScoreRegressor: pooling must be one of {get_args(PoolingMode)}, got {pooling!r}."
            )
        self.tile_mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        self.pooling = (
            GatedAttentionPooling(in_dim, attention_dim, dropout=dropout)
            if pooling == "attention"
            else None
        )

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
    ) -> MILOutput:
        """Score every tile and pool the scores into a slide value.

        Args:
            features: ``(B, N, D)`` float tile features; padded rows may hold anything.
            mask: ``(B, N)`` bool, True for tiles to use (real tiles, optionally ANDed with a
                tissue subset such as the tumour bed).
            coords: ``(B, N, 2)`` level-0 tile corners; unused (the contract's argument).

        Returns:
            MILOutput with ``value (B,)`` in [0, 1]; ``tile_scores (B, N)`` in [0, 1], 0 on
            padding; ``attention (B, N)``, uniform over real tiles for ``"mean"`` pooling.

        Raises:
            BagBatchError: If the batch is malformed or a bag has no tile to use.
        """
        check_bags(features, mask)
        tile_scores = torch.sigmoid(self.tile_mlp(features).squeeze(-1))
        tile_scores = tile_scores.masked_fill(~mask, 0.0)
        if self.pooling is None:
            attention = masked_softmax(torch.zeros_like(tile_scores), mask)
        else:
            attention = masked_softmax(self.pooling.scores(features).squeeze(-1), mask)
        value = (attention * tile_scores).sum(dim=1)
        return MILOutput(attention=attention, value=value, tile_scores=tile_scores)
