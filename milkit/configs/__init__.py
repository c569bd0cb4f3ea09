"""The YAML configs that ship with milkit, found from any folder.

A config option's value (``--config`` and the group files ``--model``, ``--data``,
``--trainer``) that names no existing file is looked up here: a bare name
(``--config abmil``: ``experiments/abmil.yaml``, else ``ssl/``, ``continual/``; ``--model
abmil``: ``model/abmil.yaml``) or a path inside this folder, with or without a leading
``configs/`` (``--config configs/experiments/abmil.yaml`` works outside the repository too). A
file that exists where the command runs is always used as given. ``milkit configs`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: The folder of the packaged configs.
CONFIG_DIR = Path(__file__).resolve().parent
#: Folders a bare name is looked up in, per option.
NAME_FOLDERS: dict[str, tuple[str, ...]] = {
    "--config": ("experiments", "ssl", "continual"),
    "--model": ("model",),
    "--data": ("data",),
    "--trainer": ("trainer",),
}


def packaged_configs() -> list[Path]:
    """Every packaged config file, sorted by folder and name."""
    return sorted(CONFIG_DIR.glob("*/*.yaml"))


def resolve_config(value: str, option: str = "--config") -> str:
    """The file a config option's ``value`` means: ``value`` itself when it exists (or is not
    a file name), else the packaged config it names, else ``value`` (the parser then reports
    the missing file).

    Args:
        value: The option's value as given.
        option: The option (:data:`NAME_FOLDERS` keys) that decides where bare names are found.
    """
    path = Path(value)
    if path.exists() or not value or value.lstrip()[:1] in "{[":  # inline YAML/JSON
        return value
    inside = (
        Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    )
    if path.suffix in (".yaml", ".yml"):
        candidates = [CONFIG_DIR / inside]
    elif len(path.parts) == 1:
        candidates = [CONFIG_DIR / folder / f"{value}.yaml" for folder in NAME_FOLDERS[option]]
    else:
        candidates = []
    return next((str(found) for found in candidates if found.is_file()), value)


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of its config options resolved (:func:`resolve_config`);
    ``--option value`` and ``--option=value`` forms."""
    resolved: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            resolved.append(resolve_config(arg, pending))
            pending = None
            continue
        name, equals, value = arg.partition("=")
        if name in NAME_FOLDERS and equals:
            resolved.append(f"{name}={resolve_config(value, name)}")
        else:
            resolved.append(arg)
            pending = arg if arg in NAME_FOLDERS else None
    return resolved


def configs_listing() -> str:
    """One line per packaged config: its name for ``--config``, path and first comment line."""
    lines = [f"milkit's configs (in {CONFIG_DIR}); pass a name or a path inside this folder:"]
    for path in packaged_configs():
        first = path.read_text().splitlines()[:1] or [""]
        summary = first[0].lstrip("# ").strip() if first[0].startswith("#") else ""
        lines.append(f"  {path.parent.name + '/' + path.name:<30} {summary[:90]}")
    return "\n".join(lines)
