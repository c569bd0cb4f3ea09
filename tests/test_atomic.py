"""Atomic writes (milkit.atomic): a file appears whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milkit.atomic import atomic_write, tmp_path_for, write_csv_atomic, write_json_atomic


def test_a_finished_write_replaces_the_file_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_write(target) as tmp:
        assert tmp == tmp_path_for(target) and tmp.name == "out.txt.tmp"
        tmp.write_text("new")
        assert not target.exists()  # nothing at the final path until the block ends
    assert target.read_text() == "new" and not tmp_path_for(target).exists()


def test_a_failed_write_keeps_the_old_file_and_removes_the_tmp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk"), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and not tmp_path_for(target).exists()


def test_json_and_csv_helpers(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"auroc": 0.9})
    assert json.loads((tmp_path / "a.json").read_text()) == {"auroc": 0.9}
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "b.json", {"auroc": float("nan")})
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b.json.tmp").exists()
    write_csv_atomic(tmp_path / "p.csv", [{"slide_id": "s1", "prediction": "tumour"}])
    assert (tmp_path / "p.csv").read_text().splitlines() == ["slide_id,prediction", "s1,tumour"]
