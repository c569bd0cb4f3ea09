"""``PredictionWriter``: ``milkit predict`` writes one prediction file per slide and a
``predictions.csv`` (the format is :mod:`milkit.training.prediction_file`).

Under DDP each slide is predicted (and written) by exactly one rank; rank 0 writes the CSV of
all ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from milkit.atomic import write_csv_atomic
from milkit.training.module import MILModule
from milkit.training.prediction_file import (
    PREDICTIONS_CSV,
    PREDICTIONS_DIR,
    SlidePrediction,
    write_prediction_file,
)


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
            folder = self.resolved_dir(trainer)
            write_csv_atomic(
                folder / PREDICTIONS_CSV, sorted(rows, key=lambda row: row["slide_id"])
            )
            print(
                f"milkit predict: {len(rows)} slide(s); one file per slide in "
                f"{folder / PREDICTIONS_DIR}, the table in {folder / PREDICTIONS_CSV}"
            )


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
