"""The labels CSV: every problem reported at once with its line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from milkit.data.labels import class_names_of, read_labels
from milkit.errors import LabelsError


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_reads_rows_with_optional_columns(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "slide_id,patient_id,label,fold,task\n a ,p1,tumour,0,breast\nb,,normal,1,\nc,p1,tumour,0,x\n",
    )
    table = read_labels(path, target="label")
    assert [row.slide_id for row in table.rows] == ["a", "b", "c"]
    assert [row.line for row in table.rows] == [2, 3, 4]
    assert table.rows[1].patient_id == "b"  # no patient: the slide is its own patient
    assert [row.fold for row in table.rows] == [0, 1, 0]
    assert table.rows[0].task == "breast" and table.rows[1].task is None
    assert table.has_fold and not table.has_split


def test_every_problem_is_listed_with_its_line(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "slide_id,label,fold\n"
        "a,pos,0\n"  # line 2: fine
        "b,,1\n"  # line 3: missing target
        "a,neg,1\n"  # line 4: duplicate of line 2
        ",pos,0\n"  # line 5: empty slide id
        "c,NA,1\n"  # line 6: missing (NA)
        "d,neg,x\n",  # line 7: fold not an integer
    )
    with pytest.raises(LabelsError) as info:
        read_labels(path, target="label")
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "line 3: slide 'b': missing target in column 'label'" in message
    assert "line 4: slide 'a' is listed twice (first at line 2)" in message
    assert "line 5: empty slide_id" in message
    assert "line 6: slide 'c': missing target" in message
    assert "line 7: slide 'd': fold 'x' is not an integer" in message
    assert message.index("line 3") < message.index("line 7")  # sorted by line


def test_missing_target_column_names_the_header(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,diagnosis\na,pos\n")
    with pytest.raises(LabelsError, match=r"missing column\(s\) \['label'\].*--data.target"):
        read_labels(path, target="label")


def test_regression_targets_must_be_finite_numbers_in_range(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,stil\na,12.5\nb,lots\nc,nan\nd,inf\ne,140\nf,0\n")
    with pytest.raises(LabelsError) as info:
        read_labels(path, target="stil", task="regression", target_range=(0, 100))
    message = str(info.value)
    assert "line 3: slide 'b': target 'lots' is not a number" in message
    assert "line 4: slide 'c': missing target" in message  # nan reads as missing
    assert "line 5: slide 'd': target 'inf' is not finite" in message
    assert "line 6: slide 'e': target 140 is outside [0, 100]" in message
    assert "line 2" not in message and "line 7" not in message


def test_given_class_names_reject_other_classes(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,label\na,pos\nb,maybe\n")
    with pytest.raises(LabelsError, match=r"line 3: slide 'b': class 'maybe' is not one of"):
        read_labels(path, target="label", class_names=["neg", "pos"])


def test_a_patient_split_across_folds_is_an_error(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,patient_id,label,split\na,p1,x,train\nb,p1,y,test\nc,p2,x,\n")
    with pytest.raises(LabelsError) as info:
        read_labels(path, target="label")
    message = str(info.value)
    assert "line 3: patient 'p1' is in split 'test' here but in split 'train' at line 2" in message
    assert "line 4: slide 'c' has no split" in message


def test_split_aliases_and_bad_values(tmp_path: Path) -> None:
    good = read_labels(
        _csv(tmp_path, "slide_id,label,split\na,x,Validation\nb,y,TRAIN\n"), target="label"
    )
    assert [row.split for row in good.rows] == ["val", "train"]
    with pytest.raises(LabelsError, match="split 'holdout' is not one of train/val/test"):
        read_labels(_csv(tmp_path, "slide_id,label,split\na,x,holdout\n"), target="label")


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="no such labels CSV"):
        read_labels(tmp_path / "nope.csv", target="label")
    with pytest.raises(LabelsError, match="no slides listed"):
        read_labels(_csv(tmp_path, "slide_id,label\n"), target="label")


def test_class_names_sort_numerically_when_integers() -> None:
    assert class_names_of(["10", "2", "1", None, "2"]) == ["1", "2", "10"]
    assert class_names_of(["tumour", "normal", "10"]) == ["10", "normal", "tumour"]
