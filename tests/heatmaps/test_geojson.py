"""QuPath GeoJSON: tile polygons in level-0 pixels with measurements; tissue annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milkit.errors import ConfigError, MilkitError
from milkit.heatmaps.geojson import read_geojson, tile_features, tissue_features, write_geojson


def signed_area(ring: list[list[float]]) -> float:
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def test_tiles_round_trip_as_qupath_polygons(tmp_path: Path) -> None:
    coords = np.array([[1024, 2048], [1536, 2048], [7, 3]], dtype=np.int64)
    measurements = {
        "attention": np.array([0.5, 0.25, 0.25]),
        "score: tumour": np.array([0.9, np.nan, 0.1]),
    }
    path = write_geojson(
        tmp_path / "tiles.geojson", tile_features(coords, 512, measurements, classification="Tile")
    )
    data = read_geojson(path)
    raw = json.loads(path.read_text())  # strict JSON: no NaN tokens
    assert raw["type"] == "FeatureCollection" and len(raw["features"]) == 3
    for feature, (x, y) in zip(data["features"], coords.tolist(), strict=True):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == 5  # closed
        assert ring[:4] == [[x, y], [x + 512, y], [x + 512, y + 512], [x, y + 512]]
        assert all(
            isinstance(v, int) for point in ring for v in point
        )  # level-0 pixels, not degrees
        assert signed_area(ring) == 512**2  # counter-clockwise exterior (RFC 7946)
        properties = feature["properties"]
        assert properties["objectType"] == "tile" and properties["isLocked"] is True
        assert (
            properties["classification"]["name"] == "Tile"
            and len(properties["classification"]["color"]) == 3
        )
    assert data["features"][0]["properties"]["measurements"] == {
        "attention": 0.5,
        "score: tumour": 0.9,
    }
    # A NaN measurement is left out (QuPath shows it as missing), the others stay.
    assert data["features"][1]["properties"]["measurements"] == {"attention": 0.25}


def test_detections_and_bad_measurements() -> None:
    (feature,) = tile_features(np.array([[0, 0]]), 10, {}, object_type="detection")
    assert feature["properties"] == {
        "objectType": "detection",
        "isLocked": True,
        "measurements": {},
    }
    with pytest.raises(ConfigError, match="2 values for 1 tiles"):
        tile_features(np.array([[0, 0]]), 10, {"a": np.zeros(2)})
    with pytest.raises(ConfigError, match="object_type"):
        tile_features(np.array([[0, 0]]), 10, {}, object_type="cell")  # type: ignore[arg-type]


def test_tissue_contours_are_annotations_with_holes_in_level0(tmp_path: Path) -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 5:25] = True  # a square piece with a hole
    mask[18:22, 13:17] = False
    mask[5:8, 40:58] = True  # a strip touching nothing
    features = tissue_features(
        mask, origin_level0=(1000.0, 2000.0), downsample=16.0, tolerance_px=0.5
    )
    assert len(features) == 2
    by_size = sorted(features, key=lambda f: len(f["geometry"]["coordinates"]))
    strip, square = by_size
    assert len(strip["geometry"]["coordinates"]) == 1
    exterior, hole = square["geometry"]["coordinates"]
    assert square["properties"]["objectType"] == "annotation"
    assert square["properties"]["classification"]["name"] == "Tissue"
    assert signed_area(exterior) > 0 > signed_area(hole)
    xs, ys = np.asarray(exterior).T
    # The contour runs through pixel edges +- half a pixel (marching squares at 0.5).
    assert xs.min() == pytest.approx(1000 + 5 * 16, abs=8) and xs.max() == pytest.approx(
        1000 + 25 * 16, abs=8
    )
    assert ys.min() == pytest.approx(2000 + 10 * 16, abs=8) and ys.max() == pytest.approx(
        2000 + 30 * 16, abs=8
    )
    hole_x, hole_y = np.asarray(hole).T
    assert hole_x.min() == pytest.approx(1000 + 13 * 16, abs=8) and hole_y.max() == pytest.approx(
        2000 + 22 * 16, abs=8
    )
    path = write_geojson(tmp_path / "tissue.geojson", features)
    assert len(read_geojson(path)["features"]) == 2


def test_reading_something_else_fails(tmp_path: Path) -> None:
    path = tmp_path / "point.geojson"
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}
                ],
            }
        )
    )
    with pytest.raises(MilkitError, match="Polygon"):
        read_geojson(path)
    (tmp_path / "bad.geojson").write_text("{")
    with pytest.raises(MilkitError, match="not a readable GeoJSON"):
        read_geojson(tmp_path / "bad.geojson")
