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

    Hidden files and folders (``.name``) are ignored. A slide's id (its file name without the
    extension) names every output file, so two slides with one id are refused before any work.

    Args:
        root: Folder to search (or a single slide file).
        extensions: Lower-case extensions with the dot.
        recursive: Search sub-folders too.

    Raises:
        ConfigError: ``root`` does not exist, or two slides have the same id (all such pairs
            named).
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
    slides.sort()
    _check_unique_ids(root, slides)
    return slides


def _check_unique_ids(root: Path, slides: list[Path]) -> None:
    """Refuse slides that share an id: their outputs would overwrite one another."""
    by_id: dict[str, list[Path]] = {}
    for path in slides:
        by_id.setdefault(slide_id_from_path(path), []).append(path)
    clashes = {slide_id: paths for slide_id, paths in by_id.items() if len(paths) > 1}
    if clashes:
        named = "; ".join(
            f"{slide_id!r}: " + ", ".join(str(path) for path in paths)
            for slide_id, paths in sorted(clashes.items())
        )
        raise ConfigError(
            f"{root}: {len(clashes)} slide id(s) belong to more than one file ({named}). Every "
            "output file is named by the slide id (the file name without its extension), so "
            "rename the files to be unique (e.g. prefix the site: siteA_case1.svs) or process "
            "the folders separately."
        )


def index_slides(slides_dir: str | Path) -> dict[str, Path]:
    """Slide id -> slide file for every slide under ``slides_dir`` (searched recursively)."""
    return {slide_id_from_path(path): path for path in find_slides(slides_dir)}
