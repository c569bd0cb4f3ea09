"""Normalisation modes, colour bar scales, colour maps and blending."""

from __future__ import annotations

import numpy as np
import pytest

from milkit.errors import ConfigError
from milkit.heatmaps.colour import blend, colorize, colour_lut, normalize_values
from milkit.training.prediction_file import TileValues


def attention(values: list[float]) -> TileValues:
    return TileValues(np.array(values), "attention", "attention")


def probability(values: list[float]) -> TileValues:
    return TileValues(np.array(values), "score: tumour", "probability", "probability", (0.0, 1.0))


def test_rank_is_the_percentile_within_the_slide() -> None:
    out, scale = normalize_values(attention([0.3, 0.01, 0.05, np.nan, 0.05]), mode="rank")
    np.testing.assert_allclose(out[[0, 1, 2, 4]], [1.0, 0.0, 0.5, 0.5])  # ties share their rank
    assert np.isnan(out[3])
    assert (scale.mode, scale.vmin, scale.vmax) == ("rank", 0.0, 100.0)
    assert "percentile" in scale.label


def test_auto_uses_rank_for_attention_and_a_fixed_range_for_probabilities() -> None:
    # Attention of a large bag is tiny everywhere: raw colours would be "cold everywhere".
    _, scale = normalize_values(attention([1e-5, 2e-5, 5e-5]))
    assert scale.mode == "rank"
    out, scale = normalize_values(probability([0.2, 0.4, 0.6]))
    assert (scale.mode, scale.vmin, scale.vmax) == ("raw", 0.0, 1.0)
    np.testing.assert_allclose(out, [0.2, 0.4, 0.6])  # not stretched to the slide's range
    assert scale.label == "score: tumour (probability)"


def test_raw_clips_to_the_given_range_in_the_values_units() -> None:
    tils = TileValues(np.array([5.0, 20.0, 80.0]), "score", "regression", "% TILs", (0.0, 100.0))
    out, scale = normalize_values(tils, mode="raw", value_range=(10.0, 50.0))
    np.testing.assert_allclose(out, [0.0, 0.25, 1.0])
    assert (scale.vmin, scale.vmax, scale.label) == (10.0, 50.0, "score (% TILs)")


def test_minmax_spans_the_slide_and_keeps_units() -> None:
    out, scale = normalize_values(probability([0.2, 0.4, 0.6]), mode="minmax")
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])
    assert (scale.vmin, scale.vmax) == pytest.approx((0.2, 0.6))
    # A constant slide gets one colour (the bottom of the scale), not NaN.
    flat, _ = normalize_values(probability([0.4, 0.4]), mode="minmax")
    np.testing.assert_allclose(flat, [0.0, 0.0])


def test_bad_modes_and_ranges_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown normalisation"):
        normalize_values(attention([1.0]), mode="zscore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vmin < vmax"):
        normalize_values(probability([0.5]), mode="raw", value_range=(1.0, 0.0))
    with pytest.raises(ConfigError, match="colour map"):
        colour_lut("not-a-map")


def test_colorize_and_blend() -> None:
    lut = colour_lut("viridis")
    rgb = colorize(np.array([[0.0, 1.0, np.nan]]), "viridis")
    np.testing.assert_array_equal(rgb[0, 0], lut[0])
    np.testing.assert_array_equal(rgb[0, 1], lut[-1])
    image = np.full((1, 3, 3), 200, np.uint8)
    colours = np.zeros((1, 3, 3), np.uint8)
    out = blend(image, colours, np.array([[0.0, 0.5, 1.0]]))
    np.testing.assert_array_equal(out[0, :, 0], [200, 100, 0])
