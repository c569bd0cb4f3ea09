"""Atomic file writes: a result appears whole, or not at all (docs/design.md §4, §8).

Every file milkit writes goes to ``<name>.tmp`` beside its final path and is renamed into place
only once it is complete and on disk; an interrupted write leaves at most the ``.tmp`` file,
which no reader takes for a result.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Suffix of a file being written; it becomes the final file only once finished.
TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | Path) -> Path:
    """The temporary path ``path`` is written under (``<name>.tmp`` in the same folder)."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def atomic_write(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Write a file through a temporary path that is renamed into place on success.

    The caller writes to the yielded path (open it, hand it to ``h5py``, ``torch.save``, ...).
    When the block ends without an exception the file is flushed to disk (``durable``) and
    renamed to ``path``; on an exception the temporary file is deleted and any existing file at
    ``path`` is left untouched.

    Args:
        path: The final file; its folder is created if needed.
        durable: fsync the file and its folder, so the rename survives a power cut.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        commit(tmp, path, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)


def commit(tmp: Path, path: Path, *, durable: bool = True) -> None:
    """Move a finished temporary file to its final ``path`` (fsynced first when ``durable``).

    For writers that hold their temporary file open across many calls (e.g. a streaming HDF5
    writer); everything else uses :func:`atomic_write`.
    """
    if durable:
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, content: Any) -> Path:
    """Write ``content`` as indented JSON (NaN refused) to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(content, indent=2, allow_nan=False) + "\n")


def write_csv_atomic(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows (columns from the first row) to ``path`` via a renamed temporary file.

    Args:
        path: The CSV to write.
        rows: One dict per row, all with the same keys.

    Returns:
        ``path``.
    """
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["slide_id"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; directories cannot be opened this way outside POSIX."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
