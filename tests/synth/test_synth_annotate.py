"""Tile truth attached to feature files of synthetic slides, and the AUROC used to score it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milkit.features.h5 import file_status
from milkit.features.tile_file import TileFileWriter, read_bag
from milkit.slides.tiling import TileSpec
from milkit.synth import SlideParams, load_truth, tile_truth, write_slide
from milkit.synth.annotate import annotate_feature_files, auroc, read_tile_truth


def test_annotated_files_carry_tile_truth_and_stay_complete(tmp_path: Path) -> None:
    info = write_slide(
        tmp_path / "slides" / "s.svs", SlideParams(seed=4, tumor_fraction=0.3), size_px=(1600, 1600)
    )
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    info.truth_path.rename(truth_dir / "s.h5")
    spec = TileSpec(0.5, 128, 0, 0, 0.5, 128, 128, 128, 0.5, 0.5)
    xs, ys = np.meshgrid(np.arange(0, 1600 - 128, 128), np.arange(0, 1600 - 128, 128))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    features = np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32)
    path = tmp_path / "features" / "s.h5"
    with TileFileWriter(path, tile_spec=spec, slide_dimensions=(1600, 1600), slide_id="s", slide_path="s.svs",
                        feature_dim=8, config_hash="abc") as writer:  # fmt: skip
        writer.append(features, coords)
        writer.finish()

    assert annotate_feature_files(tmp_path / "features", truth_dir) == [path]
    expected = tile_truth(load_truth(truth_dir / "s.h5"), coords, 128)
    values = read_tile_truth(path)
    np.testing.assert_array_equal(values["tile_labels"], expected.tumor_fraction >= 0.5)
    np.testing.assert_allclose(values["tile_til_density"], expected.til_density, equal_nan=True)
    assert 0 < values["tile_labels"].sum() < len(coords)
    assert file_status(path, config_hash="abc") == "complete"
    np.testing.assert_allclose(read_bag(path).features, features, atol=1e-2)
    assert not list((tmp_path / "features").glob("*.tmp"))


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: ties on purpose
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, labels) == pytest.approx(pairwise)
    assert auroc(labels, labels) == 1.0 and auroc(-labels, labels) == 0.0
    assert np.isnan(auroc(scores, np.ones(200)))
