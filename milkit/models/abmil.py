"""Attention-based MIL (ABMIL; Ilse, Tomczak & Welling 2018), optionally multi-branch.

Tiles go through an optional input MLP, (gated) attention pools them into a bag embedding,
and a linear head turns the embedding into class logits. With ``multi_branch=True`` every
class has its own attention branch and each class's logit is read from its own branch's
embedding (the idea CLAM uses), so the attention map of class c shows the evidence for c.
"""

from __future__ import annotations

import torch
from torch import nn

from milkit.models.contract import MILModelBase
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    AttentionPooling,
    GatedAttentionPooling,
    check_bags,
    check_dropout,
    check_positive,
    instance_mlp,
)


class ABMIL(MILModelBase):
    """Attention-MIL classifier over a padded batch of bags.

    Because attention sums to 1 over real tiles and the head is linear, the bag logits equal
    the attention-weighted mean of the tile scores: ``logits[b, c] = Σ_i a_i tile_scores[b, i, c]``
    (with each class's own attention when ``multi_branch``).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int | None = 512,
        attention_dim: int = 128,
        gated: bool = True,
        dropout: float = 0.25,
        multi_branch: bool = False,
    ) -> None:
        """Build the network.

        Args:
            in_dim: Tile feature size D (the encoder's embedding size).
            n_classes: Number of classes C (logits per bag).
            hidden_dim: Size of the input MLP (Linear, ReLU, Dropout) applied to every tile;
                0 or None to attend over the raw features.
            attention_dim: Hidden size of the attention network.
            gated: Use gated attention (tanh ⊙ sigmoid) instead of plain tanh attention.
            dropout: Dropout probability in the input MLP and the attention network.
            multi_branch: One attention branch per class; each class's logit comes from its own
                branch's embedding and attention becomes ``(B, N, C)``.

        Raises:
            ConfigError: If a size is not positive or dropout is outside [0, 1).
        """
        super().__init__()
        check_positive("ABMIL", in_dim=in_dim, n_classes=n_classes, attention_dim=attention_dim)
        check_dropout("ABMIL", dropout)
        self.n_classes = n_classes
        self.multi_branch = multi_branch
        self.embed, embed_dim = instance_mlp(in_dim, hidden_dim, dropout)
        pooling_cls = GatedAttentionPooling if gated else AttentionPooling
        self.pooling = pooling_cls(
            embed_dim, attention_dim, n_heads=n_classes if multi_branch else 1, dropout=dropout
        )
        self.head = nn.Linear(embed_dim, n_classes)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
    ) -> MILOutput:
        """Classify each bag.

        Args:
            features: ``(B, N, D)`` float tile features; padded rows may hold anything.
            mask: ``(B, N)`` bool, True for real tiles.
            coords: ``(B, N, 2)`` level-0 tile corners; unused (the contract's argument).

        Returns:
            MILOutput with ``logits (B, C)``; ``attention (B, N)``, or ``(B, N, C)`` when
            ``multi_branch`` with C > 1; ``tile_scores (B, N, C)``, the head applied to each
            tile's embedding (0 on padding), for heatmaps; ``embedding (B, E)``, or
            ``(B, C, E)`` per branch when ``multi_branch`` with C > 1.

        Raises:
            BagBatchError: If the batch is malformed or a bag is all padding.
        """
        check_bags(features, mask)
        instances = self.embed(features)
        embedding, attention = self.pooling(instances, mask)
        if self.multi_branch:
            per_branch = embedding.reshape(len(embedding), self.n_classes, -1)
            # Class c reads only branch c: the diagonal of the (branch x class) logit matrix.
            logits = (per_branch * self.head.weight).sum(-1) + self.head.bias
        else:
            logits = self.head(embedding)
        tile_scores = self.head(instances).masked_fill(~mask.unsqueeze(-1), 0.0)
        return MILOutput(
            attention=attention, logits=logits, tile_scores=tile_scores, embedding=embedding
        )
