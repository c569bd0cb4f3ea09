"""The configs ship inside the package and are found by name or path from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from milkit.cli import main
from milkit.configs import CONFIG_DIR, packaged_configs, resolve_config, resolve_config_args


def test_names_and_paths_inside_the_package_resolve_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    abmil = str(CONFIG_DIR / "experiments" / "abmil.yaml")
    assert resolve_config("abmil") == abmil
    assert resolve_config("experiments/abmil.yaml") == abmil
    assert resolve_config("configs/experiments/abmil.yaml") == abmil
    assert resolve_config("dino_tiny_cpu") == str(CONFIG_DIR / "ssl" / "dino_tiny_cpu.yaml")
    assert resolve_config("abmil", "--model") == str(CONFIG_DIR / "model" / "abmil.yaml")
    assert resolve_config("cpu", "--trainer") == str(CONFIG_DIR / "trainer" / "cpu.yaml")
    # A file where the command runs wins; unknown names and inline YAML pass through untouched.
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "abmil.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("experiments/abmil.yaml") == "experiments/abmil.yaml"
    assert resolve_config("no_such_config") == "no_such_config"
    assert resolve_config("{seed_everything: 3}") == "{seed_everything: 3}"
    assert resolve_config_args(
        ["fit", "--config", "abmil", "--model=abmil_gated", "--data.labels_csv", "abmil"]
    ) == [
        "fit", "--config", abmil, f"--model={CONFIG_DIR / 'model' / 'abmil_gated.yaml'}",
        "--data.labels_csv", "abmil",
    ]  # fmt: skip


def test_training_commands_take_packaged_configs_outside_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "abmil", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "class_path: milkit.models.ABMIL" in printed and "gated: false" in printed
    assert main(["pretrain", "--config", "dino_tiny_cpu", "--print_config"]) == 0
    assert "patch_size: 8" in capsys.readouterr().out


def test_milkit_configs_lists_every_packaged_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    configs = packaged_configs()
    assert len(configs) >= 10
    for path in configs:
        assert f"{path.parent.name}/{path.name}" in listed


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--config", "abmil"],
        ["cv", "--config", "dsmil"],
        ["continual", "--config", "gdat_small_cpu"],
        ["pretrain", "--config", "dino_tiny_cpu"],
    ],
)
def test_print_config_round_trips(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--print_config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main([command[0], "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
