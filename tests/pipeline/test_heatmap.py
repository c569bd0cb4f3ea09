"""`milkit heatmap RUN_DIR`: every prediction file rendered, failures recorded, the batch goes on."""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from milkit.errors import ConfigError
from milkit.heatmaps.geojson import read_geojson
from milkit.pipeline.heatmap import HeatmapOptions, render_run
from milkit.pipeline.heatmap_command import add_arguments, options_from_args, run


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_every_output_and_records_a_missing_slide(
    blob_run: dict[str, Any], write_predictions, capsys
) -> None:
    run_dir = blob_run["run"]
    # A second prediction file whose slide is gone.
    write_predictions(
        run_dir / "predictions" / "lost.h5", blob_run["coords"][:5], tile_size_level0=64, attention=np.ones(5),
        slide_path=str(run_dir / "nowhere.svs"),
    )  # fmt: skip
    args = parse(
        [str(run_dir), "--workers", "2", "--max-size", "300", "--top-k", "3", "--slide-mpp", "0.5"]
    )
    assert run(args) == 1
    out = run_dir / "heatmaps" / "blob"
    names = {path.name for path in out.iterdir()}
    assert names == {
        "attention.png", "attention_figure.png", "attention_tiles.png",
        "score-tumour.png", "score-tumour_figure.png", "score-tumour_tiles.png",
        "tiles.geojson", "tissue.geojson",
    }  # fmt: skip
    assert np.asarray(Image.open(out / "attention.png")).shape == (225, 300, 3)
    tiles = read_geojson(out / "tiles.geojson")["features"]
    assert len(tiles) == len(blob_run["coords"])
    assert set(tiles[0]["properties"]["measurements"]) == {
        "attention",
        "score: normal",
        "score: tumour",
    }
    assert len(read_geojson(out / "tissue.geojson")["features"]) == 1  # one ellipse of tissue
    (error,) = read_csv(run_dir / "heatmaps" / "errors.csv")
    assert error["slide"].endswith("lost.h5") and error["error"] == "SlideOpenError"
    assert "--slides-dir" in error["message"]
    log = {
        row["slide_id"]: row["outcome"]
        for row in read_csv(run_dir / "heatmaps" / "heatmap_log.csv")
    }
    assert log == {"blob": "done", "lost": "failed"}
    printed = capsys.readouterr().out
    assert (
        "done       1" in printed
        and "failed     1" in printed
        and str(run_dir / "heatmaps") in printed
    )


def test_slides_dir_finds_moved_slides_and_checks_they_match(
    blob_run: dict[str, Any], tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(blob_run["slide"], moved / "blob.png")
    options = HeatmapOptions(
        values=("score:tumour",), max_size_px=200, top_k=0, geojson=False, slide_mpp=0.5
    )
    summary, _ = render_run(blob_run["run"], options=options)
    assert summary.failed == 1  # slide_path no longer exists
    summary, errors = render_run(blob_run["run"], slides_dir=moved, options=options)
    assert summary.failed == 0 and read_csv(errors) == []
    assert {p.name for p in (blob_run["run"] / "heatmaps" / "blob").iterdir()} == {
        "score-tumour.png",
        "score-tumour_figure.png",
    }
    # A different slide under the same name is refused: coordinates would not match it.
    Image.new("RGB", (800, 600), "white").save(moved / "blob.png")
    summary, errors = render_run(blob_run["run"], slides_dir=moved, options=options)
    (error,) = read_csv(errors)
    assert (
        error["error"] == "ConfigError"
        and "1600 x 1200" in error["message"]
        and "800 x 600" in error["message"]
    )


def test_bad_requests_fail_before_work(blob_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no prediction files"):
        render_run(tmp_path / "empty-run")
    with pytest.raises(ConfigError, match=r"no prediction file for \['nope'\]"):
        render_run(blob_run["run"], slides=["nope"])
    # A value the file lacks fails that slide (recorded), naming what the file holds.
    summary, errors = render_run(
        blob_run["run"], options=HeatmapOptions(values=("tile_score",), slide_mpp=0.5)
    )
    (error,) = read_csv(errors)
    assert summary.failed == 1 and "has no `tile_scores`" in error["message"]


def test_cli_options_reach_the_renderer() -> None:
    args = parse(["run", "--value", "attention", "--value", "score:tumour", "--normalize", "raw", "--range", "0", "0.5",
                  "--no-tissue-mask", "--smooth", "0.5", "--object-type", "detection", "--no-geojson"])  # fmt: skip
    options = options_from_args(args)
    assert options.values == ("attention", "score:tumour") and options.value_range == (0.0, 0.5)
    assert (options.normalize, options.tissue_only, options.smooth_sigma_tiles) == (
        "raw",
        False,
        0.5,
    )
    assert (options.object_type, options.geojson) == ("detection", False)
