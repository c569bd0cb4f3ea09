"""What every milkit HDF5 result file shares: opening with clear errors, attributes as plain
values, the settings hash and the completeness check that resuming relies on.

A file is a result only when it carries ``complete`` (set last, just before the atomic rename of
:mod:`milkit.atomic`) and, where the caller expects one, the same ``config_hash``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from milkit.atomic import TMP_SUFFIX
from milkit.errors import ConfigError, FeatureFileError

FileStatus = Literal["missing", "incomplete", "stale", "corrupt", "complete"]

#: How to recover from a bad milkit file, appended to error messages.
RERUN_HINT = "rerun `milkit preprocess`, which redoes it"


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


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars unwrapped, bytes decoded)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return np.array([plain_attr(item) for item in value.ravel()], dtype=object)
    return value


def number_attr(value: Any) -> float | None:
    """A numeric attribute as a finite float (1-element arrays unwrapped), else None."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


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
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)
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


def set_attr(attrs: h5py.AttributeManager, key: str, value: Any, path: Path) -> None:
    try:
        attrs[key] = value
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{path}: attribute {key!r}={value!r} cannot be stored: {error}"
        ) from error


def json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r} has no JSON form")
