"""DINO self-distillation of a timm backbone on tile crops, as a LightningModule.

Student and teacher are :class:`milkit.ssl.dino.DINONetwork`; the teacher is an EMA of the
student with a cosine momentum schedule; learning rate, weight decay and teacher temperature
follow DINO's schedules (docs/papers.md, section B). Batches are ``list[Tensor]`` from
`milkit.ssl.augment.MultiCropAugmentation`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, cast

import lightning as L
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from milkit.errors import ConfigError, EncoderError
from milkit.ssl.dino import (
    N_GLOBAL_CROPS,
    DINOHead,
    DINOLoss,
    DINONetwork,
    cosine_schedule,
    koleo_loss,
)

__all__ = ["DINOModule", "DINOSchedule"]


class DINOSchedule(NamedTuple):
    """Scheduled values for one optimiser step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


class DINOHParams(Protocol):
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
    koleo_weight: float
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
        koleo_weight: Weight of the KoLeo regulariser (`milkit.ssl.dino.koleo_loss`) on the
            student's backbone embeddings of each global view, as in DINOv2 (0.1 there);
            0 keeps DINO's loss alone. It keeps strong stain augmentation from stalling the
            loss near ln(out_dim) (see ``configs/ssl/dino_tiny_cpu.yaml``).
        mean: Normalisation mean of the crops (recorded in the exported backbone).
        std: Normalisation std of the crops (recorded in the exported backbone).

    Raises:
        ConfigError: If ``koleo_weight`` is negative.
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
        koleo_weight: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        if koleo_weight < 0:
            raise ConfigError(
                f"DINOModule: koleo_weight={koleo_weight} would pull tiles together; use 0 "
                "(off) or a positive weight such as 0.1."
            )
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
        hp = cast(DINOHParams, self.hparams)
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
        return torch.optim.AdamW(groups, lr=cast(DINOHParams, self.hparams).lr)

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
        hp = cast(DINOHParams, self.hparams)
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
        student_embed, student_out = self.student(batch)
        loss = self.dino_loss(student_out, teacher_out, self.global_step / self._steps_per_epoch)
        logged: dict[str, Tensor | float] = {}
        koleo_weight = cast(DINOHParams, self.hparams).koleo_weight
        if koleo_weight:
            # KoLeo (DINOv2) per global view: spreads the tiles of a batch over the sphere
            global_views = student_embed[: N_GLOBAL_CROPS * batch_size].chunk(N_GLOBAL_CROPS)
            koleo = torch.stack([koleo_loss(view) for view in global_views]).sum()
            loss = loss + koleo_weight * koleo
            logged["train/koleo"] = koleo

        # collapse monitor: mean per-dimension std of unit embeddings, ~1/sqrt(D) when healthy,
        # 0 when every tile maps to the same point
        embed_std = F.normalize(teacher_embed[:batch_size].float(), dim=-1).std(dim=0).mean()
        logged |= {
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
        hp = cast(DINOHParams, self.hparams)
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
