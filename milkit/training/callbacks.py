"""Writing predictions: one HDF5 file per slide and a ``predictions.csv`` (design.md §4).

``<output_dir>/predictions/<slide_id>.h5`` holds ``coords`` (N, 2) int64 level-0 ``(x, y)``
(with the feature file's ``coords`` attributes, e.g. ``patch_size_level0``), ``attention``
(N,) or (N, H), ``scores`` (N,) or (N, C) (the model's tile scores, when it has them), and
root attributes: ``slide_id``, ``prediction``, ``target`` (when known), ``probabilities``,
``label_names`` (JSON), ``task``, ``target_name``, ``target_scale`` and ``target_units``
(regression), ``encoder``, ``feature_file``, ``slide_path`` and ``tile_spec`` (when the feature
file records them), ``milkit_version`` and ``complete``. Files are written to ``.tmp`` and
renamed, so a half-written file is never taken for a result.

Regression files keep the model's own scale: ``scores`` are the tile scores s_i in [0, 1] and
the ``prediction`` and ``target`` attributes are divided by ``target_scale`` likewise, so one
factor, ``target_scale``, turns every number of the file into the target's units (what
:mod:`milkit.heatmaps` does to show e.g. % TILs). ``predictions.csv`` holds the target's units. Under DDP each slide is predicted (and written)
by exactly one rank; rank 0 writes the CSV of all ranks.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

import milkit
from milkit.features.formats import read_coords
from milkit.features.store import TMP_SUFFIX
from milkit.training.module import MILModule, SlidePrediction

PREDICTIONS_DIR = "predictions"
PREDICTIONS_CSV = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Write every predicted slide's file as its batch finishes, and the CSV at the end."""

    def __init__(self, output_dir: str | Path | None = None) -> None:
        """Configure the writer.

        Args:
            output_dir: The run folder that gets ``predictions/`` and ``predictions.csv``;
                default: the trainer's ``default_root_dir``.
        """
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._rows: list[dict[str, Any]] = []

    def resolved_dir(self, trainer: pl.Trainer) -> Path:
        """The folder predictions go to."""
        return self.output_dir if self.output_dir is not None else Path(trainer.default_root_dir)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Sequence[SlidePrediction],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self.resolved_dir(trainer) / PREDICTIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        module_attrs = _module_attrs(pl_module)
        for slide in prediction:
            attrs = {**module_attrs, **_unit_scale_values(slide, pl_module)}
            write_prediction_file(folder / f"{slide.slide_id}.h5", slide, attrs)
            self._rows.append(_csv_row(slide, getattr(pl_module, "class_names", None)))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero:
            write_csv_atomic(
                self.resolved_dir(trainer) / PREDICTIONS_CSV,
                sorted(rows, key=lambda row: row["slide_id"]),
            )


def write_prediction_file(
    path: Path, slide: SlidePrediction, extra_attrs: dict[str, Any] | None = None
) -> Path:
    """Write one slide's prediction file atomically.

    Args:
        path: Final path, ``<run>/predictions/<slide_id>.h5``.
        slide: The slide's prediction.
        extra_attrs: More root attributes (None values skipped).

    Returns:
        ``path``.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    source = read_coords(slide.feature_path)
    attrs: dict[str, Any] = {
        "milkit_version": milkit.__version__,
        "slide_id": slide.slide_id,
        "slide_path": slide.slide_path,
        "feature_file": slide.feature_path,
        "tile_spec": source.attrs.get("tile_spec"),
        "prediction": slide.prediction,
        "target": slide.target,
        "probabilities": slide.probabilities,
        **(extra_attrs or {}),
    }
    try:
        with h5py.File(tmp, "w") as file:
            coords = file.create_dataset("coords", data=slide.coords.astype(np.int64))
            coords.attrs.update(source.coords_attrs)
            file.create_dataset("attention", data=slide.attention.astype(np.float32))
            if slide.tile_scores is not None:
                file.create_dataset("scores", data=slide.tile_scores.astype(np.float32))
            for key, value in attrs.items():
                if value is not None:
                    file.attrs[key] = value
            file.attrs["complete"] = True  # last: a file without it is never a result
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows (columns from the first row) to ``path`` via a renamed temporary file.

    Args:
        path: The CSV to write.
        rows: One dict per row, all with the same keys.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["slide_id"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _module_attrs(module: pl.LightningModule) -> dict[str, Any]:
    if not isinstance(module, MILModule):
        return {}
    return {
        "task": module.task,
        "label_names": json.dumps(module.class_names) if module.class_names else None,
        "target_name": module.target_name,
        "target_scale": module.target_scale if module.task == "regression" else None,
        "target_units": module.target_units if module.task == "regression" else None,
        "encoder": module.encoder,
    }


def _unit_scale_values(slide: SlidePrediction, module: pl.LightningModule) -> dict[str, Any]:
    """A regression slide's ``prediction``/``target`` on the scale of its tile scores."""
    if not isinstance(module, MILModule) or module.task != "regression":
        return {}
    scale = module.target_scale
    return {
        "prediction": float(slide.prediction) / scale,
        "target": float(slide.target) / scale if slide.target is not None else None,
    }


def _csv_row(slide: SlidePrediction, class_names: Sequence[str] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "slide_id": slide.slide_id,
        "target": "" if slide.target is None else slide.target,
        "prediction": slide.prediction,
    }
    if slide.probabilities is not None and class_names:
        for name, probability in zip(class_names, slide.probabilities, strict=True):
            row[f"prob_{name}"] = f"{float(probability):.6g}"
    return row
