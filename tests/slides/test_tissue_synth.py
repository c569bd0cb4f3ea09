"""Tissue masks of ``milkit tile`` against the ground truth of synthetic slides (issue #2).

The synthetic tissue is fragmented, with glass holes (lumens, fat) from 1,000 to 100,000 µm²,
small fragments, dense nuclei, pen and dust: the cases where filling large holes, dropping small
pieces, taking haematoxylin-dark tissue for pen or a fringe around the outline cost the most.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milkit.pipeline.tile import TilingOptions, tile_slide
from milkit.synth import load_truth, make_cohort, tissue_mask

#: 1600 µm square at 0.5 µm/px: the 4 µm/px thumbnail (400 px) is exactly twice the 8 µm/px
#: truth grid (200 px), so the box-resampled mask and the truth cover the same ground.
SIZE_PX = (3200, 3200)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_cohort(root, n_slides=4, seed=1, size_px=SIZE_PX)
    return root


def mask_at_truth_grid(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` bool: ``mask`` box-resampled to the truth grid, tissue where half covered."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize(shape[::-1], Image.Resampling.BOX)) >= 128


def test_tile_masks_agree_with_the_synthetic_truth(cohort: Path, tmp_path: Path) -> None:
    slides = sorted((cohort / "slides").iterdir())
    assert len(slides) == 4
    for slide in slides:
        result = tile_slide(slide, tmp_path, TilingOptions())
        assert result.outcome == "done"
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{slide.stem}.png")) >= 128
        truth = tissue_mask(load_truth(cohort / "truth" / f"{slide.stem}.h5"))

        found = mask_at_truth_grid(mask, truth.shape)
        iou = (found & truth).sum() / (found | truth).sum()
        assert iou >= 0.9, f"{slide.name}: tissue IoU {iou:.3f} with the ground truth"
