"""The per-slide HDF5 tile file (design.md §4): coordinate files and feature files.

``milkit tile`` writes *coordinate files* (``coords``, ``tissue_fraction``, attributes) and
extraction writes *feature files* (the same plus ``features``). Both are written atomically by
:class:`TileFileWriter`: rows stream into ``<slide_id>.h5.tmp``, ``complete`` is set last, and
the file is renamed into place, so a half-written file is never taken for a result.

The readers (:mod:`milkit.features.formats`) accept these and CLAM, TRIDENT and STAMP files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np
from numpy.typing import ArrayLike

import milkit
from milkit.errors import ConfigError, FeatureFileError
from milkit.features.formats import open_h5, plain_attr
from milkit.slides.tiling import TileSpec

FileStatus = Literal["missing", "incomplete", "stale", "corrupt", "complete"]

#: Suffix of the file being written; it becomes the final file only once finished.
TMP_SUFFIX = ".tmp"
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
        self.tmp_path = self.path.with_name(self.path.name + TMP_SUFFIX)
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
                value = json.dumps(value, sort_keys=True, default=_json_default)
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
                    _set_attr(self._file.attrs, key, value, self.path)
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
            with open(self.tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(self.tmp_path, self.path)
            _fsync_dir(self.path.parent)
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


def config_hash(obj: Mapping[str, Any]) -> str:
    """Short stable hash of the settings that change a file's numbers.

    Keys are sorted, so the order of a mapping does not matter; dataclasses, paths and numpy
    values are converted to JSON first.

    Args:
        obj: What the caller deems to change the results (encoder, tile spec, ...).

    Returns:
        16 hex characters of the SHA-256 of the canonical JSON.

    Raises:
        ConfigError: A value has no JSON form.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    except TypeError as error:
        raise ConfigError(
            f"config_hash: {error}; pass plain values (str, numbers, lists)."
        ) from error
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_status(path: str | Path, *, config_hash: str | None = None) -> FileStatus:
    """What state a milkit tile file is in, for resuming.

    Args:
        path: The final file (not the ``.tmp``).
        config_hash: Expected hash; a complete file with another one is ``"stale"``.

    Returns:
        ``"missing"``, ``"corrupt"`` (not readable as HDF5), ``"incomplete"`` (no ``complete``
        flag), ``"stale"`` or ``"complete"``.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        with open_h5(path) as file:
            complete = bool(file.attrs.get("complete", False))
            stored_hash = plain_attr(file.attrs.get("config_hash"))
    except FeatureFileError:
        return "corrupt"
    if not complete:
        return "incomplete"
    if config_hash is not None and stored_hash != config_hash:
        return "stale"
    return "complete"


def is_complete(path: str | Path, config_hash: str | None = None) -> bool:
    """Whether ``path`` is a finished file made with ``config_hash`` (when given)."""
    return file_status(path, config_hash=config_hash) == "complete"


def remove_stale_tmp_files(folder: str | Path, *, min_age_s: float = 3600.0) -> list[Path]:
    """Delete ``*.h5.tmp`` leftovers of interrupted runs.

    Args:
        folder: Where the tile files live.
        min_age_s: Only files untouched this long go, so a concurrent job's (e.g. another
            ``--shard``'s) file in progress survives.

    Returns:
        The removed paths.
    """
    cutoff = time.time() - min_age_s
    removed = []
    for tmp in sorted(Path(folder).glob(f"*.h5{TMP_SUFFIX}")):
        if tmp.is_file() and tmp.stat().st_mtime <= cutoff:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _set_attr(attrs: h5py.AttributeManager, key: str, value: Any, path: Path) -> None:
    try:
        attrs[key] = value
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{path}: attribute {key!r}={value!r} cannot be stored: {error}"
        ) from error


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r} has no JSON form")


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; directories cannot be opened this way outside POSIX."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
