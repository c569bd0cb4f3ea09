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

import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from milkit.data.datamodule import MILDataModule
from milkit.errors import MilkitError
from milkit.training.callbacks import PredictionWriter
from milkit.training.module import MILModule
from milkit.training.threads import threads_for_bags


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

    def before_fit(self) -> None:
        """Name the classes and the slides left out; train small bags on the CPU with one
        intra-op thread (:mod:`milkit.training.threads`)."""
        cohort = getattr(self.datamodule, "cohort", None)
        if cohort is not None and cohort.class_names and self.trainer.is_global_zero:
            counts = Counter(str(row.target) for row in cohort.rows)
            classes = ", ".join(f"{name} ({counts[name]})" for name in cohort.class_names)
            print(f"milkit fit: classes in index order, with slides: {classes}", file=sys.stderr)
        self.report_left_out()
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
        """Give the process its thread count back (``fit`` may run inside a longer program)."""
        torch.set_num_threads(self._threads_before)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a :class:`PredictionWriter` for ``predict`` when none is configured."""
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's callback connector sets this list; the Trainer class does not declare it.
        callbacks: list[Callback] = cast(Any, trainer).callbacks
        if self.subcommand == "predict" and not any(
            isinstance(callback, PredictionWriter) for callback in callbacks
        ):
            callbacks.append(PredictionWriter())
        return trainer


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
