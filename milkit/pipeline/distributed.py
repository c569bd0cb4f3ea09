"""Feature extraction on several devices or processes through Lightning.

Each *slide* is one prediction item, so Lightning's distributed sampler for prediction (which
never repeats items) gives every slide to exactly one rank; that rank streams the slide's
features to its file. A :class:`SlideResultWriter` callback records every rank's outcomes in a
small CSV per rank, which the launching process merges into the batch summary and errors.csv.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from milkit.errors import MilkitError
from milkit.features.encoders import Encoder
from milkit.features.extract import ExtractionOptions
from milkit.pipeline.batch import BatchSummary, ErrorLog
from milkit.pipeline.jobs import SlideJob, run_job

_RESULT_FIELDS = ["slide_id", "slide_path", "outcome", "n_tiles", "n_skipped", "error", "message"]


class SlideJobs(Dataset[SlideJob]):
    """A list of slides as a dataset: item ``i`` is the ``i``-th job."""

    def __init__(self, jobs: Sequence[SlideJob]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> SlideJob:
        return self.jobs[index]


class FeatureExtractionModule(L.LightningModule):
    """Extracts whole slides in ``predict_step``; one call per slide.

    Args:
        encoder: The tile encoder (moved to the rank's device by Lightning).
        options: Extraction options (batch size, workers, precision, dtype).
    """

    def __init__(self, encoder: Encoder, options: ExtractionOptions) -> None:
        super().__init__()
        self.encoder = (
            encoder  # a submodule: Lightning moves it (weights and buffers) to the device
        )
        self.options = options

    def transfer_batch_to_device(
        self, batch: SlideJob, device: torch.device, dataloader_idx: int
    ) -> SlideJob:
        """A job is a description, not tensors: nothing to move (tiles go to the device later)."""
        return batch

    def predict_step(self, job: SlideJob, batch_idx: int) -> dict[str, Any]:
        """Extract one slide and report its outcome (failures are reported, not raised)."""
        try:
            result = run_job(job, self.encoder, self.options, device=self.device)
            n_tiles, n_skipped = result.n_tiles, result.n_skipped
        except Exception as exc:  # one bad slide never stops the batch
            message = str(exc) if isinstance(exc, MilkitError) else repr(exc)
            return {"job": job, "outcome": "failed", "n_tiles": 0, "n_skipped": 0,
                    "error": type(exc).__name__, "message": message}  # fmt: skip
        return {"job": job, "outcome": "done", "n_tiles": n_tiles, "n_skipped": n_skipped,
                "error": "", "message": ""}  # fmt: skip


class SlideResultWriter(BasePredictionWriter):
    """Appends each slide's outcome to ``<out_dir>/features_results.rank-<R>.csv``.

    Args:
        out_dir: Folder of the per-rank result files.
    """

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def path_for_rank(self, rank: int) -> Path:
        """The result file of ``rank``."""
        return self.out_dir / f"features_results.rank-{rank}.csv"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = self.path_for_rank(trainer.global_rank)
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerow(_RESULT_FIELDS)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        job: SlideJob = prediction["job"]
        with self.path_for_rank(trainer.global_rank).open("a", newline="") as handle:
            csv.writer(handle).writerow(
                [job.slide_id, job.slide_path, prediction["outcome"], prediction["n_tiles"],
                 prediction["n_skipped"], prediction["error"], prediction["message"]]
            )  # fmt: skip


def extract_distributed(
    jobs: Sequence[SlideJob],
    encoder: Encoder,
    options: ExtractionOptions,
    *,
    out_dir: Path,
    summary: BatchSummary,
    errors: ErrorLog,
    accelerator: str = "auto",
    devices: int = 2,
    num_nodes: int = 1,
    strategy: str = "ddp_spawn",
) -> None:
    """Extract ``jobs`` over ``devices`` x ``num_nodes`` processes, each slide on one rank.

    Args:
        jobs: Slides still to extract.
        encoder: Tile encoder.
        options: Extraction options.
        out_dir: Output folder (per-rank result files are written and merged here).
        summary: Updated with each slide's outcome.
        errors: Receives every failure.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        devices: Processes (devices) per node.
        num_nodes: Nodes.
        strategy: Lightning strategy; ``ddp_spawn`` works from any entry point, ``ddp`` needs
            a launcher that starts every rank (e.g. SLURM's srun).
    """
    writer = SlideResultWriter(out_dir)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        callbacks=[writer],
        use_distributed_sampler=True,
    )
    loader = DataLoader(SlideJobs(jobs), batch_size=None, shuffle=False)
    trainer.predict(
        FeatureExtractionModule(encoder, options), dataloaders=loader, return_predictions=False
    )
    for rank in range(devices * num_nodes):
        path = writer.path_for_rank(rank)
        if not path.exists():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                message = (
                    errors.record_message(
                        row["slide_path"], "features", row["error"], row["message"]
                    )
                    if row["outcome"] == "failed"
                    else None
                )
                summary.add(row["slide_id"], row["outcome"], int(row["n_tiles"]), error=message)
        path.unlink()
