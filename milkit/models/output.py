"""What every MIL model returns (docs/design.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MILOutput:
    """The output of a MIL model for a padded batch of bags.

    Attributes:
        logits: ``(B, C)`` class logits for classification models, else None.
        value: ``(B,)`` slide-level value in [0, 1] for regression models, else None.
        attention: ``(B, N)`` or ``(B, N, H)`` attention over tiles; zero on padding and summing
            to 1 over the real tiles of each bag (per head).
        tile_scores: ``(B, N)`` or ``(B, N, C)`` per-tile scores where the method has them
            (instance logits, tile regression scores), else None.
        embedding: ``(B, E)`` (or ``(B, H, E)`` for one attention branch per class) bag embedding
            before the head, where the method has one.
    """

    attention: torch.Tensor
    logits: torch.Tensor | None = None
    value: torch.Tensor | None = None
    tile_scores: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
