"""notebooks/heatmaps.ipynb runs top to bottom on a run the test makes itself."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from milkit.heatmaps.geojson import read_geojson
from milkit.slides.reader import open_slide
from milkit.slides.tiling import plan_tile_spec
from milkit.slides.tissue import grid_coords
from milkit.synth import SlideParams, load_truth, tile_truth, write_slide

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "heatmaps.ipynb"


def make_run(root: Path, write_predictions) -> Path:
    """A synthetic slide and a classification run's prediction file for it."""
    info = write_slide(
        root / "slides" / "case-1.svs",
        SlideParams(seed=2, artefacts=False),
        mpp=0.5,
        size_px=(2400, 1800),
    )
    truth = load_truth(info.truth_path)
    with open_slide(info.slide_path) as reader:
        spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=96)
        dimensions = reader.dimensions
    coords = grid_coords(
        dimensions, tile_size_level0=spec.tile_size_level0, stride_level0=spec.stride_level0
    )
    labels = tile_truth(truth, coords, spec.tile_size_level0)
    keep = labels.tissue_fraction > 0.25
    tumour = labels.tumor_fraction[keep]
    attention = np.exp(3 * tumour) / np.exp(3 * tumour).sum()
    run_dir = root / "runs" / "abmil"
    write_predictions(
        run_dir / "predictions" / "case-1.h5", coords[keep], tile_spec=spec, slide_dimensions=dimensions,
        attention=attention, scores=np.stack([1 - tumour, tumour], axis=1), slide_id="case-1",
        slide_path=str(info.slide_path), label_names=["normal", "tumour"], prediction="tumour", target="tumour",
    )  # fmt: skip
    return run_dir


def test_notebook_runs_top_to_bottom(
    tmp_path: Path, write_predictions, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = make_run(tmp_path, write_predictions)
    monkeypatch.setenv("MILKIT_ROOT", str(tmp_path))  # the notebook finds the run itself
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()

    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert str(run_dir) in text and "case-1 | prediction: tumour | target: tumour" in text
    images = [
        Image.open(io.BytesIO(base64.b64decode(output.data["image/png"])))
        for output in outputs
        if "image/png" in output.get("data", {})
    ]
    # Thumbnail, attention heatmap, the score heatmap, the tile gallery and the zoomed region.
    assert len(images) == 5
    thumbnail = images[0]
    assert max(thumbnail.size) == 1024 and thumbnail.size[0] / thumbnail.size[1] == pytest.approx(
        2400 / 1800, rel=0.01
    )
    tiles = read_geojson(run_dir / "heatmaps" / "case-1" / "tiles.geojson")["features"]
    assert tiles and set(tiles[0]["properties"]["measurements"]) == {
        "attention",
        "score: normal",
        "score: tumour",
    }
