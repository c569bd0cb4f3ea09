"""Finding the slides of a folder: the list every stage runs over."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from milkit.errors import ConfigError
from milkit.slides.reader import SLIDE_EXTENSIONS, slide_id_from_path


def find_slides(
    root: str | Path, *, extensions: Iterable[str] = SLIDE_EXTENSIONS, recursive: bool = True
) -> list[Path]:
    """List slide files under ``root`` by extension, sorted so shards are deterministic.

    Hidden files and folders (``.name``) are ignored.

    Args:
        root: Folder to search (or a single slide file).
        extensions: Lower-case extensions with the dot.
        recursive: Search sub-folders too.

    Raises:
        ConfigError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder of slides.")
    wanted = {ext.lower() for ext in extensions}
    pattern = "**/*" if recursive else "*"
    slides = []
    for path in root.glob(pattern):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if path.suffix.lower() in wanted:
            slides.append(path)
    return sorted(slides)


def index_slides(slides_dir: str | Path) -> dict[str, Path]:
    """Slide id -> slide file for every slide under ``slides_dir`` (searched recursively)."""
    return {slide_id_from_path(path): path for path in find_slides(slides_dir)}
