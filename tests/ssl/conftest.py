"""Shared fixtures of the SSL tests: one thread per test, and a small tiled synthetic cohort."""

from pathlib import Path

import pytest

from milkit.pipeline.tile import TilingOptions, tile_slide
from milkit.synth import SlideParams, write_slide

#: Tile side of the ``cohort`` fixture, in pixels at 1 µm/px.
COHORT_TILE_PX = 64


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread: None) -> None:
    """Applies the shared ``one_thread`` fixture to every test of this package."""


@pytest.fixture
def cohort_tile_px() -> int:
    """Tile side of the ``cohort`` fixture's coordinate files."""
    return COHORT_TILE_PX


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic slides tiled at 1 µm/px: ``slides/``, ``truth/``, ``tiles/coords/``."""
    root = tmp_path_factory.mktemp("ssl_cohort")
    for i, size in enumerate((448, 384)):
        info = write_slide(
            root / "slides" / f"slide_{i}.svs",
            SlideParams(seed=10 + i, tumor=True, artefacts=False),
            mpp=1.0,
            size_px=(size, size),
            truth_path=root / "truth" / f"slide_{i}.h5",
        )
        tile_slide(
            info.slide_path,
            root / "tiles",
            TilingOptions(target_mpp=1.0, tile_size_px=COHORT_TILE_PX, min_tissue=0.25),
        )
    return root
