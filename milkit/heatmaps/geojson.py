"""QuPath GeoJSON: tiles with their values as measurements, and tissue contours as annotations.

The files follow RFC 7946's structure (a ``FeatureCollection`` of ``Feature`` objects with
``Polygon`` geometries, closed rings, exterior rings counter-clockwise in ``(x, y)`` and holes
clockwise) with QuPath's conventions for the ``properties`` of each feature, as QuPath 0.4+
reads and writes them:

- ``objectType``: ``"tile"`` (or ``"detection"``) for tiles, ``"annotation"`` for tissue;
- ``measurements``: a flat ``{name: number}`` object. Non-finite values are left out, since
  JSON has no NaN; QuPath shows a missing measurement as NaN;
- ``classification``: ``{"name": ..., "color": [r, g, b]}``, optional;
- ``isLocked``: true, as QuPath writes tiles, so a stray click does not move an object;
- the feature's ``id`` is a fresh UUID, as QuPath 0.4+ writes it.

QuPath 0.2/0.3 read ``object_type`` and measurement lists instead; milkit writes the 0.4+ form
only (QuPath PR #1099 introduced it, and it is what current QuPath exports).

Coordinates are level-0 pixels ``(x, y)``, the image space QuPath uses (no CRS, not degrees).
Drag the file onto an open image in QuPath (or File > Import objects); then Measure > Show
measurement maps colours the tiles by any measurement.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import approximate_polygon, find_contours

from milkit.atomic import atomic_write
from milkit.errors import ConfigError, MilkitError

ObjectType = Literal["tile", "detection"]

#: Colour QuPath shows tissue annotations in.
TISSUE_COLOR = (0, 160, 0)
#: Colour of the class given to tiles, when one is given.
TILE_COLOR = (60, 90, 200)


def tile_features(
    coords_level0: np.ndarray,
    tile_size_level0: float,
    measurements: Mapping[str, np.ndarray],
    *,
    object_type: ObjectType = "tile",
    classification: str | None = None,
) -> list[dict[str, Any]]:
    """One square polygon per tile with its values as QuPath measurements.

    Args:
        coords_level0: ``(N, 2)`` tile top-left ``(x, y)`` in level-0 pixels.
        tile_size_level0: Tile side in level-0 pixels.
        measurements: ``{name: (N,) values}``.
        object_type: ``"tile"`` or ``"detection"`` (QuPath draws detections filled).
        classification: Class name given to every tile, or None.

    Returns:
        GeoJSON ``Feature`` dicts.

    Raises:
        ConfigError: A measurement's length differs from the number of tiles, or the object
            type is unknown.
    """
    if object_type not in ("tile", "detection"):
        raise ConfigError(f"object_type must be 'tile' or 'detection', got {object_type!r}.")
    coords = np.asarray(coords_level0).reshape(-1, 2)
    columns = {}
    for name, values in measurements.items():
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(array) != len(coords):
            raise ConfigError(
                f"measurement {name!r} has {len(array)} values for {len(coords)} tiles."
            )
        columns[name] = array.tolist()
    size = _number(tile_size_level0)
    features = []
    for row, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        properties: dict[str, Any] = {
            "objectType": object_type,
            "isLocked": True,
            "measurements": {
                name: values[row] for name, values in columns.items() if math.isfinite(values[row])
            },
        }
        if classification is not None:
            properties["classification"] = {"name": classification, "color": list(TILE_COLOR)}
        features.append(_feature([ring], properties))
    return features


def tissue_features(
    mask: np.ndarray,
    *,
    origin_level0: tuple[float, float] = (0.0, 0.0),
    downsample: float,
    tolerance_px: float = 1.0,
    name: str = "Tissue",
) -> list[dict[str, Any]]:
    """Tissue pieces of a mask as annotation polygons (with their holes) in level-0 pixels.

    Args:
        mask: ``(H, W)`` bool tissue mask.
        origin_level0: Level-0 ``(x, y)`` of the mask's top-left corner.
        downsample: Level-0 pixels per mask pixel.
        tolerance_px: Polygon simplification tolerance in mask pixels (0: every vertex).
        name: Classification of the annotations.

    Returns:
        GeoJSON ``Feature`` dicts, one per connected piece of tissue.
    """
    labels, count = ndi.label(np.asarray(mask, dtype=bool))
    features = []
    for index, piece in enumerate(ndi.find_objects(labels), start=1):
        # Pad by one pixel so contours close around pieces touching the border.
        crop = np.pad(labels[piece] == index, 1)
        filled = ndi.binary_fill_holes(crop)
        offset = (piece[1].start - 1, piece[0].start - 1)  # (col, row) of the padded crop
        rings = _contours(filled, offset, origin_level0, downsample, tolerance_px, exterior=True)
        if not rings:
            continue
        hole_labels, n_holes = ndi.label(filled & ~crop)
        for hole in range(1, n_holes + 1):
            rings += _contours(
                hole_labels == hole, offset, origin_level0, downsample, tolerance_px, exterior=False
            )
        properties = {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(TISSUE_COLOR)},
            "isLocked": True,
        }
        features.append(_feature(rings, properties))
    return features


def _contours(
    region: np.ndarray,
    offset: tuple[int, int],
    origin_level0: tuple[float, float],
    downsample: float,
    tolerance_px: float,
    *,
    exterior: bool,
) -> list[list[list[float]]]:
    """The outer ring of a filled region, oriented, in level-0 coordinates (at most one ring)."""
    contours = find_contours(region.astype(np.float32), 0.5)
    if not contours:
        return []
    contour = max(contours, key=len)  # the region is one filled piece: its outline is the longest
    if tolerance_px > 0:
        contour = approximate_polygon(contour, tolerance=tolerance_px)
    if len(contour) < 4:
        return []
    # find_contours gives (row, col) of pixel centres; pixel edges lie at integers in level 0.
    x = origin_level0[0] + (contour[:, 1] + offset[0] + 0.5) * downsample
    y = origin_level0[1] + (contour[:, 0] + offset[1] + 0.5) * downsample
    ring = np.stack([x, y], axis=1)
    if (_signed_area(ring) > 0) != exterior:
        ring = ring[::-1]
    ring[-1] = ring[0]
    return [np.round(ring, 1).tolist()]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring; positive when counter-clockwise in ``(x, y)``."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _feature(rings: list[list[list[float]]], properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": properties,
    }


def _number(value: float) -> int | float:
    """Whole numbers as int, so integer coordinates stay integers in the file."""
    return int(value) if float(value).is_integer() else float(value)


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    """Wrap features in a ``FeatureCollection``."""
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, features: list[dict[str, Any]]) -> Path:
    """Write features as a GeoJSON ``FeatureCollection`` atomically (temporary file, rename).

    Args:
        path: Target file, conventionally ``*.geojson``.
        features: GeoJSON ``Feature`` dicts.

    Returns:
        The path written.

    Raises:
        MilkitError: The file cannot be written.
    """
    path = Path(path)
    try:
        with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
            json.dump(feature_collection(features), handle, separators=(",", ":"), allow_nan=False)
    except OSError as error:
        raise MilkitError(
            f"{path}: cannot write GeoJSON ({error}); check the folder is writable."
        ) from error
    return path


def read_geojson(path: str | Path) -> dict[str, Any]:
    """Read a GeoJSON file and check it is a ``FeatureCollection`` of ``Polygon`` features.

    Raises:
        MilkitError: Unreadable file or another structure.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MilkitError(f"{path}: not a readable GeoJSON file ({error}).") from error
    if data.get("type") != "FeatureCollection" or not isinstance(data.get("features"), list):
        raise MilkitError(f"{path}: not a GeoJSON FeatureCollection.")
    for feature in data["features"]:
        geometry = feature.get("geometry") or {}
        if feature.get("type") != "Feature" or geometry.get("type") != "Polygon":
            raise MilkitError(
                f"{path}: every feature must be a Polygon Feature, found {feature.get('type')}/{geometry.get('type')}."
            )
    return data
