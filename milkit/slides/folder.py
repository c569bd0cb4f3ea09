"""Finding the slides of a folder: the list every stage runs over."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

from milkit.errors import ConfigError
from milkit.slides.reader import SLIDE_EXTENSIONS, slide_id_from_path

#: How a slide's id (the name of each of its output files) is made from its file's path:
#: ``stem``, the file name without its extension (``siteA/case1.svs`` -> ``case1``), or
#: ``relative-path``, its path below the slide folder with the folders joined by
#: :data:`RELATIVE_ID_SEPARATOR` (``siteA/case1.svs`` -> ``siteA__case1``).
SlideIdFrom = Literal["stem", "relative-path"]
SLIDE_ID_FROM: tuple[SlideIdFrom, ...] = get_args(SlideIdFrom)
RELATIVE_ID_SEPARATOR = "__"


def slide_id_in_folder(path: Path, root: Path, id_from: SlideIdFrom = "stem") -> str:
    """The id of the slide file ``path`` found under the slide folder ``root``.

    Args:
        path: The slide file.
        root: The slide folder it was found in (a slide file itself: its stem is its id).
        id_from: How the id is made (:data:`SlideIdFrom`).
    """
    if id_from not in SLIDE_ID_FROM:
        raise ConfigError(f"--slide-id-from must be one of {SLIDE_ID_FROM}, got {id_from!r}.")
    stem = slide_id_from_path(path)
    if id_from == "stem" or root.is_file():
        return stem
    folders = path.parent.relative_to(root).parts
    return RELATIVE_ID_SEPARATOR.join((*folders, stem))


def find_slides_by_id(
    root: str | Path,
    *,
    id_from: SlideIdFrom = "stem",
    extensions: Iterable[str] = SLIDE_EXTENSIONS,
    recursive: bool = True,
) -> dict[str, Path]:
    """Slide id -> slide file for every slide under ``root``, in sorted path order (so shards
    are deterministic).

    Hidden files and folders (``.name``) are ignored. A slide's id names every output file,
    so two slides with one id are refused before any work.

    Args:
        root: Folder to search (or a single slide file).
        id_from: How ids are made from paths (:data:`SlideIdFrom`).
        extensions: Lower-case extensions with the dot.
        recursive: Search sub-folders too.

    Raises:
        ConfigError: ``root`` does not exist, or two slides have the same id (all such pairs
            named, with the fix).
    """
    root = Path(root)
    by_id: dict[str, list[Path]] = {}
    for path in _slide_files(root, extensions, recursive):
        by_id.setdefault(slide_id_in_folder(path, root, id_from), []).append(path)
    clashes = {slide_id: paths for slide_id, paths in by_id.items() if len(paths) > 1}
    if clashes:
        named = "; ".join(
            f"{slide_id!r}: " + ", ".join(str(path) for path in paths)
            for slide_id, paths in sorted(clashes.items())
        )
        fix = (
            "pass --slide-id-from relative-path to name them by their path below the folder "
            "(siteA/case1.svs -> siteA__case1), rename the files to be unique (e.g. "
            "siteA_case1.svs) or process the folders separately"
            if id_from == "stem"
            else "rename the files or process the folders separately"
        )
        raise ConfigError(
            f"{root}: {len(clashes)} slide id(s) belong to more than one file ({named}). Every "
            f"output file is named by the slide id, so {fix}."
        )
    return {slide_id: paths[0] for slide_id, paths in by_id.items()}


def _slide_files(root: Path, extensions: Iterable[str], recursive: bool) -> list[Path]:
    """The slide files under ``root`` (or ``root`` itself), sorted.

    Raises:
        ConfigError: ``root`` does not exist.
    """
    if not root.exists():
        raise ConfigError(f"{root}: no such folder of slides.")
    if root.is_file():
        return [root]
    wanted = {ext.lower() for ext in extensions}
    slides = []
    for path in root.glob("**/*" if recursive else "*"):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if path.suffix.lower() in wanted:
            slides.append(path)
    return sorted(slides)


def find_slides(
    root: str | Path, *, extensions: Iterable[str] = SLIDE_EXTENSIONS, recursive: bool = True
) -> list[Path]:
    """The slide files under ``root`` whose ids (file stems) are unique, sorted (see
    :func:`find_slides_by_id`)."""
    return list(find_slides_by_id(root, extensions=extensions, recursive=recursive).values())


def as_slides_by_id(slides: Sequence[Path] | Mapping[str, Path]) -> dict[str, Path]:
    """Slide id -> file from either such a mapping or a list of files (ids: their stems)."""
    if isinstance(slides, Mapping):
        return dict(slides)
    return {slide_id_from_path(path): Path(path) for path in slides}


def index_slides(slides_dir: str | Path) -> dict[str, Path]:
    """Slide id -> slide file for every slide under ``slides_dir`` (searched recursively), to
    find the slide of an output file whichever way its id was made: each slide is listed under
    its relative-path id and, when no other slide shares it, its stem."""
    root = Path(slides_dir)
    slides = _slide_files(root, SLIDE_EXTENSIONS, recursive=True)
    stems: dict[str, list[Path]] = {}
    for path in slides:
        stems.setdefault(slide_id_from_path(path), []).append(path)
    index = {slide_id_in_folder(path, root, "relative-path"): path for path in slides}
    index.update({stem: paths[0] for stem, paths in stems.items() if len(paths) == 1})
    return index
