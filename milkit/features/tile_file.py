"""The per-slide tile file (docs/design.md §4): coordinate files and feature files.

``milkit tile`` writes *coordinate files* (``coords``, ``tissue_fraction``, attributes) and
extraction writes *feature files*: the same layout plus ``features``. One format, so one module
holds its writer (:class:`TileFileWriter`, :func:`write_coords_file`) and its readers
(:func:`read_coords`, :func:`read_bag`). Rows stream into ``<slide_id>.h5.tmp``, ``complete`` is
set last and the file is renamed into place, so a half-written file is never taken for a result.

The readers also accept CLAM, TRIDENT and STAMP feature files, converting on read to float32
features and int64 level-0 pixel coordinates (or microns, for a STAMP file whose slide
resolution is unknown).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import h5py
import numpy as np
from numpy.typing import ArrayLike

import milkit
from milkit.atomic import commit, tmp_path_for
from milkit.errors import ConfigError, FeatureFileError
from milkit.features.h5 import (
    RERUN_HINT,
    json_default,
    number_attr,
    open_h5,
    plain_attr,
    set_attr,
)
from milkit.slides.tiling import TileSpec

FeatureFormat = Literal["milkit", "clam", "trident", "stamp"]
CoordsUnit = Literal["level0_px", "um"]

#: Root attribute of a coordinate file from ``milkit tile``: the options it was tiled with
#: (JSON of :class:`~milkit.pipeline.tile.TilingOptions`, ``slide_mpp`` the scan resolution
#: the slide was opened at, None for the file's own).
TILING_OPTIONS_ATTR = "tiling_options"
#: Root attributes the writer owns; ``extra_attrs`` may not override them.
RESERVED_ATTRS = frozenset(
    {"milkit_version", "slide_id", "slide_path", "tile_spec", "encoder", "encoder_dim"}
    | {"config_hash", "complete"}
)
_FEATURE_CHUNK_BYTES = 1 << 18  # ~256 KiB chunks: a few tiles' worth per write, cheap to read
_COORDS_CHUNK_ROWS = 4096
_FP16_MAX = float(np.finfo(np.float16).max)


class TileFileWriter:
    """Stream one slide's tiles into an HDF5 file, atomically.

    Rows are appended in chunks, so memory does not grow with the number of tiles. Nothing
    appears at ``path`` until :meth:`finish`; leaving the context (or an exception) before that
    deletes the temporary file and leaves any existing file at ``path`` untouched.

    Args:
        path: Final file, conventionally ``<dir>/<slide_id>.h5``.
        tile_spec: Geometry of the tiles; saved as JSON and as CLAM/TRIDENT ``coords`` attrs.
        slide_dimensions: ``(width, height)`` of the slide's level 0 in pixels.
        slide_id: Identifier of the slide (the file's stem).
        slide_path: Where the slide was read from.
        feature_dim: Feature length ``D``; ``None`` writes a coordinate file (no ``features``).
        dtype: Storage type of features, ``"float16"`` or ``"float32"``.
        encoder: Encoder id, for feature files.
        config_hash: :func:`config_hash` of the settings that produced the numbers.
        with_tissue_fraction: Whether every :meth:`append` carries tissue fractions.
        extra_attrs: More root attributes (mappings are stored as JSON, ``None`` values skipped).

    Raises:
        ConfigError: Bad ``dtype``/``feature_dim`` or an extra attribute that cannot be stored.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tile_spec: TileSpec,
        slide_dimensions: tuple[int, int],
        slide_id: str,
        slide_path: str | Path,
        feature_dim: int | None = None,
        dtype: str = "float16",
        encoder: str | None = None,
        config_hash: str | None = None,
        with_tissue_fraction: bool = False,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = tmp_path_for(self.path)
        if np.dtype(dtype) not in (np.float16, np.float32):
            raise ConfigError(
                f"{self.path}: features dtype must be float16 or float32, got {dtype!r}."
            )
        if feature_dim is not None and feature_dim <= 0:
            raise ConfigError(f"{self.path}: feature_dim must be positive, got {feature_dim}.")
        attrs: dict[str, Any] = {
            "milkit_version": milkit.__version__,
            "slide_id": slide_id,
            "slide_path": str(slide_path),
            "tile_spec": tile_spec.to_json(),
            "encoder": encoder,
            "encoder_dim": feature_dim,
            "config_hash": config_hash,
        }
        for key, value in (extra_attrs or {}).items():
            if key in RESERVED_ATTRS:
                raise ConfigError(f"{self.path}: extra attribute {key!r} is reserved by milkit.")
            if isinstance(value, Mapping):
                value = json.dumps(value, sort_keys=True, default=json_default)
            attrs[key] = value
        self._skipped_coords: list[np.ndarray] = []
        self._skipped_reasons: list[str] = []
        self._rows = 0
        self._finished = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file: h5py.File | None = h5py.File(self.tmp_path, "w")
        except OSError as error:
            raise FeatureFileError(
                f"cannot create {self.tmp_path}: {error}; check that the folder is writable."
            ) from error
        try:
            for key, value in attrs.items():
                if value is not None:
                    set_attr(self._file.attrs, key, value, self.path)
            self._coords = self._file.create_dataset(
                "coords", (0, 2), np.int64, maxshape=(None, 2), chunks=(_COORDS_CHUNK_ROWS, 2)
            )
            self._coords.attrs.update(tile_spec.coords_attrs(slide_dimensions))
            self._tissue = (
                self._file.create_dataset(
                    "tissue_fraction",
                    (0,),
                    np.float32,
                    maxshape=(None,),
                    chunks=(_COORDS_CHUNK_ROWS,),
                )
                if with_tissue_fraction
                else None
            )
            self._features = None
            if feature_dim is not None:
                row_bytes = feature_dim * np.dtype(dtype).itemsize
                self._features = self._file.create_dataset(
                    "features",
                    (0, feature_dim),
                    dtype,
                    maxshape=(None, feature_dim),
                    chunks=(max(1, _FEATURE_CHUNK_BYTES // row_bytes), feature_dim),
                )
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> TileFileWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self._discard()

    @property
    def num_rows(self) -> int:
        """Tiles appended so far."""
        return self._rows

    def append(
        self,
        features_rows: ArrayLike | None,
        coords_rows: ArrayLike,
        tissue_fraction_rows: ArrayLike | None = None,
    ) -> None:
        """Append ``n`` tiles.

        Args:
            features_rows: ``(n, D)`` features (any float type; CPU tensors work), or ``None``
                for a coordinate file.
            coords_rows: ``(n, 2)`` integer ``(x, y)`` top-left corners in level-0 pixels.
            tissue_fraction_rows: ``(n,)`` tissue fraction per tile, iff the writer was made
                ``with_tissue_fraction``.

        Raises:
            FeatureFileError: Shapes disagree, or features exceed float16's range.
        """
        self._require_open()
        coords = np.asarray(coords_rows)
        if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
            raise FeatureFileError(
                f"{self.path}: coords must be (n, 2) integers, got {coords.shape} {coords.dtype}."
            )
        n = len(coords)
        blocks: list[tuple[h5py.Dataset, np.ndarray]] = [(self._coords, coords)]
        if (features_rows is None) != (self._features is None):
            kind = (
                "a coordinate file takes no" if self._features is None else "a feature file needs"
            )
            raise FeatureFileError(f"{self.path}: {kind} features.")
        if self._features is not None:
            features = np.asarray(features_rows)
            if features.shape != (n, self._features.shape[1]):
                raise FeatureFileError(
                    f"{self.path}: expected features of shape {(n, self._features.shape[1])} for "
                    f"{n} coords, got {features.shape}."
                )
            if self._features.dtype == np.float16 and n and np.abs(features).max() > _FP16_MAX:
                raise FeatureFileError(
                    f"{self.path}: features reach {np.abs(features).max():.4g}, beyond float16's "
                    f"range ({_FP16_MAX:g}); store them as float32."
                )
            blocks.append((self._features, features))
        if (tissue_fraction_rows is None) != (self._tissue is None):
            raise FeatureFileError(
                f"{self.path}: tissue fractions must be given with every append iff the writer "
                "was made with_tissue_fraction=True."
            )
        if self._tissue is not None:
            tissue = np.asarray(tissue_fraction_rows).reshape(-1)
            if len(tissue) != n:
                raise FeatureFileError(
                    f"{self.path}: {len(tissue)} tissue fractions for {n} coords."
                )
            blocks.append((self._tissue, tissue))
        try:
            for dataset, rows in blocks:
                dataset.resize(self._rows + n, axis=0)
                dataset[self._rows :] = rows.astype(dataset.dtype, copy=False)
        except BaseException:
            self._discard()  # datasets may now disagree in length: this file is lost
            raise
        self._rows += n

    def skip(self, coords_rows: ArrayLike, reason: str) -> None:
        """Record tiles that were planned but could not be used (e.g. failed to read).

        They are stored as ``skipped_coords`` (K, 2) int64 and ``skipped_reasons`` (K,) str.

        Args:
            coords_rows: ``(k, 2)`` level-0 ``(x, y)`` of the skipped tiles.
            reason: Why, e.g. the error message; shared by these ``k`` tiles.
        """
        self._require_open()
        coords = np.asarray(coords_rows, dtype=np.int64).reshape(-1, 2)
        self._skipped_coords.append(coords)
        self._skipped_reasons.extend([reason] * len(coords))

    def finish(self) -> Path:
        """Mark the file complete, make it durable and move it to ``path``.

        Returns:
            The final path.
        """
        file = self._require_open()
        try:
            skipped = np.concatenate([np.empty((0, 2), np.int64), *self._skipped_coords])
            file.create_dataset("skipped_coords", data=skipped)
            file.create_dataset(
                "skipped_reasons", data=np.array(self._skipped_reasons, dtype=h5py.string_dtype())
            )
            file.attrs["complete"] = True  # last: a file without it is never a result
            file.close()
            self._file = None
            commit(self.tmp_path, self.path)
        except BaseException:
            self._discard()
            raise
        self._finished = True
        return self.path

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise FeatureFileError(f"{self.path}: the writer is already finished or discarded.")
        return self._file

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        self.tmp_path.unlink(missing_ok=True)


def write_coords_file(
    path: str | Path,
    coords: ArrayLike,
    tissue_fraction: ArrayLike | None = None,
    *,
    tile_spec: TileSpec,
    slide_dimensions: tuple[int, int],
    slide_id: str,
    slide_path: str | Path,
    config_hash: str | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a coordinate file (the ``milkit tile`` stage) in one go, atomically.

    Args:
        path: Final file.
        coords: ``(N, 2)`` integer level-0 ``(x, y)`` tile corners.
        tissue_fraction: ``(N,)`` fraction of each tile covered by tissue, optional.
        tile_spec: Geometry of the tiles.
        slide_dimensions: ``(width, height)`` of level 0.
        slide_id: Identifier of the slide.
        slide_path: Where the slide was read from.
        config_hash: Hash of the tiling settings.
        extra_attrs: More root attributes.

    Returns:
        The final path.
    """
    with TileFileWriter(
        path,
        tile_spec=tile_spec,
        slide_dimensions=slide_dimensions,
        slide_id=slide_id,
        slide_path=slide_path,
        config_hash=config_hash,
        with_tissue_fraction=tissue_fraction is not None,
        extra_attrs=extra_attrs,
    ) as writer:
        writer.append(None, coords, tissue_fraction)
        return writer.finish()


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


class TileFileHeader(NamedTuple):
    """A tile file's size and root attributes, read without its arrays.

    Attributes:
        n_tiles: Rows of ``coords``.
        attrs: Root attributes as Python values (``tile_spec``, ``config_hash``, ...).
    """

    n_tiles: int
    attrs: dict[str, Any]


def read_header(path: str | Path) -> TileFileHeader:
    """The number of tiles and the root attributes of a tile file, without reading any array.

    Cheap enough for every file of a cohort before the work starts; the arrays are read once,
    by whoever uses them.

    Args:
        path: A tile file of any supported format.

    Raises:
        FeatureFileError: Missing, unreadable, unfinished or malformed file.
    """
    path = Path(path)
    with open_h5(path) as file:
        _detect_format(file, path)
        attrs = {key: plain_attr(value) for key, value in file.attrs.items()}
        return TileFileHeader(n_tiles=_num_coords(file), attrs=attrs)


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
    mpp = number_attr(coords_attrs.get("mpp"))
    tile_size_level0 = number_attr(coords_attrs.get("patch_size_level0"))
    if fmt == "clam":
        tile_size_level0 = _clam_tile_size_level0(coords_attrs)
    elif fmt == "stamp":
        unit_attr = attrs.get("unit", "um")
        if unit_attr not in ("um", "µm"):
            raise FeatureFileError(f"{path}: STAMP coords in unknown unit {unit_attr!r}.")
        tile_um, tile_px = (
            number_attr(attrs.get("tile_size_um")),
            number_attr(attrs.get("tile_size_px")),
        )
        mpp = tile_um / tile_px if tile_um and tile_px else None
        slide_mpp = (
            slide_mpp or number_attr(attrs.get("slide_mpp")) or number_attr(attrs.get("mpp"))
        )
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
        num_coords = _num_coords(file)
    if len(shape) != 2 or shape[0] != num_coords:
        raise FeatureFileError(
            f"{path}: `{name}` has shape {dataset.shape} but there are {num_coords} coords; "
            f"the file is malformed, {RERUN_HINT}."
        )
    return dataset


def _num_coords(file: h5py.File) -> int:
    """Rows of ``coords``: (N, 2), or (1, N, 2) as some CLAM versions write."""
    shape = file["coords"].shape
    return int(shape[1] if len(shape) == 3 else shape[0])


def _clam_tile_size_level0(coords_attrs: Mapping[str, Any]) -> float | None:
    """CLAM stores the patch size at ``patch_level`` and that level's ``(dx, dy)`` downsample."""
    size = number_attr(coords_attrs.get("patch_size"))
    if size is None:
        return None
    if "downsample" in coords_attrs:
        return size * float(np.ravel(coords_attrs["downsample"])[0])
    return size if coords_attrs.get("patch_level") == 0 else None


def _squeeze_leading(array: np.ndarray) -> np.ndarray:
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array
