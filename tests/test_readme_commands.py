"""The README's fit -> predict -> heatmap commands, verbatim, from a folder outside the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from milkit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(*names: str) -> list[list[str]]:
    """The ``milkit NAME ...`` lines of the README's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [
        shlex.split(line)
        for line in lines
        if line.startswith("milkit ") and line.split()[1] in names
    ]


def test_fit_predict_heatmap_run_as_the_readme_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository: the configs come from the package
    assert main(["synth", "cohort", "--n-slides", "8", "--size-px", "1600", "1600",
                 "--mpp", "1.0", "--no-artefacts"]) == 0  # fmt: skip
    Path("cohort/slides").rename("SLIDES")
    Path("cohort/labels.csv").rename("labels.csv")
    assert main(["preprocess", "SLIDES", "OUT", "--encoder", "test_vit", "--random-weights",
                 "--mpp", "2.0", "--tile-size", "64", "--num-workers", "0"]) == 0  # fmt: skip

    commands = {command[1]: command for command in readme_commands("fit", "predict", "heatmap")}
    assert set(commands) == {"fit", "predict", "heatmap"}
    for name in ("fit", "predict", "heatmap"):
        assert main(commands[name][1:]) == 0, shlex.join(commands[name])
    assert Path("runs/mil/checkpoints/last.ckpt").is_file()
    assert len(list(Path("runs/mil/predictions").glob("*.h5"))) == 8
    assert len(list(Path("runs/mil/heatmaps").glob("*/tiles.geojson"))) == 8
