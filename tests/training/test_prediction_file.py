"""Reading prediction files tolerantly, and choosing the value to draw."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.errors import ConfigError, FeatureFileError
from milkit.slides.tiling import TileSpec
from milkit.training.prediction_file import read_predictions

COORDS = np.array([[0, 0], [256, 0], [0, 256]])
SPEC = TileSpec(
    target_mpp=0.5, tile_size_px=128, overlap_px=0, level=1, level_mpp=1.0, read_size_px=64,
    tile_size_level0=256, stride_level0=256, slide_mpp=0.25, effective_mpp=0.5,
)  # fmt: skip


def test_minimal_file_takes_the_tile_size_from_the_tile_spec(
    tmp_path: Path, write_predictions
) -> None:
    path = write_predictions(tmp_path / "s1.h5", COORDS, tile_spec=SPEC, attention=[0.2, 0.3, 0.5])
    predictions = read_predictions(path)
    assert predictions.slide_id == "s1"  # from the file name
    assert predictions.tile_size_level0 == 256 and predictions.tile_spec == SPEC
    assert predictions.slide_path is None and predictions.slide_dimensions is None
    np.testing.assert_array_equal(predictions.coords, COORDS)
    assert predictions.default_value_specs() == ["attention"]
    np.testing.assert_allclose(predictions.values("attention").values, [0.2, 0.3, 0.5])


def test_coords_attrs_give_tile_size_and_slide_dimensions(
    tmp_path: Path, write_predictions
) -> None:
    path = write_predictions(
        tmp_path / "s.h5", COORDS, tile_spec=SPEC, slide_dimensions=(1000, 800), attention=[1, 1, 1]
    )
    predictions = read_predictions(path)
    assert predictions.slide_dimensions == (1000, 800)
    with h5py.File(path, "r") as file:
        assert file["coords"].attrs["patch_size_level0"] == 256


def test_unusable_files_are_explained(tmp_path: Path, write_predictions) -> None:
    no_size = write_predictions(tmp_path / "a.h5", COORDS, attention=[1, 1, 1])
    with pytest.raises(FeatureFileError, match="patch_size_level0"):
        read_predictions(no_size)
    short = write_predictions(tmp_path / "b.h5", COORDS, tile_size_level0=256, attention=[1, 1])
    with pytest.raises(FeatureFileError, match=r"`attention` has shape \(2,\) for 3 coords"):
        read_predictions(short)
    unfinished = write_predictions(
        tmp_path / "c.h5", COORDS, tile_size_level0=256, attention=[1, 1, 1], complete=False
    )
    with pytest.raises(FeatureFileError, match="unfinished"):
        read_predictions(unfinished)
    nothing = write_predictions(tmp_path / "d.h5", COORDS, tile_size_level0=256)
    with pytest.raises(FeatureFileError, match="no per-tile values"):
        read_predictions(nothing)
    (tmp_path / "e.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureFileError, match="not a readable HDF5"):
        read_predictions(tmp_path / "e.h5")


def test_binary_scores_default_to_the_positive_class(tmp_path: Path, write_predictions) -> None:
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    path = write_predictions(
        tmp_path / "s.h5", COORDS, tile_size_level0=256, attention=[0.2, 0.3, 0.5], scores=scores,
        label_names=["normal", "tumour"], prediction=1, target="tumour",
    )  # fmt: skip
    predictions = read_predictions(path)
    assert predictions.default_value_specs() == ["attention", "score"]
    value = predictions.values("score")
    assert (value.name, value.kind, value.natural_range) == (
        "score: tumour",
        "probability",
        (0.0, 1.0),
    )
    np.testing.assert_allclose(value.values, scores[:, 1])
    np.testing.assert_allclose(predictions.values("score:normal").values, scores[:, 0])
    np.testing.assert_allclose(predictions.values("score:0").values, scores[:, 0])
    assert predictions.values("score: tumour").slug == "score-tumour"
    assert predictions.describe() == "s | prediction: tumour | target: tumour"
    with pytest.raises(ConfigError, match=r"unknown class; known: \['normal', 'tumour'\]"):
        predictions.values("score:stroma")
    with pytest.raises(ConfigError, match="has no `tile_scores`"):
        predictions.values("tile_score")
    with pytest.raises(ConfigError, match="unknown heatmap value"):
        predictions.values("gradcam")


def test_multiclass_without_prediction_needs_a_class(tmp_path: Path, write_predictions) -> None:
    scores = np.full((3, 3), 1 / 3)
    path = write_predictions(
        tmp_path / "s.h5", COORDS, tile_size_level0=256, scores=scores, label_names=["a", "b", "c"]
    )
    predictions = read_predictions(path)
    assert predictions.default_value_specs() == ["score:a", "score:b", "score:c"]
    with pytest.raises(ConfigError, match="ambiguous for 3 classes"):
        predictions.values("score")
    assert set(predictions.measurements()) == {"score: a", "score: b", "score: c"}


def test_regression_scores_are_shown_in_the_targets_units(
    tmp_path: Path, write_predictions
) -> None:
    path = write_predictions(
        tmp_path / "s.h5", COORDS, tile_size_level0=256, attention=np.ones(3) / 3, tile_scores=[0.1, 0.5, 0.3],
        task="regression", target_scale=100.0, target_units="% TILs", prediction=0.3, target=0.35,
    )  # fmt: skip
    predictions = read_predictions(path)
    value = predictions.values("tile_score")
    assert (value.kind, value.units, value.natural_range) == ("regression", "% TILs", (0.0, 100.0))
    np.testing.assert_allclose(value.values, [10.0, 50.0, 30.0])
    assert value.format(42.5) == "42.5 % TILs"
    assert predictions.describe() == "s | prediction: 30 % TILs | target: 35 % TILs"


def test_attention_heads(tmp_path: Path, write_predictions) -> None:
    heads = np.array([[0.1, 0.5], [0.3, 0.2], [0.6, 0.3]])
    path = write_predictions(
        tmp_path / "s.h5", COORDS, tile_size_level0=256, attention=heads, label_names=["neg", "pos"]
    )
    predictions = read_predictions(path)
    np.testing.assert_allclose(predictions.values("attention").values, heads.mean(axis=1))
    np.testing.assert_allclose(predictions.values("attention:1").values, heads[:, 1])
    np.testing.assert_allclose(
        predictions.values("attention:pos").values, heads[:, 1]
    )  # one branch per class
    assert set(predictions.measurements()) == {"attention", "attention: neg", "attention: pos"}
    with pytest.raises(ConfigError, match="attention has 2 head"):
        predictions.values("attention:7")
