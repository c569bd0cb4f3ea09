"""``milkit pretrain``: DINO pretraining on the cohort's tiles, then export of the teacher.

A LightningCLI over :class:`~milkit.ssl.dino_module.DINOModule` and
:class:`~milkit.ssl.data.TileDataModule`::

    milkit pretrain --config configs/ssl/dino_tiny_cpu.yaml \\
        --data.slides_dir SLIDES --data.coords_dir TILES/coords --out RUN_DIR

- ``--out RUN_DIR`` is the run folder: the trainer's ``default_root_dir`` (logs, saved config),
  ``RUN_DIR/checkpoints/last.ckpt`` (written every ``--checkpoint_every_n_steps`` steps and at
  the end) and ``RUN_DIR/encoder/``, the teacher backbone as a timm ``local-dir:`` folder that
  ``milkit preprocess --encoder local-dir:RUN_DIR/encoder`` uses. The command ends by printing
  that next command.
- Resuming: ``--ckpt_path auto`` (the default) continues from ``RUN_DIR/checkpoints/last.ckpt``
  when it exists, so rerunning an interrupted command resumes it (and rerunning a finished one
  only re-exports); ``last`` insists on that file, ``none`` starts over (overwriting it), and a
  path resumes from that checkpoint. Checkpoints are loaded with ``weights_only=True``.
- The crop sizes, ``n_local_crops`` and ``mean``/``std`` are set once under ``data``; they are
  linked into the model (``model.img_size`` = ``data.global_size_px``).
- Precision comes from ``trainer.precision``: ``bf16-mixed`` falls back to ``16-mixed`` on GPUs
  without bf16 and to ``32-true`` on CPUs without native bf16 (emulated bf16 is slower).
- Multi-GPU: ``--trainer.devices N --trainer.strategy ddp``; Lightning starts one process per
  device by re-running this command, and rank 0 alone exports.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from milkit.errors import ConfigError, MilkitError
from milkit.features.extract import cpu_supports_bf16
from milkit.slides.reader import slide_id_from_path
from milkit.slides.tiling_options import tiling_flags
from milkit.ssl.data import TileDataHParams, TileDataModule
from milkit.ssl.dino_module import DINOModule
from milkit.ssl.export import export_backbone
from milkit.training.quiet import filter_noise

__all__ = ["PretrainCLI", "main", "resolve_precision", "run_pretraining"]

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ENCODER_DIR = "encoder"
#: Links from the data module (where crops are made) into the model (which must agree).
DATA_TO_MODEL = (
    ("data.global_size_px", "model.img_size"),
    ("data.n_local_crops", "model.n_local_crops"),
    ("data.mean", "model.mean"),
    ("data.std", "model.std"),
)


def resolve_precision(precision: Any, accelerator: Any) -> Any:
    """``bf16-mixed`` where the hardware runs it natively, else the nearest fallback.

    Args:
        precision: ``trainer.precision`` as configured.
        accelerator: ``trainer.accelerator`` as configured (``auto``, ``gpu``, ``cpu`` ...).

    Returns:
        ``precision`` unchanged, or ``16-mixed`` (CUDA without bf16) or ``32-true`` (CPU
        without native bf16) in place of ``bf16-mixed``.
    """
    if str(precision) != "bf16-mixed" or not isinstance(accelerator, str | None):
        return precision
    on_cuda = torch.cuda.is_available() and accelerator in (None, "auto", "gpu", "cuda")
    if on_cuda and not torch.cuda.is_bf16_supported():
        rank_zero_warn("this GPU has no bf16: training with precision 16-mixed instead.")
        return "16-mixed"
    if not on_cuda and accelerator in (None, "auto", "cpu") and not cpu_supports_bf16():
        rank_zero_warn("this CPU has no native bf16: training with precision 32-true instead.")
        return "32-true"
    return precision


class _Throughput(Callback):
    """Optimiser steps and seconds of this run (a resumed run counts from where it resumed)."""

    def __init__(self) -> None:
        self.first_step = 0
        self.steps = 0
        self.seconds = 0.0
        self._started = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.first_step, self._started = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps = trainer.global_step - self.first_step
        self.seconds = time.perf_counter() - self._started


class PretrainCLI(LightningCLI):
    """LightningCLI of ``milkit pretrain``: ``--out``, resuming and checkpointing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the run folder and resume options; link the crop settings into the model."""
        parser.add_argument(
            "--out",
            type=Path | None,
            default=None,
            help="Run folder: logs, checkpoints/last.ckpt and the exported encoder/ (required).",
        )
        parser.add_argument(
            "--ckpt_path",
            type=str,
            default="auto",
            help="auto: resume from OUT/checkpoints/last.ckpt if it exists; last: require it; "
            "none: start over; or the path of a checkpoint to resume from.",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=500,
            help="Optimiser steps between updates of last.ckpt (it is also written at the end).",
        )
        for source, target in DATA_TO_MODEL:
            parser.link_arguments(source, target, apply_on="parse")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (always passed explicitly by :func:`main`)."""
        self.config = parser.parse_args(args)

    @property
    def out_dir(self) -> Path:
        """The run folder (``--out``)."""
        out = self.config.get("out")
        if out is None:
            raise ConfigError("milkit pretrain needs --out RUN_DIR (the run folder).")
        return Path(out)

    def before_instantiate_classes(self) -> None:
        """Point the trainer at the run folder and settle the precision."""
        trainer = self.config.trainer
        trainer.default_root_dir = str(self.out_dir)
        trainer.precision = resolve_precision(trainer.precision, trainer.accelerator)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add the checkpoint callback that keeps ``RUN_DIR/checkpoints/last.ckpt`` current.

        It is passed to the Trainer's constructor, so Lightning adds no default checkpointing
        of its own.
        """
        every = self.config.checkpoint_every_n_steps
        if every < 1:
            raise ConfigError(f"--checkpoint_every_n_steps={every} must be >= 1.")
        self.throughput = _Throughput()
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        last = ModelCheckpoint(
            dirpath=self.out_dir / CHECKPOINT_DIR,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every,
        )
        callbacks = [*configured, last, self.throughput]
        return super().instantiate_trainer(**kwargs, callbacks=callbacks)

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from according to ``--ckpt_path``.

        Raises:
            ConfigError: ``last`` or a path was asked for and the file does not exist.
        """
        choice = str(self.config.ckpt_path)
        last = self.out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        if choice.lower() == "none":
            return None
        if choice == "auto":
            return last if last.is_file() else None
        path = last if choice == "last" else Path(choice)
        if not path.is_file():
            raise ConfigError(
                f"--ckpt_path {choice}: {path} does not exist; use --ckpt_path auto to resume "
                "when possible or none to start over."
            )
        return path


def _next_command(datamodule: TileDataModule, encoder_dir: Path, run_dir: Path) -> str:
    """The ``milkit preprocess`` command that extracts features with the exported encoder.

    It tiles as the training tiles were tiled (the options their coordinate files record,
    scan resolutions given by ``--slide-mpp`` or ``--mpp-csv`` included, so the tiles are
    found done), into their tiling folder, with the slide ids they carry. Slides opened at
    different scan resolutions get ``RUN_DIR/slide_mpp.csv``.
    """
    slides = datamodule.slides
    hp = cast(TileDataHParams, datamodule.hparams)
    slides_dir = hp.slides_dir or os.path.commonpath([str(s.slide_path.parent) for s in slides])
    recorded = {s.slide_id: s.tiling_options for s in slides if s.tiling_options is not None}
    if recorded:
        flags, n_other = tiling_flags(recorded, run_dir.resolve() / "slide_mpp.csv")
    else:  # coordinate files from before milkit recorded its options: the tile geometry
        spec = slides[0].tile_spec
        flags, n_other = ["--mpp", str(spec.target_mpp), "--tile-size", str(spec.tile_size_px)], 0
        flags += ["--overlap", str(spec.overlap_px)] if spec.overlap_px else []
    if any(s.slide_id != slide_id_from_path(s.slide_path) for s in slides):
        flags += ["--slide-id-from", "relative-path"]  # the ids the coordinate files carry
    words = [
        "milkit", "preprocess",
        str(Path(slides_dir).resolve()),
        str(Path(hp.coords_dir).resolve().parent),
        "--encoder", f"local-dir:{encoder_dir.resolve()}",
        *flags,
    ]  # fmt: skip
    command = shlex.join(words)
    if n_other:
        command += f"\n  ({n_other} slide(s) were tiled with other options: it tiles them again)"
    return command


def run_pretraining(cli: PretrainCLI) -> Path | None:
    """Fit (resuming as configured), save ``last.ckpt`` and export the teacher backbone.

    Args:
        cli: A parsed, instantiated :class:`PretrainCLI`.

    Returns:
        The exported encoder folder on rank 0; None on other ranks and when training was
        interrupted (``last.ckpt`` is saved, so rerunning the command resumes).
    """
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    resume = cli.resume_checkpoint()
    if resume is not None:
        print(f"milkit pretrain: resuming from {resume}", file=sys.stderr)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    last = cli.out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    trainer.save_checkpoint(last, weights_only=False)  # the full state, to resume from
    if not trainer.is_global_zero:
        return None
    if trainer.interrupted:
        print(f"milkit pretrain: interrupted; rerun the command to resume from {last}.")
        return None
    encoder_dir = export_backbone(model, cli.out_dir / ENCODER_DIR, overwrite=True)
    done = cli.throughput
    tiles = done.steps * datamodule.hparams.batch_size * trainer.world_size
    print(
        f"milkit pretrain: step {trainer.global_step} ({trainer.current_epoch} epochs); this "
        f"run {done.steps} steps, {tiles} tiles in {done.seconds:.0f} s "
        f"({tiles / max(done.seconds, 1e-9):.1f} tiles/s)\n"
        f"  checkpoint: {last}\n"
        f"  encoder:    {encoder_dir} (timm local-dir)\n"
        f"next: {_next_command(datamodule, encoder_dir, cli.out_dir)}"
    )
    return encoder_dir


def main(argv: list[str]) -> int:
    """Entry point of ``milkit pretrain ...``.

    Args:
        argv: Options after ``pretrain``, e.g. ``["--config", "cfg.yaml", "--out", "run"]``.

    Returns:
        0 on success, 1 when training was interrupted, 2 on a milkit error (message on
        stderr), else the parser's exit code (``--help`` and ``--print_config`` exit 0).
    """
    filter_noise()
    try:
        cli = PretrainCLI(
            DINOModule,
            TileDataModule,
            args=list(argv),
            run=False,
            auto_configure_optimizers=False,  # DINOModule schedules lr and weight decay itself
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "milkit pretrain", "default_env": False},
        )
        encoder_dir = run_pretraining(cli)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except MilkitError as error:
        print(f"milkit pretrain: error: {error}", file=sys.stderr)
        return 2
    return 1 if encoder_dir is None and cli.trainer.interrupted else 0


if __name__ == "__main__":  # `python -m milkit.ssl.pretrain`: also what DDP re-runs per rank
    sys.exit(main(sys.argv[1:]))
