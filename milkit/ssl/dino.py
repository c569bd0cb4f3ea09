"""DINO's parts (Caron et al. 2021): projection head, loss, backbone + head, schedules.

The student (backbone + `DINOHead`) sees all crops; the teacher, an exponential moving average
(EMA) of the student, sees only the 2 global crops. `DINOLoss` makes the student match the
centred, sharpened teacher distribution over the prototypes across different views. The
training itself (EMA, schedules, optimiser) is :class:`milkit.ssl.dino_module.DINOModule`.

Batches are ``list[Tensor]`` as made by `milkit.ssl.augment.MultiCropAugmentation`: 2 global
crops ``(B, 3, G, G)`` then the local crops ``(B, 3, L, L)``. Defaults are DINO's ViT-S/16
recipe (docs/papers.md, section B).
"""

from __future__ import annotations

import math
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from milkit.errors import ConfigError

__all__ = [
    "N_GLOBAL_CROPS",
    "DINOHead",
    "DINOLoss",
    "DINONetwork",
    "cosine_schedule",
    "koleo_loss",
]

N_GLOBAL_CROPS = 2


def cosine_schedule(
    start: float,
    end: float,
    step: float,
    total_steps: float,
    warmup_steps: float = 0.0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start``, then cosine decay to ``end``.

    Args:
        start: Value at the end of warm-up.
        end: Value at ``total_steps`` (held after it).
        step: Current step (0-based).
        total_steps: Length of the whole schedule in steps.
        warmup_steps: Length of the linear warm-up in steps.
        warmup_start: Value at step 0 when there is a warm-up.

    Returns:
        The scheduled value at ``step``.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2): spreads a batch over the sphere.

    Minus the mean log distance of each unit embedding to its nearest neighbour in the batch;
    it rises towards ``-log(eps)`` as tiles map to the same point, so its gradient pushes
    nearest neighbours apart.

    Args:
        embeddings: ``(B, D)`` embeddings (normalised here).
        eps: Added to each distance before the log.

    Returns:
        Scalar loss.

    Raises:
        ConfigError: If the batch has fewer than 2 embeddings (no neighbours).
    """
    if embeddings.shape[0] < 2:
        raise ConfigError(
            f"koleo_loss needs at least 2 embeddings per view, got {embeddings.shape[0]}; "
            "use a batch size of 2 or more."
        )
    unit = F.normalize(embeddings.float(), dim=-1)
    with torch.no_grad():
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a tile is not its own neighbour
        nearest = similarity.argmax(dim=1)
    distance = (unit - unit[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()


class DINOHead(nn.Module):
    """Projection head: MLP -> L2 normalisation -> weight-normalised linear to K prototypes.

    Args:
        in_dim: Backbone embedding size D.
        out_dim: Number of prototypes K.
        hidden_dim: Width of the hidden MLP layers.
        bottleneck_dim: Size of the normalised bottleneck.
        n_layers: Number of MLP layers (>= 1).
        norm_last_layer: Fix the weight-norm magnitude to 1, so every prototype has unit norm
            (DINO's stabiliser for ViTs).

    Raises:
        ConfigError: If ``n_layers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"DINOHead: n_layers={n_layers} must be >= 1.")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # weight = g * v / ||v|| per prototype (dim 0 = output row); original0 is g, original1 is v
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Project embeddings onto the prototypes.

        Args:
            x: ``(N, in_dim)`` embeddings.

        Returns:
            ``(N, out_dim)`` prototype logits.
        """
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions.

    Sums over all (teacher global crop, student crop) pairs of different views, averaged over
    pairs and batch. The centre is an EMA of the teacher's mean output, averaged over all
    ranks when torch.distributed is initialised.

    Args:
        out_dim: Number of prototypes K.
        n_crops: Crops per tile the student sees (2 global + local).
        warmup_teacher_temp: Teacher temperature at epoch 0.
        teacher_temp: Teacher temperature after warm-up.
        warmup_teacher_temp_epochs: Epochs of linear teacher-temperature warm-up.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the centre.

    Raises:
        ConfigError: If ``n_crops < 2``.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if n_crops < N_GLOBAL_CROPS:
            raise ConfigError(f"DINOLoss: n_crops={n_crops} must be >= {N_GLOBAL_CROPS}.")
        self.n_crops = n_crops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp_at(self, epoch: float) -> float:
        """Teacher temperature at a (fractional) epoch: linear warm-up, then constant."""
        if epoch >= self.warmup_teacher_temp_epochs:
            return self.teacher_temp
        fraction = epoch / self.warmup_teacher_temp_epochs
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * fraction

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: float) -> Tensor:
        """Compute the loss with the current centre, then update the centre.

        Args:
            student_output: ``(n_crops * B, K)`` logits, crop-major (crop 0 of all tiles first).
            teacher_output: ``(2 * B, K)`` logits of the global crops, crop-major.
            epoch: Current (fractional) epoch, for the teacher temperature.

        Returns:
            Scalar loss.
        """
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        temp = self.teacher_temp_at(epoch)
        teacher_p = F.softmax((teacher_output.float().detach() - self.center) / temp, dim=-1)
        total = student_output.new_zeros((), dtype=torch.float32)
        n_pairs = 0
        for t_view, q in enumerate(teacher_p.chunk(N_GLOBAL_CROPS)):
            for s_view, log_p in enumerate(student_logp.chunk(self.n_crops)):
                if s_view != t_view:
                    total = total + (-q * log_p).sum(dim=-1).mean()
                    n_pairs += 1
        self.update_center(teacher_output)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the teacher's batch mean (over all ranks when distributed).

        Args:
            teacher_output: ``(2 * B, K)`` teacher logits.
        """
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(
            batch_sum / count, alpha=1 - self.center_momentum
        )


class DINONetwork(nn.Module):
    """A backbone with a DINO head, run over multi-crop lists.

    Args:
        backbone: Module mapping ``(B, 3, H, W)`` to ``(B, D)`` embeddings.
        head: The projection head.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Embed and project a list of crop batches.

        Args:
            crops: Tensors ``(B, 3, S_i, S_i)``; consecutive crops of one size run as one batch.

        Returns:
            ``(len(crops) * B, D)`` embeddings and ``(len(crops) * B, K)`` logits, crop-major.
        """
        groups = groupby(crops, key=lambda crop: crop.shape[-2:])
        embeddings = torch.cat([self.backbone(torch.cat(list(group))) for _, group in groups])
        return embeddings, self.head(embeddings)
