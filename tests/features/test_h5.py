"""What every milkit HDF5 file shares (milkit.features.h5): the settings hash, leftover cleanup
and plain attribute values."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from milkit.errors import ConfigError
from milkit.features.h5 import config_hash, number_attr, plain_attr, remove_stale_tmp_files


@dataclass(frozen=True)
class Spec:
    """A dataclass setting, as a TileSpec is one."""

    mpp: float = 0.5
    tile_size_px: int = 224


def test_remove_stale_tmp_files(tmp_path: Path) -> None:
    old, fresh, other = tmp_path / "a.h5.tmp", tmp_path / "b.h5.tmp", tmp_path / "c.h5"
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    assert remove_stale_tmp_files(tmp_path) == [old]
    assert remove_stale_tmp_files(tmp_path, min_age_s=0) == [fresh]
    assert sorted(tmp_path.iterdir()) == [other]


def test_config_hash_is_short_stable_and_sensitive() -> None:
    a = config_hash({"encoder": "vit", "mpp": 0.5, "spec": Spec(), "dir": Path("/x")})
    b = config_hash({"dir": "/x", "spec": Spec(), "mpp": 0.5, "encoder": "vit"})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert config_hash({"encoder": "vit", "mpp": 0.25}) != config_hash(
        {"encoder": "vit", "mpp": 0.5}
    )
    assert config_hash({"n": np.int64(3)}) == config_hash({"n": 3})
    with pytest.raises(ConfigError, match="no JSON form"):
        config_hash({"x": object()})


def test_attributes_become_plain_values() -> None:
    assert plain_attr(np.float32(0.5)) == 0.5 and type(plain_attr(np.int64(3))) is int
    assert plain_attr(b"tumour") == "tumour" and plain_attr(np.array(b"x")) == "x"
    assert plain_attr(np.array([b"a", b"b"])).tolist() == ["a", "b"]
    assert number_attr(np.array([448])) == 448.0 and number_attr(2) == 2.0
    assert number_attr(True) is None and number_attr("448") is None
    assert number_attr(float("nan")) is None
