"""DINO self-distillation (Caron et al. 2021) of a timm backbone on tile crops.

The student (backbone + `DINOHead`) sees all crops; the teacher, an exponential moving average
(EMA) of the student, sees only the 2 global crops. `DINOLoss` makes the student match the
centred, sharpened teacher distribution over the prototypes across different views.

Batches are ``list[Tensor]`` as made by `milkit.ssl.augment.MultiCropAugmentation` and
`milkit.ssl.augment.collate_crops`: 2 global crops ``(B, 3, G, G)`` then the local crops
``(B, 3, L, L)``. Defaults are DINO's ViT-S/16 recipe (papers.md, section B).
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any, NamedTuple, Protocol, cast

import lightning as L
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from milkit.errors import ConfigError, EncoderError

__all__ = ["DINOHead", "DINOLoss", "DINOModule", "DINONetwork", "DINOSchedule", "cosine_schedule"]

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


class DINOSchedule(NamedTuple):
    """Scheduled values for one optimiser step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


class _DINOHParams(Protocol):
    """:class:`DINOModule`'s ``hparams`` (its ``__init__`` arguments), typed.

    Lightning types ``hparams`` as a plain mapping; reading it through this gives each
    hyperparameter its type. ``mean`` and ``std`` may be lists (hyperparameters from YAML).
    """

    backbone: str
    img_size: int | None
    patch_size: int | None
    dynamic_img_size: bool | None
    drop_path_rate: float
    backbone_kwargs: dict[str, Any] | None
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    head_n_layers: int
    norm_last_layer: bool
    n_local_crops: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: float
    student_temp: float
    center_momentum: float
    freeze_last_layer_epochs: int
    clip_grad: float | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class DINOModule(L.LightningModule):
    """DINO pretraining of a timm backbone; the teacher backbone is the product.

    Schedules advance per optimiser step over ``trainer.estimated_stepping_batches``; an epoch is
    ``ceil(num_training_batches / accumulate_grad_batches)`` steps (or total / ``max_epochs``
    for datasets without a length). Weight decay skips biases and 1-D parameters (norms).

    Args:
        backbone: timm model name, built with ``pretrained=False`` and ``num_classes=0``.
        img_size: Global crop side in pixels (sets the ViT position grid); None for backbones
            without the option (CNNs).
        patch_size: ViT patch size; None keeps the model's own.
        dynamic_img_size: Let a ViT take any input size (needed for local crops); None for
            backbones without the option.
        drop_path_rate: Stochastic depth of the student (the teacher has none, as in DINO).
        backbone_kwargs: Further timm keyword arguments (e.g. ``depth`` for a tiny test ViT).
        out_dim: Number of prototypes K.
        hidden_dim: Head MLP width.
        bottleneck_dim: Head bottleneck size.
        head_n_layers: Head MLP depth.
        norm_last_layer: Unit-norm prototypes (see `DINOHead`).
        n_local_crops: Local crops per tile in each batch.
        lr: Peak learning rate for a global batch of 256; scaled by global batch / 256.
        min_lr: Final learning rate of the cosine decay.
        warmup_epochs: Epochs of linear learning-rate warm-up from 0.
        weight_decay: Weight decay at the start (cosine schedule).
        weight_decay_end: Weight decay at the end.
        momentum_teacher: Teacher EMA momentum at the start; cosine to 1 at the end.
        warmup_teacher_temp: Teacher temperature at epoch 0.
        teacher_temp: Teacher temperature after warm-up.
        warmup_teacher_temp_epochs: Epochs of teacher-temperature warm-up.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the loss centre.
        freeze_last_layer_epochs: Epochs during which the prototypes are not updated.
        clip_grad: Max gradient norm per parameter tensor (as in DINO); None disables.
        mean: Normalisation mean of the crops (recorded in the exported backbone).
        std: Normalisation std of the crops (recorded in the exported backbone).

    Raises:
        EncoderError: If timm cannot build ``backbone`` with these options.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int | None = 224,
        patch_size: int | None = None,
        dynamic_img_size: bool | None = True,
        drop_path_rate: float = 0.1,
        backbone_kwargs: dict[str, Any] | None = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_n_layers: int = 3,
        norm_last_layer: bool = True,
        n_local_crops: int = 8,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float | None = 3.0,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student = self._build_network(drop_path_rate)
        self.teacher = self._build_network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(
            out_dim,
            N_GLOBAL_CROPS + n_local_crops,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )
        self._total_steps = 0.0
        self._steps_per_epoch = 1.0
        self._ema_step = 0

    def _build_network(self, drop_path_rate: float) -> DINONetwork:
        hp = cast(_DINOHParams, self.hparams)
        try:
            backbone = timm.create_model(
                hp.backbone,
                pretrained=False,
                num_classes=0,
                img_size=hp.img_size,
                patch_size=hp.patch_size,
                dynamic_img_size=hp.dynamic_img_size,
                drop_path_rate=drop_path_rate,
                **(hp.backbone_kwargs or {}),
            )
        except (RuntimeError, TypeError) as err:
            raise EncoderError(
                f"DINOModule: timm cannot build backbone {hp.backbone!r} ({err}); check the name "
                "(timm.list_models) and set img_size/patch_size/dynamic_img_size to null for "
                "backbones that are not ViTs."
            ) from err
        head = DINOHead(
            cast(int, backbone.num_features),  # an int on every timm model (typed nn.Module)
            hp.out_dim,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
            n_layers=hp.head_n_layers,
            norm_last_layer=hp.norm_last_layer,
        )
        return DINONetwork(backbone, head)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the student; lr and weight decay are overwritten every step."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        groups = [
            {"params": decay, "milkit_decay": True},
            {"params": no_decay, "milkit_decay": False, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cast(_DINOHParams, self.hparams).lr)

    def on_train_start(self) -> None:
        """Fix the schedule geometry once the trainer knows the data."""
        trainer = self.trainer
        total = float(trainer.estimated_stepping_batches)
        if not math.isfinite(total) or total <= 0:
            raise ConfigError(
                f"DINOModule needs a finite number of optimiser steps (got {total}); "
                "set trainer.max_steps or max_epochs with a dataset that has a length."
            )
        n_batches = float(trainer.num_training_batches)
        per_epoch: float
        if math.isfinite(n_batches):
            per_epoch = math.ceil(n_batches / trainer.accumulate_grad_batches)
        elif trainer.max_epochs and trainer.max_epochs > 0:
            per_epoch = total / trainer.max_epochs
        else:
            raise ConfigError(
                "DINOModule cannot tell the epoch length of a dataset without a length; "
                "set trainer.max_epochs so epoch-based schedules can be placed."
            )
        self._total_steps = total
        self._steps_per_epoch = max(1.0, float(per_epoch))
        self._ema_step = self.global_step

    def schedule_at(self, step: int, batch_size: int) -> DINOSchedule:
        """Scheduled values for an optimiser step (valid once training has started).

        Args:
            step: Optimiser step, 0-based.
            batch_size: Tiles per batch on one device.

        Returns:
            The learning rate (scaled by the global batch / 256), weight decay, teacher
            momentum and teacher temperature for that step.
        """
        hp = cast(_DINOHParams, self.hparams)
        global_batch = batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        warmup_steps = hp.warmup_epochs * self._steps_per_epoch
        return DINOSchedule(
            lr=cosine_schedule(
                hp.lr * global_batch / 256, hp.min_lr, step, self._total_steps, warmup_steps
            ),
            weight_decay=cosine_schedule(
                hp.weight_decay, hp.weight_decay_end, step, self._total_steps
            ),
            momentum=cosine_schedule(hp.momentum_teacher, 1.0, step, self._total_steps),
            teacher_temp=self.dino_loss.teacher_temp_at(step / self._steps_per_epoch),
        )

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        """One DINO step on a multi-crop batch.

        Args:
            batch: ``n_crops`` tensors ``(B, 3, S_i, S_i)``, the 2 global crops first.
            batch_idx: Index of the batch in the epoch.

        Returns:
            Scalar loss.

        Raises:
            ConfigError: If the batch has another number of crops than the loss expects.
        """
        if len(batch) != self.dino_loss.n_crops:
            raise ConfigError(
                f"DINOModule got {len(batch)} crops per tile, expected {self.dino_loss.n_crops}; "
                "make n_local_crops equal in the model and in MultiCropAugmentation."
            )
        batch_size = batch[0].shape[0]
        sched = self.schedule_at(self.global_step, batch_size)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = sched.lr
            if group["milkit_decay"]:
                group["weight_decay"] = sched.weight_decay

        with torch.no_grad():
            teacher_embed, teacher_out = self.teacher(batch[:N_GLOBAL_CROPS])
        _, student_out = self.student(batch)
        loss = self.dino_loss(student_out, teacher_out, self.global_step / self._steps_per_epoch)

        # collapse monitor: mean per-dimension std of unit embeddings, ~1/sqrt(D) when healthy,
        # 0 when every tile maps to the same point
        embed_std = F.normalize(teacher_embed[:batch_size].float(), dim=-1).std(dim=0).mean()
        logged = {
            "train/loss": loss,
            "train/lr": sched.lr,
            "train/weight_decay": sched.weight_decay,
            "train/teacher_temp": sched.teacher_temp,
            "train/embed_std": embed_std,
        }
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip gradients per tensor and keep the prototypes fixed in the first epochs."""
        hp = cast(_DINOHParams, self.hparams)
        if hp.clip_grad is not None:
            for param in self.student.parameters():
                if param.grad is not None:
                    nn.utils.clip_grad_norm_(param, hp.clip_grad)
        if self.current_epoch < hp.freeze_last_layer_epochs:
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the teacher towards the student after each optimiser step (EMA)."""
        if self.global_step == self._ema_step:  # accumulating gradients: no step was taken
            return
        self._ema_step = self.global_step
        momentum = self.schedule_at(self.global_step - 1, batch[0].shape[0]).momentum
        # parametrised weights (the head's weight norm) are plain parameters here, g and v alike
        for t_param, s_param in zip(
            self.teacher.parameters(), self.student.parameters(), strict=True
        ):
            t_param.mul_(momentum).add_(s_param, alpha=1.0 - momentum)
        self.log("train/momentum", momentum, on_step=True, on_epoch=False, batch_size=1)
