"""Every YAML under ``configs/`` loads through its command's parser (``--print_config``), so
none can rot.

How a file is loaded is decided by the first folder under ``configs/``: ``model/``, ``data/``
and ``trainer/`` hold group files of ``milkit fit`` (``--model FILE`` etc.), ``experiments/``
and files directly in ``configs/`` hold whole ``milkit fit|validate|test|predict``
configurations (``--config FILE``, for every subcommand; see ``LOADERS``). Folders of other
commands are listed in ``OTHER_COMMANDS`` with the ``main(argv)`` that loads them
(``--config FILE``). A file in any other folder fails here until its folder gets a rule, so no
config is skipped silently. Each printed configuration must contain every value the file sets.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LOADERS = {"model": "--model", "data": "--data", "trainer": "--trainer", "experiments": "--config"}
OTHER_COMMANDS = {
    "continual": "milkit.training.continual.run:main",  # milkit continual
    "ssl": "milkit.ssl.pretrain:main",  # milkit pretrain
}
SUBCOMMANDS = ("fit", "validate", "test", "predict")
MIL_MAIN = "milkit.training.cli:run_lightning"


def _all_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def _folder(path: Path) -> str:
    parts = path.relative_to(CONFIGS).parts
    return parts[0] if len(parts) > 1 else ""


def _expand(value: Any, base: Path) -> Any:
    """The file's content with references to other YAML files replaced by their content."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (base / value).is_file():
        target = base / value
        return _expand(yaml.safe_load(target.read_text()), target.parent)
    if isinstance(value, dict):
        return {key: _expand(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, base) for item in value]
    return value


def _assert_contains(expected: Any, actual: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a mapping, printed {actual!r}"
        for key, item in expected.items():
            assert key in actual, f"{where}.{key} missing from the printed config"
            _assert_contains(item, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for index, (item, printed) in enumerate(zip(expected, actual, strict=True)):
            _assert_contains(item, printed, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: file says {expected!r}, printed {actual!r}"


def _print_config(argv: list[str], capsys: pytest.CaptureFixture[str], main: str) -> dict[str, Any]:
    module, function = main.split(":")
    code = getattr(importlib.import_module(module), function)([*argv, "--print_config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return yaml.safe_load(out)


def test_configs_exist_and_every_folder_has_a_rule() -> None:
    files = _all_configs()
    assert {"model", "data", "trainer", "experiments"} <= {_folder(path) for path in files}
    unknown = [p for p in files if _folder(p) and _folder(p) not in LOADERS | OTHER_COMMANDS]
    assert not unknown, (
        f"no loading rule for {unknown}: add the folder to LOADERS or OTHER_COMMANDS in {__file__}"
    )


@pytest.mark.parametrize("path", _all_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_with_print_config(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(path)
    content = _expand(yaml.safe_load(path.read_text()), path.parent)
    if folder in OTHER_COMMANDS:
        printed = _print_config(["--config", str(path)], capsys, OTHER_COMMANDS[folder])
        _assert_contains(content, printed, path.name)
        return
    flag = LOADERS.get(folder, "--config")
    for subcommand in SUBCOMMANDS if flag == "--config" else ("fit",):
        printed = _print_config([subcommand, flag, str(path)], capsys, MIL_MAIN)
        if flag == "--config":
            _assert_contains(content, printed, f"{path.name} ({subcommand})")
        else:
            _assert_contains(content, printed[flag.removeprefix("--")], path.name)
