"""Fixtures shared by the test packages."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread and do not fight other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def load_pipeline() -> Callable[[str], ModuleType]:
    """Import a script of ``pipelines/`` (not a package) by its name."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"{name}_pipeline", PIPELINES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
