"""``milkit fit|validate|test|predict``: LightningCLI over :class:`MILModule` and
:class:`MILDataModule`.

The model is chosen inside the module by ``class_path`` (``--model.model``); its ``in_dim`` and
``n_classes`` come from the data (``parser.link_arguments(..., apply_on="instantiate")``), as
do the class names, feature size and encoder id the checkpoint records. Every subcommand takes
``--config`` (repeatable; later files override earlier ones) and group files such as
``--model configs/model/abmil.yaml``. ``predict`` always writes prediction files: a
:class:`PredictionWriter` to ``--trainer.default_root_dir`` is added when the trainer
configures none. ``--weights_only`` left unset loads checkpoints the way torch >= 2.6 does by
default, ``weights_only=True`` (docs/design.md §8); milkit's checkpoints hold plain data only.

Examples::

    milkit fit --config configs/experiments/abmil.yaml \\
        --data.features_dir FEATURES --data.labels_csv labels.csv
    milkit predict --config configs/experiments/abmil.yaml --ckpt_path BEST.ckpt \\
        --data.features_dir FEATURES --data.labels_csv labels.csv --trainer.default_root_dir RUN
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from milkit.atomic import atomic_write
from milkit.data.datamodule import MILDataModule
from milkit.errors import ConfigError, MilkitError
from milkit.features.h5 import config_hash
from milkit.training.callbacks import PredictionWriter
from milkit.training.module import MILModule
from milkit.training.quiet import filter_noise
from milkit.training.threads import threads_for_bags

#: Where ``fit`` keeps its checkpoints under ``default_root_dir``.
CHECKPOINT_DIR = "checkpoints"
#: The configuration hash of the ``fit`` run in ``default_root_dir`` (what a rerun must match).
FIT_CONFIG_JSON = "fit_config.json"


class MILCLI(LightningCLI):
    """LightningCLI with the data-to-model links of milkit's MIL training."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link what the data knows into the model (hidden from the command line)."""
        for source, target in (
            ("data.feature_dim", "model.model.init_args.in_dim"),
            ("data.n_classes", "model.model.init_args.n_classes"),  # skipped by regressors
            ("data.class_names", "model.class_names"),
            ("data.feature_dim", "model.feature_dim"),
            ("data.encoder", "model.encoder"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="parse")
        parser.link_arguments("data.target", "model.target_name", apply_on="parse")
        parser.link_arguments("data.target_scale", "model.target_scale", apply_on="parse")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``: milkit's entry points always pass their argv explicitly (Lightning
        would warn that ``sys.argv`` is set as well)."""
        self.config = parser.parse_args(args)
        self._argv = [str(arg) for arg in args]

    def before_fit(self) -> None:
        """Resume an interrupted run of this configuration; name the classes and the slides
        left out; train small bags on the CPU with one intra-op thread
        (:mod:`milkit.training.threads`)."""
        self.resume_if_interrupted()
        cohort = getattr(self.datamodule, "cohort", None)
        if cohort is not None and cohort.class_names and self.trainer.is_global_zero:
            counts = Counter(str(row.target) for row in cohort.rows)
            classes = ", ".join(f"{name} ({counts[name]})" for name in cohort.class_names)
            print(f"milkit fit: classes in index order, with slides: {classes}", file=sys.stderr)
        self.report_left_out()
        note = self.datamodule.validation_note() if self.trainer.is_global_zero else None
        if note is not None:
            print(f"milkit fit: {note}", file=sys.stderr)
        self._threads_before = torch.get_num_threads()
        threads = threads_for_bags(self.datamodule, self.trainer)
        if threads is not None:
            torch.set_num_threads(threads)

    def before_validate(self) -> None:
        """Name the slides left out of the cohort."""
        self.report_left_out()

    def before_test(self) -> None:
        """Name the slides left out of the cohort."""
        self.report_left_out()

    def before_predict(self) -> None:
        """Name the slides left out of the cohort."""
        self.report_left_out()

    def report_left_out(self) -> None:
        """Print a line for each thing the cohort leaves out (slides without tiles, feature
        files without labels), if any."""
        cohort = getattr(self.datamodule, "cohort", None)
        if cohort is not None and self.trainer.is_global_zero:
            for note in cohort.notes():
                print(f"milkit {self.subcommand}: {note}", file=sys.stderr)

    def after_fit(self) -> None:
        """Say what the run left and what to run next; give the process its thread count back
        (``fit`` may run inside a longer program)."""
        torch.set_num_threads(self._threads_before)
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            print(self.fit_summary())

    def fit_summary(self) -> str:
        """Where the model is, its last validation metrics and the ``predict`` command."""
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        saved = ""
        if isinstance(checkpoint, ModelCheckpoint):
            saved = checkpoint.best_model_path or checkpoint.last_model_path
        lines = [f"milkit fit: done, {trainer.current_epoch} epoch(s), {trainer.global_step} steps"]
        validation = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and name.count("/") == 1 and value.numel() == 1
        }  # the per-class metrics stay in the logs
        if validation:
            lines.append(
                "  validation (last epoch): "
                + ", ".join(f"{name[4:]} {value:.3f}" for name, value in validation.items())
            )
        if saved:
            lines.append(f"  checkpoint: {saved}")
            options = self._argv[1:] if self._argv[:1] == ["fit"] else self._argv
            kept = _without_options(options, ("--ckpt_path",))
            lines.append("next: " + shlex.join(["milkit", "predict", *kept, "--ckpt_path", saved]))
        return "\n".join(lines)

    def resume_if_interrupted(self) -> None:
        """``fit`` without ``--ckpt_path`` continues from ``checkpoints/last.ckpt`` of its
        ``default_root_dir`` when that folder holds a run of the same configuration (recorded
        in ``fit_config.json``), and refuses a folder of another configuration's run.

        Raises:
            ConfigError: ``last.ckpt`` exists but was written by another configuration.
        """
        root = Path(self.trainer.default_root_dir)
        last, marker = root / CHECKPOINT_DIR / "last.ckpt", root / FIT_CONFIG_JSON
        # Before fit the trainer does not know its rank yet; Lightning's launcher has put it
        # in the environment, where rank_zero_only reads it.
        first_rank = int(getattr(rank_zero_only, "rank", 0)) == 0
        config_id = configuration_id(self.config["fit"], leave_out=("ckpt_path",))
        fit_options = self.config_init["fit"]
        recorded = recorded_configuration(marker)
        if fit_options.get("ckpt_path") is None and last.is_file():
            if recorded != config_id:
                raise ConfigError(
                    f"{root} holds a training run of another configuration ({last}); choose "
                    f"another --trainer.default_root_dir, or delete {last} to start over."
                )
            fit_options["ckpt_path"] = str(last)
            if first_rank:
                print(f"milkit fit: resuming from {last}", file=sys.stderr)
        if first_rank and recorded != config_id:  # every rank decides alike; one writes
            record_configuration(marker, config_id)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Checkpoints written atomically into ``default_root_dir/checkpoints`` (a fixed place
        to resume from); a :class:`PredictionWriter` for ``predict`` when none is configured."""
        if self._get(self.config_init, "trainer", default={}).get("plugins") is None:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        trainer = super().instantiate_trainer(**kwargs)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is None:
                checkpoint.dirpath = str(Path(trainer.default_root_dir) / CHECKPOINT_DIR)
        # Lightning's callback connector sets this list; the Trainer class does not declare it.
        callbacks: list[Callback] = cast(Any, trainer).callbacks
        if self.subcommand == "predict" and not any(
            isinstance(callback, PredictionWriter) for callback in callbacks
        ):
            callbacks.append(PredictionWriter())
        return trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file renamed into place: a run killed while
    saving leaves the previous ``last.ckpt`` whole."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        with atomic_write(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def _without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--name v`` or ``--name=v``)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept


def configuration_id(config: Any, *, leave_out: Sequence[str] = ()) -> str:
    """Hash of a parsed configuration (every option but ``leave_out`` and the config-file
    paths, whose content is in the options) and of its labels CSV's bytes: what decides a
    run's numbers, so a rerun can tell it may resume.

    Args:
        config: The parsed namespace of one subcommand.
        leave_out: Top-level options that do not change the numbers (e.g. ``--out``).
    """
    options = {
        key: value
        for key, value in config.as_dict().items()
        if key not in (*leave_out, "config", "__path__")
    }
    labels = config.data.labels_csv
    digest = hashlib.sha256(Path(labels).read_bytes()).hexdigest() if labels else None
    return config_hash(
        {"options": json.dumps(options, sort_keys=True, default=str), "labels": digest}
    )


def recorded_configuration(marker: Path) -> str | None:
    """The configuration hash a run folder's marker file records; None without one.

    Args:
        marker: ``fit_config.json`` or ``cv_config.json``.
    """
    return json.loads(marker.read_text()).get("config_hash") if marker.is_file() else None


def record_configuration(marker: Path, config_id: str) -> None:
    """Write (atomically) the :func:`configuration_id` of the run in the marker's folder.

    Args:
        marker: ``fit_config.json`` or ``cv_config.json``.
        config_id: The hash.
    """
    with atomic_write(marker) as tmp:
        tmp.write_text(json.dumps({"config_hash": config_id}) + "\n")


def cli_kwargs(prog: str = "milkit") -> dict[str, Any]:
    """Keyword arguments of the LightningCLI behind ``milkit`` (shared with ``milkit cv``).

    Args:
        prog: Program name shown in ``--help``.
    """
    return {
        "model_class": MILModule,
        "datamodule_class": MILDataModule,
        "auto_configure_optimizers": False,  # the module takes optimizer/lr_scheduler itself
        "save_config_kwargs": {"overwrite": True},
        "parser_kwargs": {"prog": prog, "default_env": False},
    }


def build_cli(argv: Sequence[str], *, run: bool = True) -> MILCLI:
    """Parse ``argv`` and (with ``run``) execute the subcommand.

    Args:
        argv: ``[subcommand, options...]`` with ``run``, else options only.
        run: Whether ``argv`` starts with a subcommand to run.

    Returns:
        The CLI object (``.model``, ``.datamodule``, ``.trainer``, ``.config``).
    """
    return MILCLI(args=list(argv), run=run, **cli_kwargs())


def run_lightning(argv: list[str]) -> int:
    """Entry point of ``milkit fit|validate|test|predict ...``.

    Args:
        argv: The subcommand and its options, e.g. ``["fit", "--config", "cfg.yaml"]``.

    Returns:
        0 on success, 2 on a milkit error (message on stderr), else the parser's exit code
        (``--help`` and ``--print_config`` exit 0).
    """
    try:
        with warnings.catch_warnings():
            filter_noise()
            build_cli(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except MilkitError as error:
        command = argv[0] if argv else "fit"
        print(f"milkit {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # `python -m milkit.training.cli`: what DDP launches per rank
    sys.exit(run_lightning(sys.argv[1:]))
