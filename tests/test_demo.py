"""``milkit demo``: every stage end to end on a tiny plan, the table and the paths it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from milkit import demo
from milkit.cli import main

pytestmark = pytest.mark.slow

TINY = demo.DemoPlan(
    n_slides=27,  # nine per organ task: train, val and test slides in each
    size_px=(1000, 1000),
    encoder="vit_tiny_patch16_224",
    folds=2,
    max_epochs=2,
    heatmaps=1,
    pretrain_steps=2,
)


@pytest.mark.parametrize("pretrain", [False, True])
def test_demo_runs_every_stage_and_reports(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pretrain: bool,
) -> None:
    monkeypatch.setattr(demo, "QUICK", TINY)
    argv = ["demo", str(tmp_path), "--quick"] + (["--pretrain"] if pretrain else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    stages = ["synth", "pretrain"] if pretrain else ["synth"]
    stages += ["preprocess", "ABMIL/DSMIL", "WeakSTIL", "continual", "heatmaps"]
    assert [line[3:-3] for line in out.splitlines() if line.startswith("== ")] == stages
    for row in ("ABMIL bag AUROC", "DSMIL tile AUROC", "WeakSTIL slide R²", "continual (OWLoRA)"):
        assert row in out, row
    assert ("DINO-pretrained here" in out) == pretrain
    runs = tmp_path / ("runs_dino" if pretrain else "runs")
    assert list((runs / "abmil_cv" / "repeat0" / "fold0" / "heatmaps").glob("*/attention.png"))
    if pretrain:
        assert (tmp_path / "dino" / "encoder" / "config.json").is_file()
    # Rerunning reuses every finished stage.
    assert main(argv) == 0
    assert "reusing the cohort" in capsys.readouterr().out
