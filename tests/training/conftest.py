"""Every test here trains or runs tiny models: one thread each (see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread: None) -> None:
    """Applies the shared ``one_thread`` fixture to every test of this package."""
