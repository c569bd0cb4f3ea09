"""Ground truth of synthetic slides: tile labels, truth files, slide scores."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.errors import TruthFileError
from milkit.synth import (
    CLASS_NAMES,
    SlideTruth,
    load_truth,
    tile_truth,
    tissue_mask,
)
from milkit.synth.truth import save_truth


def hand_made_truth() -> SlideTruth:
    """10 x 10 map, 16 level-0 px per map px: glass left, stroma, tumour block, an aggregate."""
    classes = np.zeros((10, 10), dtype=np.uint8)
    classes[:, 4:] = 1  # stroma on the right half and more
    classes[2:6, 6:10] = 2  # tumour block
    classes[7:9, 7:9] = 3  # aggregate
    classes[0, 0] = 4  # dust on glass
    til = np.full((10, 10), 0.25, dtype=np.float32)
    til[7:9, 7:9] = 1.0
    return SlideTruth(class_map=classes, til_density=til, downsample=16.0, mpp=8.0)


def test_tile_inside_a_region_and_on_glass() -> None:
    truth = hand_made_truth()
    coords = np.array([[6 * 16, 2 * 16], [0, 3 * 16], [4 * 16, 6 * 16]], dtype=np.int64)
    labels = tile_truth(truth, coords, 64)  # 4 x 4 map pixels
    # fully inside the tumour block
    np.testing.assert_allclose(labels.class_fractions[0], [0, 0, 1, 0, 0], atol=1e-6)
    assert labels.majority_class[0] == 2 and labels.tumor_fraction[0] == pytest.approx(1)
    assert np.isnan(labels.til_density[0])  # no stroma in the tile
    # on glass: no tissue at all
    assert labels.tissue_fraction[1] == pytest.approx(0) and labels.class_fractions[
        1, 0
    ] == pytest.approx(1)
    assert labels.majority_class[1] == 0 and np.isnan(labels.til_density[1])
    # map rows 6..9 x cols 4..7: stroma, except the aggregate's column 7 in rows 7 and 8
    expected_aggregate = 2 / 16
    assert labels.class_fractions[2, 3] == pytest.approx(expected_aggregate)
    assert labels.til_density[2] == pytest.approx(
        0.25 * (1 - expected_aggregate) + 1.0 * expected_aggregate
    )


def test_partial_overlap_is_area_weighted() -> None:
    truth = hand_made_truth()
    # a 32-px tile straddling glass (col 3) and stroma (col 4), shifted by half a map pixel
    labels = tile_truth(truth, np.array([[3 * 16 + 8, 6 * 16]]), 32)
    np.testing.assert_allclose(labels.class_fractions[0], [0.25, 0.75, 0, 0, 0], atol=1e-6)
    # a tile hanging over the slide's right edge: the outside counts as background
    labels = tile_truth(truth, np.array([[9 * 16, 0]]), 32)
    np.testing.assert_allclose(labels.class_fractions[0], [0.5, 0.5, 0, 0, 0], atol=1e-6)


def test_tiles_covering_the_map_add_up_to_its_class_areas() -> None:
    truth = hand_made_truth()
    ys, xs = np.mgrid[0:160:40, 0:160:40]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    labels = tile_truth(truth, coords, 40)
    area_px = labels.class_fractions.sum(axis=0) * 40 * 40 / (16 * 16)
    np.testing.assert_allclose(
        area_px, np.bincount(truth.class_map.ravel(), minlength=5), atol=1e-6
    )


def test_tile_truth_rejects_bad_coordinates() -> None:
    with pytest.raises(TruthFileError, match=r"\(N, 2\)"):
        tile_truth(hand_made_truth(), np.zeros((3, 3), dtype=np.int64), 64)
    with pytest.raises(TruthFileError, match="positive"):
        tile_truth(hand_made_truth(), np.zeros((3, 2), dtype=np.int64), 0)


def test_slide_scores_and_tissue_mask() -> None:
    truth = hand_made_truth()
    mask = tissue_mask(truth)
    assert mask.sum() == np.isin(truth.class_map, (1, 2, 3)).sum() and not mask[0, 0]
    assert truth.tumor_fraction == pytest.approx(16 / mask.sum())
    stroma = np.isin(truth.class_map, (1, 3))
    assert truth.stil_score == pytest.approx(100 * truth.til_density[stroma].mean())


def test_truth_file_round_trip(tmp_path: Path) -> None:
    truth = SlideTruth(**{**hand_made_truth().__dict__, "attrs": {"slide_id": "s1", "seed": 4}})
    path = save_truth(truth, tmp_path / "truth" / "s1.h5")
    loaded = load_truth(path)
    np.testing.assert_array_equal(loaded.class_map, truth.class_map)
    np.testing.assert_array_equal(loaded.til_density, truth.til_density)
    assert (loaded.downsample, loaded.mpp, loaded.classes) == (16.0, 8.0, CLASS_NAMES)
    assert loaded.attrs == {"slide_id": "s1", "seed": 4}
    with h5py.File(path) as h5:
        assert json.loads(h5["class_map"].attrs["classes"])[2] == "tumor"
        assert h5["til_density"].dtype == np.float32 and h5["class_map"].dtype == np.uint8
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_truth_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TruthFileError, match=r"missing\.h5: no such"):
        load_truth(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h5:
        h5["class_map"] = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(TruthFileError, match=r"bad\.h5: not a milkit ground-truth file"):
        load_truth(bad)
