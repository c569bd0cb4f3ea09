"""DINOModule: teacher EMA, centre, schedules, a tiny fit that learns, and the timm export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from milkit.errors import ConfigError, EncoderError
from milkit.ssl import (
    AugmentingCollate,
    DINOModule,
    MultiCropAugmentation,
    collate_tiles,
    export_backbone,
)

GLOBAL_PX, LOCAL_PX, N_LOCAL = 32, 16, 2
TINY = dict(
    backbone="vit_tiny_patch16_224",
    img_size=GLOBAL_PX,
    patch_size=8,
    backbone_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
    out_dim=256,
    hidden_dim=128,
    bottleneck_dim=32,
    n_local_crops=N_LOCAL,
)


def _augmentation() -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_size_px=GLOBAL_PX, local_size_px=LOCAL_PX, n_local_crops=N_LOCAL
    )


def _toy_tiles(n: int, seed: int = 0) -> list[np.ndarray]:
    """Four classes: stripes of class-specific colour, orientation and period, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 80, 150], [120, 60, 180], [230, 200, 220], [90, 40, 90]])
    yy, xx = np.mgrid[0:64, 0:64]
    tiles = []
    for i in range(n):
        c = i % 4
        stripes = np.sin(2 * np.pi * (xx if c % 2 else yy) / (4 * 2**c)) > 0
        tile = np.where(stripes[..., None], colours[c], colours[c] // 2)
        tiles.append((tile + rng.integers(-10, 10, tile.shape)).clip(0, 255).astype(np.uint8))
    return tiles


class _FixedBatch(Dataset):
    """One batch of crops made once, so a test knows exactly what the training step saw."""

    def __init__(self, batch: list[torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.batch


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _fixed_batch(n: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return _augmentation()(collate_tiles(_toy_tiles(n, seed=seed)))


def _one_step(**overrides) -> tuple[DINOModule, DINOModule, list[torch.Tensor]]:
    """Fit one step on a fixed batch; return the module, a copy from before, and the batch."""
    torch.manual_seed(0)
    # no warm-up: the first step must move the student (lr 0 at step 0 otherwise)
    module = DINOModule(**{**TINY, "warmup_epochs": 0.0, **overrides})
    before = copy.deepcopy(module)
    batch = _fixed_batch(8, seed=0)
    loader = DataLoader(_FixedBatch(batch), batch_size=None)
    _trainer(max_steps=1).fit(module, loader)
    return module, before, batch


def test_teacher_gets_no_gradients_and_moves_only_by_ema() -> None:
    module, before, _ = _one_step()
    assert all(p.grad is None for p in module.teacher.parameters())
    momentum = module.schedule_at(0, batch_size=8).momentum
    assert momentum == pytest.approx(0.996)
    teacher_before = dict(before.teacher.named_parameters())
    student_after = dict(module.student.named_parameters())
    names = [
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.1.attn.qkv.weight",
        "head.mlp.0.bias",
        "head.last_layer.parametrizations.weight.original1",
    ]
    for name, teacher_param in module.teacher.named_parameters():
        expected = momentum * teacher_before[name] + (1 - momentum) * student_after[name]
        torch.testing.assert_close(teacher_param, expected, rtol=0, atol=1e-6)
        if name in names:
            assert not torch.equal(teacher_param, teacher_before[name])
    # the EMA of unit-norm prototypes with magnitude 1 keeps the magnitude at 1
    torch.testing.assert_close(
        module.teacher.head.last_layer.parametrizations.weight.original0, torch.ones(256, 1)
    )


def test_centre_is_ema_of_the_teacher_output_of_the_step() -> None:
    module, before, batch = _one_step()
    with torch.no_grad():
        _, teacher_out = before.teacher(batch[:2])
    expected = 0.1 * teacher_out.mean(dim=0, keepdim=True)
    assert module.dino_loss.center.abs().sum() > 0
    torch.testing.assert_close(module.dino_loss.center, expected, rtol=1e-4, atol=1e-6)


def test_prototypes_frozen_in_first_epoch_and_schedules_on_param_groups() -> None:
    module, before, _ = _one_step(freeze_last_layer_epochs=1)
    v_name = "head.last_layer.parametrizations.weight.original1"
    after, start = dict(module.student.named_parameters()), dict(before.student.named_parameters())
    assert torch.equal(after[v_name], start[v_name])
    assert not torch.equal(after["head.mlp.0.weight"], start["head.mlp.0.weight"])

    schedule = module.schedule_at(0, batch_size=8)
    decay, no_decay = module.trainer.optimizers[0].param_groups
    assert decay["lr"] == no_decay["lr"] == schedule.lr
    assert decay["weight_decay"] == pytest.approx(0.04) and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    bias_ids = {id(p) for n, p in module.student.named_parameters() if n.endswith(".bias")}
    assert bias_ids <= {id(p) for p in no_decay["params"]}


def test_lr_is_scaled_by_global_batch_and_warms_up() -> None:
    module, _, _ = _one_step(warmup_epochs=0.0, lr=1e-3)
    assert module.schedule_at(0, batch_size=64).lr == pytest.approx(1e-3 * 64 / 256)
    module.hparams.warmup_epochs = 1.0
    assert module.schedule_at(0, batch_size=64).lr == 0.0


def test_koleo_weight_adds_the_weighted_regulariser_to_the_step_loss() -> None:
    plain, _, _ = _one_step()
    spread, _, _ = _one_step(koleo_weight=0.5)
    metrics = [module.trainer.callback_metrics for module in (plain, spread)]
    assert "train/koleo" not in metrics[0]  # off: DINO's loss alone, nothing computed
    koleo = float(metrics[1]["train/koleo"])
    assert koleo > 0  # near-identical tiles at initialisation: neighbours are close
    # same weights and batch before the step: same DINO loss, plus the weighted term
    dino_only = float(metrics[0]["train/loss"])
    assert float(metrics[1]["train/loss"]) == pytest.approx(dino_only + 0.5 * koleo, rel=1e-5)
    # and the regulariser's gradient moves the student differently
    assert not torch.equal(
        plain.student.backbone.patch_embed.proj.weight,
        spread.student.backbone.patch_embed.proj.weight,
    )
    with pytest.raises(ConfigError, match="koleo_weight=-0.1 would pull tiles together"):
        DINOModule(**{**TINY, "koleo_weight": -0.1})


def test_wrong_number_of_crops_is_explained() -> None:
    module = DINOModule(**TINY)
    with pytest.raises(ConfigError, match="n_local_crops"):
        module.training_step([torch.zeros(2, 3, 32, 32)] * 3, 0)


def test_unknown_backbone_raises_encoder_error() -> None:
    with pytest.raises(EncoderError, match="not_a_timm_model"):
        DINOModule(backbone="not_a_timm_model")


@pytest.fixture(scope="module")
def trained() -> tuple[DINOModule, DINOModule]:
    """A tiny DINO fit: 64 toy tiles, batch 8, 2 epochs (16 steps)."""
    torch.manual_seed(0)
    module = DINOModule(
        **TINY,
        lr=0.1,
        warmup_epochs=0.5,
        teacher_temp=0.04,  # constant: a warming temperature flattens the targets mid-test
        freeze_last_layer_epochs=0,
    )
    initial = copy.deepcopy(module)
    loader = DataLoader(
        _toy_tiles(64),
        batch_size=8,
        shuffle=True,
        collate_fn=AugmentingCollate(_augmentation()),
        drop_last=True,
    )
    _trainer(max_epochs=2).fit(module, loader)
    return module, initial


def test_tiny_fit_lowers_the_loss_without_collapse(trained: tuple[DINOModule, DINOModule]) -> None:
    module, initial = trained
    assert module.global_step == 16
    assert all(p.grad is None for p in module.teacher.parameters())
    # The training loss itself first rises while the centre catches up with the teacher, so
    # compare the student before and after training against the same (final) teacher targets.
    batch = _fixed_batch(32, seed=5)
    with torch.no_grad():
        _, teacher_out = module.teacher(batch[:2])
        losses = [
            copy.deepcopy(module.dino_loss)(student(batch)[1], teacher_out, epoch=2.0)
            for student in (initial.student, module.student)
        ]
    assert losses[1] < 0.9 * losses[0]
    embed_std = float(module.trainer.callback_metrics["train/embed_std"])
    assert embed_std > 0.2 / np.sqrt(64)


def test_export_round_trip_through_timm_local_dir(
    trained: tuple[DINOModule, DINOModule], tmp_path: Path
) -> None:
    module, _ = trained
    out_dir = export_backbone(module, tmp_path / "dino_vit")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0
    args = config["model_args"]
    assert args["img_size"] == [32, 32] and args["patch_size"] == [8, 8]
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == (64, 2, 2)
    assert "drop_path_rate" not in args
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]
    assert cfg["mean"] == list(IMAGENET_DEFAULT_MEAN) and cfg["std"] == list(IMAGENET_DEFAULT_STD)

    rebuilt = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    teacher = module.teacher.backbone.eval()
    torch.manual_seed(3)
    for size in (GLOBAL_PX, LOCAL_PX):
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), teacher(x), rtol=0, atol=1e-6)
    # timm needs pretrained=True to load the weights of a local-dir model
    random_init = timm.create_model(f"local-dir:{out_dir}", pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(random_init(x), teacher(x))

    with pytest.raises(ConfigError, match="overwrite=True"):
        export_backbone(module, out_dir)
    export_backbone(module, out_dir, mean=(0.7, 0.6, 0.7), std=(0.2, 0.2, 0.2), overwrite=True)
    assert json.loads((out_dir / "config.json").read_text())["pretrained_cfg"]["mean"] == [
        0.7,
        0.6,
        0.7,
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_export_plain_timm_model_and_reject_others(tmp_path: Path) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8, depth=1
    ).eval()
    out_dir = export_backbone(model, tmp_path / "plain")
    rebuilt = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-6)
    cfg = json.loads((out_dir / "config.json").read_text())["pretrained_cfg"]
    assert cfg["mean"] == list(IMAGENET_DEFAULT_MEAN) and cfg["input_size"] == [3, 16, 16]
    with pytest.raises(EncoderError, match="timm model"):
        export_backbone(torch.nn.Linear(2, 2), tmp_path / "linear")
