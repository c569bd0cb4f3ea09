"""Reading tile files: milkit's own and CLAM, TRIDENT and STAMP feature files.

Every format is converted on read to float32 features and int64 level-0 pixel coordinates (or
microns, for a STAMP file whose slide resolution is unknown), with the file's metadata. Writing
is :mod:`milkit.features.store`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from milkit.errors import ConfigError, FeatureFileError
from milkit.slides.tiling import TileSpec

FeatureFormat = Literal["milkit", "clam", "trident", "stamp"]
CoordsUnit = Literal["level0_px", "um"]

#: How to recover from a bad milkit file, appended to error messages.
RERUN_HINT = "rerun `milkit preprocess`, which redoes it"


@dataclass(frozen=True, eq=False)
class TileCoords:
    """Tile positions of one slide with the file's metadata, without features.

    Attributes:
        path: The file read.
        coords: ``(N, 2)`` top-left ``(x, y)``: int64 level-0 pixels, or float64 microns when
            ``coords_unit == "um"`` (a STAMP file whose slide mpp is unknown).
        coords_unit: ``"level0_px"`` or ``"um"``.
        tissue_fraction: ``(N,)`` float32, when the file has it.
        attrs: Root attributes as Python values.
        coords_attrs: Attributes of the ``coords`` dataset.
        format: Which tool wrote the file.
        tile_size_level0: Tile side in level-0 pixels, when known.
        mpp: Microns per pixel of the tiles the encoder saw, when known.
    """

    path: Path
    coords: np.ndarray
    coords_unit: CoordsUnit
    tissue_fraction: np.ndarray | None
    attrs: dict[str, Any]
    coords_attrs: dict[str, Any]
    format: FeatureFormat
    tile_size_level0: int | None
    mpp: float | None

    @property
    def tile_spec(self) -> TileSpec | None:
        """The saved :class:`TileSpec` (milkit files only)."""
        text = self.attrs.get("tile_spec")
        return TileSpec.from_json(text) if text else None


@dataclass(frozen=True, eq=False)
class Bag(TileCoords):
    """A slide's tiles with their features.

    Attributes:
        features: ``(N, D)`` float32, one row per row of ``coords``.
    """

    features: np.ndarray


def read_coords(path: str | Path, *, slide_mpp: float | None = None) -> TileCoords:
    """Read coordinates and metadata without loading features.

    Args:
        path: A milkit coordinate or feature file, or a CLAM/TRIDENT/STAMP feature file.
        slide_mpp: Microns per level-0 pixel, to convert STAMP's micron coordinates when the
            file does not record it (as ``slide_mpp`` or ``mpp`` root attribute).

    Raises:
        FeatureFileError: Missing, unreadable, unfinished or malformed file.
    """
    path = Path(path)
    with open_h5(path) as file:
        return TileCoords(**_read_meta(file, path, slide_mpp))


def read_bag(path: str | Path, *, slide_mpp: float | None = None) -> Bag:
    """Read a feature file of any supported format as float32 features and level-0 coords.

    Args:
        path: A milkit, CLAM, TRIDENT or STAMP feature file.
        slide_mpp: As in :func:`read_coords`.

    Raises:
        FeatureFileError: Missing, unreadable, unfinished or malformed file, or a coordinate
            file without features.
    """
    path = Path(path)
    with open_h5(path) as file:
        meta = _read_meta(file, path, slide_mpp)
        dataset = _features_dataset(file, path, meta["format"], len(meta["coords"]))
        features = _squeeze_leading(dataset[()]).astype(np.float32, copy=False)
        return Bag(**meta, features=features)


def read_features_dim(path: str | Path) -> int:
    """Feature length ``D`` of a feature file, from the dataset's shape alone."""
    path = Path(path)
    with open_h5(path) as file:
        fmt = _detect_format(file, path)
        return int(_features_dataset(file, path, fmt, None).shape[-1])


@contextmanager
def open_h5(path: Path) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only, with errors that name the file and the fix."""
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such file; check the path or {RERUN_HINT}.")
    try:
        with h5py.File(path, "r") as file:
            yield file
    except OSError as error:
        raise FeatureFileError(
            f"{path} is not a readable HDF5 file (truncated or not HDF5: {error}); delete it "
            f"and {RERUN_HINT}."
        ) from error


def _detect_format(file: h5py.File, path: Path) -> FeatureFormat:
    if "milkit_version" in file.attrs:
        if not bool(file.attrs.get("complete", False)):
            raise FeatureFileError(
                f"{path} is unfinished (no `complete` flag: its run was interrupted); {RERUN_HINT}."
            )
        if "coords" not in file:
            raise FeatureFileError(f"{path}: a milkit file without `coords`; {RERUN_HINT}.")
        return "milkit"
    if "coords" in file and "feats" in file:
        return "stamp"
    if "coords" in file and "features" in file:
        return "trident" if "patch_size_level0" in file["coords"].attrs else "clam"
    raise FeatureFileError(
        f"{path}: not a tile file milkit knows (it holds {sorted(file.keys())}); expected "
        "`features` + `coords` (milkit, CLAM, TRIDENT) or `feats` + `coords` (STAMP)."
    )


def _read_meta(file: h5py.File, path: Path, slide_mpp: float | None) -> dict[str, Any]:
    """The :class:`TileCoords` fields of an open file."""
    if slide_mpp is not None and not slide_mpp > 0:
        raise ConfigError(f"{path}: slide_mpp must be a positive number, got {slide_mpp!r}.")
    fmt = _detect_format(file, path)
    attrs = {key: plain_attr(value) for key, value in file.attrs.items()}
    coords_attrs = {key: plain_attr(value) for key, value in file["coords"].attrs.items()}
    coords = _squeeze_leading(file["coords"][()])
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"{path}: `coords` must be (N, 2), got {coords.shape}.")
    unit: CoordsUnit = "level0_px"
    mpp = _number(coords_attrs.get("mpp"))
    tile_size_level0 = _number(coords_attrs.get("patch_size_level0"))
    if fmt == "clam":
        tile_size_level0 = _clam_tile_size_level0(coords_attrs)
    elif fmt == "stamp":
        unit_attr = attrs.get("unit", "um")
        if unit_attr not in ("um", "µm"):
            raise FeatureFileError(f"{path}: STAMP coords in unknown unit {unit_attr!r}.")
        tile_um, tile_px = _number(attrs.get("tile_size_um")), _number(attrs.get("tile_size_px"))
        mpp = tile_um / tile_px if tile_um and tile_px else None
        slide_mpp = slide_mpp or _number(attrs.get("slide_mpp")) or _number(attrs.get("mpp"))
        coords = coords.astype(np.float64)
        if slide_mpp:
            coords = np.rint(coords / slide_mpp)
            tile_size_level0 = tile_um / slide_mpp if tile_um else None
        else:
            unit = "um"  # no level-0 resolution known: keep microns rather than guess
    tissue = file["tissue_fraction"][()].astype(np.float32) if "tissue_fraction" in file else None
    if tissue is not None and tissue.shape != (len(coords),):
        raise FeatureFileError(f"{path}: {tissue.shape} tissue fractions for {len(coords)} coords.")
    return {
        "path": path,
        "coords": coords.astype(np.int64) if unit == "level0_px" else coords,
        "coords_unit": unit,
        "tissue_fraction": tissue,
        "attrs": attrs,
        "coords_attrs": coords_attrs,
        "format": fmt,
        "tile_size_level0": round(tile_size_level0) if tile_size_level0 else None,
        "mpp": float(mpp) if mpp else None,
    }


def _features_dataset(
    file: h5py.File, path: Path, fmt: FeatureFormat, num_coords: int | None
) -> h5py.Dataset:
    """The features dataset, checked against ``(N, D)`` (``(1, N, D)`` allowed, as CLAM writes)."""
    name = "feats" if fmt == "stamp" else "features"
    if name not in file:
        raise FeatureFileError(
            f"{path} is a coordinate file without features; run `milkit preprocess` to extract them."
        )
    dataset = file[name]
    shape = (
        dataset.shape[1:] if len(dataset.shape) == 3 and dataset.shape[0] == 1 else dataset.shape
    )
    if num_coords is None:
        coords_shape = file["coords"].shape  # (N, 2), or (1, N, 2) as some CLAM versions write
        num_coords = coords_shape[1] if len(coords_shape) == 3 else coords_shape[0]
    if len(shape) != 2 or shape[0] != num_coords:
        raise FeatureFileError(
            f"{path}: `{name}` has shape {dataset.shape} but there are {num_coords} coords; "
            f"the file is malformed, {RERUN_HINT}."
        )
    return dataset


def _clam_tile_size_level0(coords_attrs: Mapping[str, Any]) -> float | None:
    """CLAM stores the patch size at ``patch_level`` and that level's ``(dx, dy)`` downsample."""
    size = _number(coords_attrs.get("patch_size"))
    if size is None:
        return None
    if "downsample" in coords_attrs:
        return size * float(np.ravel(coords_attrs["downsample"])[0])
    return size if coords_attrs.get("patch_level") == 0 else None


def _squeeze_leading(array: np.ndarray) -> np.ndarray:
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _number(value: Any) -> float | None:
    """A numeric attribute as float (1-element arrays unwrapped), else None."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value (numpy scalars unwrapped, bytes decoded)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
