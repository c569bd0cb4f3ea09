"""Fixtures shared by the test packages: threads, pipeline scripts, and prediction files and small
slides written by the tests themselves (heatmaps, the prediction file, the heatmap stage)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from milkit.features.tile_file import write_coords_file
from milkit.slides.reader import open_slide
from milkit.slides.tiling import TileSpec, plan_tile_spec
from milkit.slides.tissue import grid_coords

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread and do not fight other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def load_pipeline() -> Callable[[str], ModuleType]:
    """Import a script of ``pipelines/`` (not a package) by its name."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"{name}_pipeline", PIPELINES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


PredictionWriter = Callable[..., Path]


def write_prediction_file(
    path: Path,
    coords: np.ndarray,
    *,
    tile_size_level0: int | None = None,
    tile_spec: TileSpec | None = None,
    slide_dimensions: tuple[int, int] | None = None,
    attention: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    tile_scores: np.ndarray | None = None,
    **attrs: Any,
) -> Path:
    """A prediction file as docs/design.md §4 describes it, with only what is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        dataset = file.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        if tile_spec is not None:
            file.attrs["tile_spec"] = tile_spec.to_json()
            if slide_dimensions is not None:
                dataset.attrs.update(tile_spec.coords_attrs(slide_dimensions))
        if tile_size_level0 is not None:
            dataset.attrs["patch_size_level0"] = tile_size_level0
        for name, array in (
            ("attention", attention),
            ("scores", scores),
            ("tile_scores", tile_scores),
        ):
            if array is not None:
                file.create_dataset(name, data=np.asarray(array, dtype=np.float32))
        for key, value in attrs.items():
            file.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return path


@pytest.fixture
def write_predictions() -> PredictionWriter:
    return write_prediction_file


def write_blob_slide(
    path: Path, *, size: tuple[int, int] = (1600, 1200), seed: int = 1
) -> dict[str, np.ndarray]:
    """A plain image: a pink ellipse (tissue) with a purple disc (tumour) on noisy glass.

    Returns:
        ``tissue`` and ``tumour`` ``(H, W)`` bool masks at level 0.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 238, np.uint8) + rng.integers(
        0, 8, (height, width, 3), dtype=np.uint8
    )
    yy, xx = np.mgrid[:height, :width]
    tissue = ((xx - width / 2) / (width / 2.6)) ** 2 + ((yy - height / 2) / (height / 2.6)) ** 2 < 1
    tumour = (xx - 0.4 * width) ** 2 + (yy - 0.45 * height) ** 2 < (0.15 * height) ** 2
    image[tissue] = (214, 140, 188)
    image[tumour & tissue] = (140, 80, 160)
    Image.fromarray(image).save(path)
    return {"tissue": tissue, "tumour": tumour & tissue}


def write_tileless_coords(coords_dir: Path, slide_id: str) -> Path:
    """The coordinate file ``milkit tile`` writes for a slide where it finds no tissue."""
    spec = TileSpec(
        target_mpp=0.5, tile_size_px=224, overlap_px=0, level=0, level_mpp=0.5, read_size_px=224,
        tile_size_level0=224, stride_level0=224, slide_mpp=0.5, effective_mpp=0.5,
    )  # fmt: skip
    return write_coords_file(
        coords_dir / f"{slide_id}.h5", np.zeros((0, 2), np.int64), tile_spec=spec,
        slide_dimensions=(1000, 1000), slide_id=slide_id, slide_path=f"/slides/{slide_id}.svs",
    )  # fmt: skip


@pytest.fixture
def write_tileless() -> Callable[[Path, str], Path]:
    """:func:`write_tileless_coords`, for test folders whose own conftest shadows this module."""
    return write_tileless_coords


@pytest.fixture
def write_blob() -> Callable[..., dict[str, np.ndarray]]:
    """:func:`write_blob_slide`, for test folders whose own conftest shadows this module."""
    return write_blob_slide


@pytest.fixture
def blob_run(tmp_path: Path) -> dict[str, Any]:
    """A run folder with one PNG slide (0.5 µm/px) and its prediction file: scores = tumour fraction."""
    slide = tmp_path / "slides" / "blob.png"
    slide.parent.mkdir()
    masks = write_blob_slide(slide)
    with open_slide(slide, mpp=0.5) as reader:
        spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=64)
        dimensions = reader.dimensions
    size = spec.tile_size_level0
    coords = grid_coords(dimensions, tile_size_level0=size, stride_level0=spec.stride_level0)
    tissue_fraction = np.array(
        [masks["tissue"][y : y + size, x : x + size].mean() for x, y in coords]
    )
    coords = coords[tissue_fraction > 0.25]
    tumour = np.array([masks["tumour"][y : y + size, x : x + size].mean() for x, y in coords])
    attention = np.exp(3 * tumour)
    path = write_prediction_file(
        tmp_path / "run" / "predictions" / "blob.h5",
        coords,
        tile_spec=spec,
        slide_dimensions=dimensions,
        attention=attention / attention.sum(),
        scores=np.stack([1 - tumour, tumour], axis=1),
        slide_id="blob",
        slide_path=str(slide),
        label_names=["normal", "tumour"],
        prediction="tumour",
        target="tumour",
    )
    return {
        "run": tmp_path / "run",
        "slide": slide,
        "predictions": path,
        "coords": coords,
        "tumour_fraction": tumour,
        "spec": spec,
        **masks,
    }
