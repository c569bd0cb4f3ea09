"""GDAT: the grouped double attention transformer of CoMEL (Lee et al., ICCV 2025; docs/papers.md D.1).

Tiles are embedded (Linear -> ReLU -> Dropout), pass through pre-norm transformer blocks whose
attention costs O(N·G·d) instead of O(N²·d), are pooled by gated attention, and one linear head
per task turns the bag embedding into logits.

Grouped double attention, per block and head (d = head size):

1. the N tile tokens are averaged into G group tokens (see below; empty groups are masked);
2. groups gather from tiles: ``A1 = softmax(Q_g Kᵀ / √d)`` over the bag's real tiles (G x N),
   ``V_g = A1 V``;
3. tiles read back from groups: ``A2 = softmax(Q K_gᵀ / √d)`` over the non-empty groups (N x G),
   ``out = A2 V_g + γ V`` with a learnable per-head scale ``γ`` (initialised to 0.1) that keeps
   each tile's own value in its output.

``Q, K, V`` come from one ``qkv`` Linear applied to the tile tokens, ``Q_g, K_g`` from the same
Linear applied to the group tokens. Padded tiles are zeroed on entry, take no part in any group
and are masked out of ``A1`` and of the pooling, so padding never changes the output.

Group formation (computed once per forward with scatter operations, shared by the blocks):

- ``"spatial"`` (default, the natural generalisation of the authors' grid): a ``s x s`` grid,
  ``s = √G``, is laid over the bounding box of each bag's real tile coordinates (x and y scaled
  separately, so cells follow the box's aspect); a tile belongs to the cell holding its top-left
  corner; a group token is the mean of its cell's tiles. Neighbouring tiles share a group.
- ``"order"`` (the authors'): the bag's real tiles, in their order, fill an ``L x L`` square,
  ``L = ceil(√n)``, row by row; tile ``i`` sits at ``(r, c) = (i // L, i % L)`` and joins group
  ``(r mod s) · s + (c mod s)``, i.e. positions sharing an offset inside ``s x s`` windows are
  averaged (a dilated grid). Used whenever ``coords`` is None.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from milkit.errors import BagBatchError, ConfigError
from milkit.models.contract import MILModelBase
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    GatedAttentionPooling,
    check_bags,
    check_dropout,
    check_positive,
    instance_mlp,
)

Grouping = Literal["spatial", "order"]


def spatial_groups(coords: torch.Tensor, mask: torch.Tensor, grid_side: int) -> torch.Tensor:
    """Assign each tile to a cell of a ``grid_side x grid_side`` grid over its bag's bounding box.

    Args:
        coords: ``(B, N, 2)`` level-0 ``(x, y)`` of each tile's top-left corner (any real dtype).
        mask: ``(B, N)`` bool, True for real tiles; padded tiles do not shape the box.
        grid_side: Cells per side ``s``.

    Returns:
        ``(B, N)`` int64 group index ``cell_y · s + cell_x`` in ``[0, s²)``; 0 on padding.
    """
    keep = mask.unsqueeze(-1)
    # float64 keeps level-0 pixel coordinates (up to ~1e6) exact.
    xy = coords.to(torch.float64)
    low = xy.masked_fill(~keep, math.inf).amin(dim=1, keepdim=True)
    high = xy.masked_fill(~keep, -math.inf).amax(dim=1, keepdim=True)
    span = (high - low).clamp(min=1.0)
    cell = ((xy - low) / span * grid_side).nan_to_num(0.0).floor().clamp(0, grid_side - 1).long()
    groups = cell[..., 1] * grid_side + cell[..., 0]
    return groups.masked_fill(~mask, 0)


def order_groups(mask: torch.Tensor, window: int) -> torch.Tensor:
    """The authors' grouping: tiles in bag order on a square, grouped by offset in ``s x s`` windows.

    Only real tiles are counted, so padding anywhere in the bag does not move them.

    Args:
        mask: ``(B, N)`` bool, True for real tiles.
        window: Window side ``s``.

    Returns:
        ``(B, N)`` int64 group index ``(r mod s) · s + (c mod s)`` in ``[0, s²)``; 0 on padding.
    """
    rank = mask.long().cumsum(dim=1) - 1
    side = mask.sum(dim=1, keepdim=True).double().sqrt().ceil().long().clamp(min=1)
    row, col = rank // side, rank % side
    groups = (row % window) * window + col % window
    return groups.masked_fill(~mask, 0)


def group_means(
    tokens: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the real tile tokens of every group.

    Args:
        tokens: ``(B, N, d)`` tile tokens.
        groups: ``(B, N)`` int64 group index in ``[0, n_groups)``.
        mask: ``(B, N)`` bool, True for real tiles (padded tiles count in no group).
        n_groups: Number of groups G.

    Returns:
        ``(B, G, d)`` group tokens (zero for empty groups) and ``(B, G)`` bool, True for
        non-empty groups.
    """
    batch, _, dim = tokens.shape
    # Counts in float32 so they stay exact under half-precision autocast.
    weights = mask.float()
    counts = weights.new_zeros(batch, n_groups).scatter_add_(1, groups, weights)
    sums = tokens.new_zeros(batch, n_groups, dim).scatter_add_(
        1, groups.unsqueeze(-1).expand(-1, -1, dim), tokens * mask.unsqueeze(-1).to(tokens.dtype)
    )
    means = sums / counts.clamp(min=1.0).unsqueeze(-1).to(tokens.dtype)
    return means, counts > 0


class GroupedDoubleAttention(nn.Module):
    """Multi-head grouped double attention (module docstring, steps 1-3).

    Attributes:
        qkv: ``d -> 3d`` projection shared by tile and group tokens.
        proj: ``d -> d`` output projection.
        value_scale: ``(H,)`` learnable scale γ of the per-tile value residual.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        """Build the layers.

        Args:
            dim: Token size d (divisible by ``n_heads``).
            n_heads: Number of heads H.
            dropout: Dropout after the output projection.
        """
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.value_scale = nn.Parameter(torch.full((n_heads,), 0.1))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``(B, M, d)`` tokens to queries, keys and values, each ``(B, H, M, d/H)``."""
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.n_heads, dim // self.n_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return query, key, value

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, n_groups: int
    ) -> torch.Tensor:
        """Attend tiles -> groups -> tiles.

        Args:
            tokens: ``(B, N, d)`` tile tokens (finite on padding).
            mask: ``(B, N)`` bool, True for real tiles.
            groups: ``(B, N)`` int64 group of each tile.
            n_groups: Number of groups G.

        Returns:
            ``(B, N, d)`` updated tokens (padded rows hold finite values to be ignored).
        """
        query, key, value = self._heads(tokens)
        group_tokens, group_mask = group_means(tokens, groups, mask, n_groups)
        group_query, group_key, _ = self._heads(group_tokens)
        group_value = F.scaled_dot_product_attention(
            group_query, key, value, attn_mask=mask[:, None, None, :]
        )
        out = F.scaled_dot_product_attention(
            query, group_key, group_value, attn_mask=group_mask[:, None, None, :]
        )
        out = out + self.value_scale.view(-1, 1, 1).to(value.dtype) * value
        out = out.transpose(1, 2).reshape(tokens.shape)
        return self.dropout(self.proj(out))


class GDATBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``.

    Attributes:
        attn: The grouped double attention.
        mlp: ``fc1 (d -> r·d)``, GELU, dropout, ``fc2 (r·d -> d)``, dropout.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        """Build the layers.

        Args:
            dim: Token size d.
            n_heads: Attention heads.
            mlp_ratio: MLP hidden size as a multiple of d.
            dropout: Dropout in attention output and MLP.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupedDoubleAttention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("drop1", nn.Dropout(dropout))
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))
        self.mlp.add_module("drop2", nn.Dropout(dropout))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, n_groups: int
    ) -> torch.Tensor:
        """Apply the block to ``(B, N, d)`` tokens (arguments as in GroupedDoubleAttention)."""
        tokens = tokens + self.attn(self.norm1(tokens), mask, groups, n_groups)
        return tokens + self.mlp(self.norm2(tokens))


class GDATMIL(MILModelBase):
    """CoMEL's bag classifier: embedding, GDAT blocks, gated attention pooling, one head per task.

    Class-incremental evaluation concatenates all heads' logits (``task=None``); task-incremental
    evaluation and training read one task's head. ``lora_targets`` names the layers OWLoRA adapts
    (for :func:`milkit.models.lora_model.apply_lora`): the embedding, qkv, output projection, MLP
    layers and the first layer of the attention pooling (its tanh and gate branches), not the heads.

    With ``attention_per_task`` each task gets its own gated attention pooling (task 0 the
    model's ``pooling``, later tasks ``task_poolings``), trained with its head, so a task learnt
    after the shared layers are protected can attend to its own tiles; ``task=None`` then pools
    once per task and returns ``attention (B, N, T)``. The poolings are then not LoRA targets:
    each serves one task only.
    """

    supports_tasks: ClassVar[bool] = True
    _shared_lora_targets: ClassVar[tuple[str, ...]] = (
        "embed.0",
        "blocks.*.attn.qkv",
        "blocks.*.attn.proj",
        "blocks.*.mlp.fc1",
        "blocks.*.mlp.fc2",
    )

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The Linear layers OWLoRA adapts (``fnmatch`` patterns; class docstring)."""
        if self.attention_per_task:
            return self._shared_lora_targets
        return (*self._shared_lora_targets, "pooling.tanh_proj", "pooling.gate_proj")

    def __init__(
        self,
        in_dim: int,
        n_classes_per_task: list[int] | int = 2,
        embed_dim: int = 512,
        n_blocks: int = 2,
        n_heads: int = 8,
        mlp_ratio: int = 4,
        n_groups: int = 256,
        grouping: Grouping = "spatial",
        attention_dim: int = 128,
        dropout: float = 0.25,
        block_dropout: float = 0.1,
        attention_per_task: bool = False,
    ) -> None:
        """Build the network.

        Args:
            in_dim: Tile feature size D.
            n_classes_per_task: Classes of each task's head (an int for a single task).
            embed_dim: Token size after the embedding (divisible by ``n_heads``).
            n_blocks: Number of GDAT blocks.
            n_heads: Attention heads per block.
            mlp_ratio: MLP hidden size as a multiple of ``embed_dim``.
            n_groups: Group tokens G per block; a perfect square (grid of ``√G x √G``).
            grouping: ``"spatial"`` (grid over tile coordinates) or ``"order"`` (the authors'
                grid over tile order); ``"order"`` is also used when no coords are given.
            attention_dim: Hidden size of the gated attention pooling.
            dropout: Dropout after the embedding and in the attention pooling.
            block_dropout: Dropout inside the GDAT blocks.
            attention_per_task: Give every task its own attention pooling (class docstring);
                False shares one (CoMEL).

        Raises:
            ConfigError: If a size is not positive, ``embed_dim`` is not divisible by
                ``n_heads``, ``n_groups`` is not a perfect square, ``grouping`` is unknown or a
                dropout is outside [0, 1).
        """
        super().__init__()
        tasks = [n_classes_per_task] if isinstance(n_classes_per_task, int) else n_classes_per_task
        check_positive(
            "GDATMIL",
            in_dim=in_dim,
            embed_dim=embed_dim,
            n_blocks=n_blocks,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            n_groups=n_groups,
            attention_dim=attention_dim,
            n_tasks=len(tasks),
        )
        for name, value in (("dropout", dropout), ("block_dropout", block_dropout)):
            check_dropout(f"GDATMIL ({name})", value)
        if embed_dim % n_heads:
            raise ConfigError(
                f"GDATMIL: embed_dim={embed_dim} is not divisible by n_heads={n_heads}; "
                "choose sizes so every head gets embed_dim / n_heads channels."
            )
        self.grid_side = math.isqrt(n_groups)
        if self.grid_side**2 != n_groups:
            raise ConfigError(
                f"GDATMIL: n_groups={n_groups} is not a perfect square; groups form a "
                f"√G x √G grid, so use e.g. {self.grid_side**2} or {(self.grid_side + 1) ** 2}."
            )
        if grouping not in ("spatial", "order"):
            raise ConfigError(f"GDATMIL: grouping must be 'spatial' or 'order', got {grouping!r}.")
        self.n_groups = n_groups
        self.grouping = grouping
        self.embed_dim = embed_dim
        self.n_classes_per_task: list[int] = []
        self.embed, _ = instance_mlp(in_dim, embed_dim, dropout)
        self.blocks = nn.ModuleList(
            GDATBlock(embed_dim, n_heads, mlp_ratio, block_dropout) for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pooling = GatedAttentionPooling(embed_dim, attention_dim, dropout=dropout)
        self.attention_per_task = attention_per_task
        # The poolings of tasks 1, 2, ... when attention_per_task (task 0 uses `pooling`).
        self.task_poolings = nn.ModuleList()
        self.heads = nn.ModuleList()
        for n_classes in tasks:
            self.add_task(n_classes)

    @property
    def n_tasks(self) -> int:
        """Number of task heads."""
        return len(self.heads)

    def add_task(self, n_classes: int) -> int:
        """Append a linear head for a new task (on the device and dtype of the model).

        Args:
            n_classes: Classes of the new task.

        Returns:
            The new task's index.

        Raises:
            ConfigError: If ``n_classes`` is not positive.
        """
        check_positive("GDATMIL.add_task", n_classes=n_classes)
        reference = self.norm.weight
        head = nn.Linear(self.embed_dim, n_classes, device=reference.device, dtype=reference.dtype)
        if self.attention_per_task and self.heads:
            pooling = self.pooling
            self.task_poolings.append(
                GatedAttentionPooling(
                    self.embed_dim, pooling.score.in_features, dropout=pooling.dropout.p
                ).to(device=reference.device, dtype=reference.dtype)
            )
        self.heads.append(head)
        self.n_classes_per_task.append(n_classes)
        return len(self.heads) - 1

    def task_modules(self, task: int) -> list[nn.Module]:
        """The modules that serve one task only: its head, and its pooling if per task.

        Args:
            task: Task index.

        Returns:
            The modules (a strategy trains them with the task and freezes them after).
        """
        if not self.attention_per_task:
            return [self.heads[task]]
        return [self.heads[task], self._pooling(task)]

    def _pooling(self, task: int) -> nn.Module:
        return self.pooling if task == 0 else self.task_poolings[task - 1]

    def _pool_per_task(
        self, tokens: torch.Tensor, mask: torch.Tensor, tasks: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool once per task with its own pooling and apply its head.

        Returns:
            Logits ``(B, C)`` of the tasks' heads, attention ``(B, N)`` for one task or
            ``(B, N, T)``, embedding ``(B, E)`` for one task or ``(B, T, E)``.
        """
        logits, attentions, embeddings = [], [], []
        for task in tasks:
            embedding, attention = self._pooling(task)(tokens, mask)
            logits.append(self.heads[task](embedding))
            attentions.append(attention)
            embeddings.append(embedding)
        if len(tasks) == 1:
            return logits[0], attentions[0], embeddings[0]
        return torch.cat(logits, dim=-1), torch.stack(attentions, -1), torch.stack(embeddings, 1)

    def assign_groups(self, coords: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """The group of every tile (module docstring, "Group formation").

        Args:
            coords: ``(B, N, 2)`` level-0 ``(x, y)`` tile corners, or None (order grouping).
            mask: ``(B, N)`` bool, True for real tiles.

        Returns:
            ``(B, N)`` int64 group index in ``[0, n_groups)``.

        Raises:
            BagBatchError: If ``coords`` is not ``(B, N, 2)``.
        """
        if coords is None or self.grouping == "order":
            return order_groups(mask, self.grid_side)
        if tuple(coords.shape) != (*mask.shape, 2):
            raise BagBatchError(
                f"coords must be (B, N, 2) level-0 (x, y) matching the mask {tuple(mask.shape)}, "
                f"got {tuple(coords.shape)}; pass the bag's coords or None for order grouping."
            )
        return spatial_groups(coords, mask, self.grid_side)

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        coords: torch.Tensor | None = None,
        task: int | None = None,
    ) -> MILOutput:
        """Classify each bag with one task's head, or with all heads.

        Args:
            features: ``(B, N, D)`` float tile features; padded rows may hold anything.
            mask: ``(B, N)`` bool, True for real tiles.
            coords: ``(B, N, 2)`` int64 level-0 ``(x, y)``; padded rows may hold anything.
                None falls back to order grouping.
            task: Index of the head to use; None concatenates all heads (class-incremental).

        Returns:
            MILOutput with ``logits (B, C)`` (C = that task's classes, or the sum over tasks),
            ``attention (B, N)`` of the pooling, ``tile_scores (B, N, C)`` (the head(s) applied
            to each tile's token, 0 on padding; the logits are their attention-weighted sum) and
            ``embedding (B, embed_dim)``; with ``attention_per_task`` and several tasks,
            ``attention (B, N, T)`` and ``embedding (B, T, embed_dim)``, task ``t``'s own.

        Raises:
            BagBatchError: If the batch is malformed or a bag is all padding.
            ConfigError: If ``task`` is not a head's index.
        """
        check_bags(features, mask)
        if task is not None and not 0 <= task < self.n_tasks:
            raise ConfigError(f"GDATMIL: task={task} but the model has {self.n_tasks} head(s).")
        groups = self.assign_groups(coords, mask)
        tokens = self.embed(features.masked_fill(~mask.unsqueeze(-1), 0.0))
        for block in self.blocks:
            tokens = block(tokens, mask, groups, self.n_groups)
        tokens = self.norm(tokens)
        tasks = list(range(self.n_tasks)) if task is None else [task]
        heads = [self.heads[t] for t in tasks]
        if self.attention_per_task:
            logits, attention, embedding = self._pool_per_task(tokens, mask, tasks)
        else:
            embedding, attention = self.pooling(tokens, mask)
            logits = torch.cat([head(embedding) for head in heads], dim=-1)
        tile_scores = torch.cat([head(tokens) for head in heads], dim=-1)
        return MILOutput(
            attention=attention,
            logits=logits,
            tile_scores=tile_scores.masked_fill(~mask.unsqueeze(-1), 0.0),
            embedding=embedding,
        )
