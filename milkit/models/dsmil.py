"""Dual-stream MIL (DSMIL; Li, Li & Eliceiri 2021), the aggregator milkit uses for Self-ViT-MIL.

Two streams share the (optionally embedded) tiles h_i (docs/papers.md B):

- instance stream: a linear classifier gives tile logits ``c_i`` (B, N, C); the critical
  instance of class k is ``m_k = argmax_i c_ik`` over the bag's real tiles;
- bag stream: queries ``q_i = Q(h_i)`` and values ``v_i = V(h_i)``; for each class k the
  attention ``U_ik = softmax_i(<q_i, q_{m_k}> / sqrt(d_q))`` pools ``b_k = Σ_i U_ik v_i``, and a
  linear layer over all class embeddings gives the bag logits.

The model returns the bag-stream logits as ``logits`` and the instance logits as
``tile_scores``; the training module gets the instance-stream bag logits ``c_m`` with
:func:`critical_instance_logits` (the paper's loss is ``½ CE(c_m, y) + ½ CE(logits, y)`` and
its prediction the mean of the two streams; losses live in ``milkit.training``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from milkit.models.contract import MILModelBase
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    attention_pool,
    check_bags,
    check_dropout,
    check_mask,
    check_positive,
    instance_mlp,
    masked_softmax,
)


def critical_instances(tile_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring real tile of each bag, per class.

    Args:
        tile_scores: ``(B, N, C)`` instance logits.
        mask: ``(B, N)`` bool, True for real tiles; padded tiles are never chosen.

    Returns:
        ``(B, C)`` int64 tile indices.

    Raises:
        BagBatchError: If the mask does not fit or a bag is all padding.
    """
    check_mask(mask, tile_scores.shape[:2])
    return tile_scores.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)


def critical_instance_logits(tile_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The instance stream's bag logits: per class, the largest instance logit over real tiles.

    Args:
        tile_scores: ``(B, N, C)`` instance logits (DSMIL's ``MILOutput.tile_scores``).
        mask: ``(B, N)`` bool, True for real tiles.

    Returns:
        ``(B, C)`` logits ``c_m``, differentiable with respect to ``tile_scores``.

    Raises:
        BagBatchError: If the mask does not fit or a bag is all padding.
    """
    index = critical_instances(tile_scores, mask)
    return tile_scores.gather(1, index.unsqueeze(1)).squeeze(1)


class DSMIL(MILModelBase):
    """Dual-stream MIL classifier over a padded batch of bags.

    Attention is ``(B, N, C)``: column k is the bag-stream attention ``U_·k`` around class k's
    critical instance (``(B, N)`` when C == 1). For a binary task with two logits, column 1 is
    the tumour (positive-class) map.
    """

    #: Trained with half its loss on the critical instance (docs/papers.md B).
    default_instance_loss_weight: ClassVar[float] = 0.5

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int | None = None,
        query_dim: int = 128,
        dropout: float = 0.0,
        nonlinear_query: bool = True,
        value_projection: bool = False,
    ) -> None:
        """Build the network.

        Args:
            in_dim: Tile feature size D (the encoder's embedding size).
            n_classes: Number of classes C.
            hidden_dim: Size of an input MLP (Linear, ReLU, Dropout) shared by both streams;
                0 or None (the original DSMIL) to use the raw features.
            query_dim: Size d_q of the queries.
            dropout: Dropout probability in the input MLP and on the values.
            nonlinear_query: Queries from Linear-ReLU-Linear-Tanh (the original) rather than one
                Linear layer.
            value_projection: Values from Linear-ReLU of the embeddings rather than the
                embeddings themselves (the original's ``passing_v``).

        Raises:
            ConfigError: If a size is not positive or dropout is outside [0, 1).
        """
        super().__init__()
        check_positive("DSMIL", in_dim=in_dim, n_classes=n_classes, query_dim=query_dim)
        check_dropout("DSMIL", dropout)
        self.n_classes = n_classes
        self.embed, embed_dim = instance_mlp(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        if nonlinear_query:
            self.query: nn.Module = nn.Sequential(
                nn.Linear(embed_dim, query_dim),
                nn.ReLU(),
                nn.Linear(query_dim, query_dim),
                nn.Tanh(),
            )
        else:
            self.query = nn.Linear(embed_dim, query_dim)
        value_layers: list[nn.Module] = [nn.Dropout(dropout)]
        if value_projection:
            value_layers += [nn.Linear(embed_dim, embed_dim), nn.ReLU()]
        self.value = nn.Sequential(*value_layers)
        # One linear map over all C class embeddings: the original's Conv1d(C, C, kernel=E).
        self.bag_classifier = nn.Linear(n_classes * embed_dim, n_classes)
        self.query_scale = 1.0 / math.sqrt(query_dim)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None
    ) -> MILOutput:
        """Classify each bag with the bag stream.

        Args:
            features: ``(B, N, D)`` float tile features; padded rows may hold anything.
            mask: ``(B, N)`` bool, True for real tiles.
            coords: ``(B, N, 2)`` level-0 tile corners; unused (the contract's argument).

        Returns:
            MILOutput with ``logits (B, C)`` from the bag stream; ``attention (B, N, C)``
            (``(B, N)`` when C == 1); ``tile_scores (B, N, C)`` instance logits, 0 on padding
            (take the instance-stream bag logits with :func:`critical_instance_logits`);
            ``embedding (B, C * E)``, the flattened class embeddings ``b``.

        Raises:
            BagBatchError: If the batch is malformed or a bag is all padding.
        """
        check_bags(features, mask)
        instances = self.embed(features)
        tile_scores = self.instance_classifier(instances).masked_fill(~mask.unsqueeze(-1), 0.0)
        queries = self.query(instances)
        critical = critical_instances(tile_scores, mask)
        critical_queries = queries.gather(
            1, critical.unsqueeze(-1).expand(-1, -1, queries.shape[-1])
        )
        similarity = queries @ critical_queries.transpose(1, 2) * self.query_scale
        if self.n_classes == 1:
            similarity = similarity.squeeze(-1)
        attention = masked_softmax(similarity, mask)
        class_embeddings = attention_pool(self.value(instances), attention, mask)
        embedding = class_embeddings.reshape(len(class_embeddings), -1)
        return MILOutput(
            attention=attention,
            logits=self.bag_classifier(embedding),
            tile_scores=tile_scores,
            embedding=embedding,
        )
