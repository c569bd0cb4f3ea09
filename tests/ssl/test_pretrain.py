"""``milkit pretrain``: configs load, a 2-step run checkpoints, resumes, exports and loads."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from milkit import cli
from milkit.features.encoders import load_encoder
from milkit.features.tile_file import read_bag, read_coords
from milkit.pipeline.tile import TilingOptions, tile_slide
from milkit.ssl import pretrain
from milkit.ssl.augment import ViewAugmentation
from milkit.ssl.data import TileDataModule
from milkit.ssl.dino_module import DINOModule
from milkit.synth import SlideParams, write_slide

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ssl"
MEAN, STD = (0.7, 0.55, 0.7), (0.2, 0.25, 0.2)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic slide tiled at 1 µm/px, 64-px tiles: ``slides/`` and ``tiles/``."""
    root = tmp_path_factory.mktemp("pretrain")
    info = write_slide(
        root / "slides" / "slide_0.svs", SlideParams(seed=4, artefacts=False), size_px=(512, 512)
    )
    tile_slide(info.slide_path, root / "tiles", TilingOptions(target_mpp=0.5, tile_size_px=64))
    return root


def _tiny_args(root: Path, run: Path, max_steps: int, tiles: str = "tiles") -> list[str]:
    """The CPU recipe, shrunk further so a run takes seconds (tiles of ``root/slides`` in
    ``root/<tiles>/coords``)."""
    return [
        "--config", str(CONFIGS / "dino_tiny_cpu.yaml"),
        "--data.slides_dir", str(root / "slides"),
        "--data.coords_dir", str(root / tiles / "coords"),
        "--out", str(run),
        "--data.batch_size", "4", "--data.num_workers", "0", "--data.max_tiles_per_slide", "8",
        "--data.global_size_px", "32", "--data.local_size_px", "16", "--data.n_local_crops", "2",
        "--data.mean", json.dumps(MEAN), "--data.std", json.dumps(STD),
        "--model.backbone_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
        "--model.out_dim", "64", "--model.hidden_dim", "32", "--model.bottleneck_dim", "16",
        "--trainer.max_steps", str(max_steps), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dino_vits16.yaml", ["global_size_px: 224", "out_dim: 65536", "precision: bf16-mixed"]),
        ("dino_tiny_cpu.yaml", ["global_size_px: 64", "patch_size: 8", "local_size_px: 32"]),
    ],
)
def test_configs_load(name: str, expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert pretrain.main(["--config", str(CONFIGS / name), "--print_config"]) == 0
    printed = capsys.readouterr().out
    for line in expected:
        assert line in printed


@pytest.mark.parametrize("recipe", ["dino_tiny_cpu.yaml", "dino_vits16.yaml"])
def test_the_multi_site_overlay_changes_only_the_keys_it_sets(
    recipe: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_path, overlay_path = CONFIGS / recipe, CONFIGS / "multi_site.yaml"
    args = ["--config", str(recipe_path), "--config", str(overlay_path), "--print_config"]
    assert pretrain.main(args) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    original, overlay = (yaml.safe_load(p.read_text()) for p in (recipe_path, overlay_path))
    augmentation = merged["data"]["augmentation"]
    assert augmentation.items() >= overlay["data"]["augmentation"].items()
    assert merged["model"]["koleo_weight"] == overlay["model"]["koleo_weight"]
    # what the overlay leaves alone keeps the recipe's value, the recipe's blur included
    assert merged["model"]["lr"] == original["model"]["lr"]
    recipe_blur = original["data"].get("augmentation", {}).get("blur_sigma")
    assert augmentation["blur_sigma"] == (recipe_blur or list(ViewAugmentation().blur_sigma))


def test_a_misspelt_augmentation_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("data:\n  augmentation:\n    hed_scal: 0.5\n")
    args = ["--config", str(CONFIGS / "dino_tiny_cpu.yaml"), "--config", str(overlay)]
    assert pretrain.main([*args, "--print_config"]) == 2
    assert "does not accept option 'augmentation.hed_scal'" in capsys.readouterr().err


def test_full_scale_config_builds_with_linked_crop_settings(tmp_path: Path) -> None:
    args = [
        "--config", str(CONFIGS / "dino_vits16.yaml"),
        "--data.coords_dir", str(tmp_path / "coords"),
        "--out", str(tmp_path / "run"),
        "--trainer.accelerator", "cpu", "--trainer.logger", "false",
    ]  # fmt: skip
    cli = pretrain.PretrainCLI(
        DINOModule, TileDataModule, args=args, run=False, auto_configure_optimizers=False
    )
    hp = cli.model.hparams
    assert (hp.img_size, hp.patch_size, hp.n_local_crops, hp.out_dim) == (224, 16, 8, 65536)
    assert cli.model.teacher.backbone.num_features == 384  # ViT-S
    assert cli.datamodule.augmentation.n_crops == 2 + 8
    assert cli.trainer.default_root_dir == str(tmp_path / "run")


def test_pretrain_checkpoints_resumes_and_exports_a_loadable_encoder(
    tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(_tiny_args(tiles, run, max_steps=2)) == 0
    out = capsys.readouterr().out
    encoder_dir = run / "encoder"
    expected_next = (
        f"milkit preprocess {tiles / 'slides'} {tiles / 'tiles'} --encoder "
        f"local-dir:{encoder_dir} --mpp 0.5 --tile-size 64"
    )
    assert f"next: {expected_next}" in out
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in run.rglob("*.ckpt")) == ["last.ckpt"]  # no other checkpointing

    # the exported teacher loads as a pretrained feature extractor that preprocesses like training
    encoder = load_encoder(f"local-dir:{encoder_dir}")
    assert encoder.pretrained and encoder.weights_sha256
    assert encoder.input_size == (32, 32)
    assert encoder.mean == pytest.approx(MEAN) and encoder.std == pytest.approx(STD)
    teacher = DINOModule.load_from_checkpoint(last, weights_only=True).teacher.backbone.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), teacher(x), rtol=0, atol=0)

    # rerunning resumes from last.ckpt and continues to the new max_steps; this time the crops
    # are made after the batch transfer (the GPU path; the loader yields uint8 tiles)
    resume = [*_tiny_args(tiles, run, max_steps=3), "--data.augment_on", "device"]
    assert pretrain.main(resume) == 0
    captured = capsys.readouterr()
    assert f"resuming from {last}" in captured.err
    assert "this run 1 steps" in captured.out
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_the_printed_next_command_runs_as_printed_on_slides_without_mpp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write_blob: Callable[..., Any]
) -> None:
    # PNG scans record no resolution: tiled with --slide-mpp, one of them through --mpp-csv.
    slides = tmp_path / "slides"
    slides.mkdir()
    for index in range(3):
        write_blob(slides / f"scan{index}.png", size=(400, 300), seed=index)
    out = tmp_path / "out"
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\nscan2,0.4\n")
    tiling = ["--slide-mpp", "0.5", "--mpp", "0.5", "--tile-size", "64", "--min-tissue", "0.5"]
    assert (
        cli.main(["tile", str(slides), str(out), *tiling, "--mpp-csv", str(tmp_path / "mpp.csv")])
        == 0
    )
    run = tmp_path / "run"
    assert pretrain.main(_tiny_args(tmp_path, run, max_steps=1, tiles="out")) == 0
    (next_line,) = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("next: ")
    ]
    words = shlex.split(next_line.removeprefix("next: "))
    assert words[:2] == ["milkit", "preprocess"] and "--min-tissue" in words
    assert words[words.index("--mpp-csv") + 1] == str(run.resolve() / "slide_mpp.csv")

    assert cli.main(words[1:]) == 0  # as printed: the tiles are found done, features extracted
    printed = capsys.readouterr().out
    assert "already done 3" in printed
    for index in range(3):
        features = read_bag(out / "features" / f"scan{index}.h5")
        assert len(features.coords) == len(read_coords(out / "coords" / f"scan{index}.h5").coords)


def test_pretrain_errors_name_the_option(
    tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _tiny_args(tiles, tmp_path / "fresh", max_steps=1)
    assert pretrain.main([*args, "--ckpt_path", "last"]) == 2
    assert "--ckpt_path last" in capsys.readouterr().err
    no_out = [a for a in args if a not in ("--out", str(tmp_path / "fresh"))]
    assert pretrain.main(no_out) == 2
    assert "needs --out RUN_DIR" in capsys.readouterr().err


def test_bf16_falls_back_where_the_hardware_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pretrain, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert pretrain.resolve_precision("bf16-mixed", "auto") == "32-true"
    assert pretrain.resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(pretrain, "cpu_supports_bf16", lambda: True)
    assert pretrain.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no bf16"):
        assert pretrain.resolve_precision("bf16-mixed", "gpu") == "16-mixed"
