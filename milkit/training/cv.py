"""``milkit cv``: K-fold cross-validation, repeated R times, with one summary of every metric.

Each (repeat r, fold k) trains on its training part with early stopping on its validation
part (the best checkpoint by ``--monitor``), tests that checkpoint on the held-out fold and
writes the fold's predictions. Folds come from the labels CSV's ``fold`` column when it has
one (then every repeat reuses them), else from stratified patient-grouped folds seeded with
``seed + r``. Each run is seeded with ``seed + r·K + k``, so the whole CV is deterministic.
The configuration is parsed by the same LightningCLI parser as ``milkit fit`` (``--config``,
group files, any ``--model.*``/``--data.*``/``--trainer.*`` override).

Output under ``--out``::

    repeat{r}/fold{k}/           config.yaml, metrics.csv, checkpoints/best.ckpt,
                                 predictions/<slide_id>.h5, predictions.csv (held-out slides)
    cv_summary.json              see below
    cv_summary.md                the table printed at the end

``cv_summary.json``::

    {"folds": K, "repeats": R, "seed": S, "monitor": "val/loss", "seconds": 93.1,
     "sd": "sample standard deviation (ddof=1)", "sem": "sd / sqrt(n)",
     "runs": [{"repeat": 0, "fold": 0, "seed": 0, "dir": "repeat0/fold0",
               "best_checkpoint": "repeat0/fold0/checkpoints/best.ckpt", "epochs": 12,
               "n_train": 64, "n_val": 16, "n_test": 20, "seconds": 8.2,
               "metrics": {"auroc": 0.97, "accuracy": 0.9, ...}}, ...],
     "metrics": {"auroc": {"values": [...], "mean": 0.96, "sd": 0.02, "sem": 0.006,
                           "n": 10}, ...}}

Metric names are the test metrics without the ``test/`` prefix; non-finite values are null.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger

from milkit.data.labels import read_labels
from milkit.errors import ConfigError, MilkitError
from milkit.training.callbacks import PredictionWriter
from milkit.training.cli import MILCLI, cli_kwargs

SUMMARY_JSON = "cv_summary.json"
SUMMARY_MD = "cv_summary.md"
_REPLACED_CALLBACKS = (EarlyStopping, ModelCheckpoint, PredictionWriter)


class CVCLI(MILCLI):
    """The ``milkit fit`` parser plus the CV options; classes are instantiated per fold."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--folds --repeats --seed --out --monitor --monitor_mode --patience``."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--folds", type=int, default=5, help="number of folds K")
        parser.add_argument("--repeats", type=int, default=1, help="repeats R of the K folds")
        parser.add_argument("--seed", type=int, default=0, help="seed of splits and training")
        parser.add_argument("--out", type=Path, required=True, help="run folder (new or empty)")
        parser.add_argument("--monitor", default="val/loss", help="early stopping metric")
        parser.add_argument(
            "--monitor_mode", type=Literal["min", "max"], default="min", help="min or max"
        )
        parser.add_argument("--patience", type=int, default=5, help="epochs without progress")

    def instantiate_classes(self) -> None:
        """Nothing at start-up: :meth:`run_cv` instantiates fresh classes for every fold."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """A quiet per-fold trainer: CSV logs, early stopping, best checkpoint, predictions."""
        config = self.config
        fold_dir = Path(config.trainer.default_root_dir)
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = [c for c in configured if not isinstance(c, _REPLACED_CALLBACKS)]
        callbacks += [
            EarlyStopping(
                monitor=config.monitor, mode=config.monitor_mode, patience=config.patience
            ),
            ModelCheckpoint(
                dirpath=fold_dir / "checkpoints",
                filename="best",
                monitor=config.monitor,
                mode=config.monitor_mode,
                save_top_k=1,
            ),
            PredictionWriter(fold_dir),
        ]
        return super().instantiate_trainer(
            callbacks=callbacks,
            logger=CSVLogger(fold_dir, name="", version=""),
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )

    def run_cv(self) -> dict[str, Any]:
        """Run every fold of every repeat and write the summary.

        Returns:
            The summary written to ``cv_summary.json``.

        Raises:
            ConfigError: Bad CV options, a ``split`` column, or a non-empty ``--out``.
        """
        base = self.config
        out = Path(base.out).resolve()
        if base.repeats < 1 or base.patience < 0:
            raise ConfigError("--repeats must be >= 1 and --patience >= 0.")
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty; choose a new --out or delete it.")
        if not base.data.val_fraction > 0:
            raise ConfigError(
                "cv needs a validation part for early stopping: --data.val_fraction > 0."
            )
        fold_ids = self._fold_ids()
        runs = []
        start = time.perf_counter()
        for repeat in range(base.repeats):
            for position, fold in enumerate(fold_ids):
                seed = base.seed + repeat * len(fold_ids) + position
                runs.append(self._run_fold(base, repeat, fold, seed, out))
                metrics = runs[-1]["metrics"]
                shown = metrics.get("auroc", metrics.get("r2"))
                print(
                    f"cv: repeat {repeat} fold {fold}: {runs[-1]['epochs']} epoch(s), "
                    f"{runs[-1]['seconds']:.1f} s"
                    + (f", test {shown:.3f}" if shown is not None else "")
                )
        self.config = base
        summary = summarize(
            runs,
            folds=len(fold_ids),
            repeats=base.repeats,
            seed=base.seed,
            monitor=base.monitor,
            seconds=time.perf_counter() - start,
        )
        (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        table = format_table(summary)
        (out / SUMMARY_MD).write_text(table + "\n")
        print(table)
        print(
            f"cv: {len(runs)} run(s) in {summary['seconds']:.0f} s; summary in {out / SUMMARY_JSON}"
        )
        return summary

    def _fold_ids(self) -> list[int]:
        data = self.config.data
        if data.labels_csv is None:
            raise ConfigError("cv needs --data.labels_csv.")
        table = read_labels(data.labels_csv, target=data.target, task=data.task)
        if table.has_split:
            raise ConfigError(
                f"{table.path} has a split column (one fixed split); cross-validation needs "
                "folds: drop the column or use `milkit fit` and `milkit test`."
            )
        if table.has_fold:
            # read_labels gives every row a fold when the CSV has the column.
            return sorted({row.fold for row in table.rows if row.fold is not None})
        if self.config.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.config.folds}.")
        return list(range(self.config.folds))

    def _run_fold(self, base: Any, repeat: int, fold: int, seed: int, out: Path) -> dict[str, Any]:
        fold_dir = out / f"repeat{repeat}" / f"fold{fold}"
        config = base.clone()
        config.data.fold = fold
        config.data.n_folds = base.folds
        config.data.split_seed = base.seed + repeat
        config.data.predict_split = "test"
        config.trainer.default_root_dir = str(fold_dir)
        self.config = config
        start = time.perf_counter()
        seed_everything(seed, workers=True, verbose=False)
        MILCLI.instantiate_classes(self)
        model, data, trainer = self.model, self.datamodule, self.trainer
        trainer.fit(model, datamodule=data)
        best = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
        if not best:
            raise ConfigError(f"{fold_dir}: no checkpoint was saved; is {base.monitor} logged?")
        tested = trainer.test(
            model, datamodule=data, ckpt_path=best, weights_only=True, verbose=False
        )
        trainer.predict(
            model, datamodule=data, ckpt_path=best, weights_only=True, return_predictions=False
        )
        split = data.split
        return {
            "repeat": repeat,
            "fold": fold,
            "seed": seed,
            "dir": str(fold_dir.relative_to(out)),
            "best_checkpoint": str(Path(best).relative_to(out)),
            "epochs": trainer.current_epoch,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
            "seconds": round(time.perf_counter() - start, 2),
            "metrics": {
                key.removeprefix("test/"): _finite(value) for key, value in tested[0].items()
            },
        }


def summarize(runs: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Per-metric values over runs with mean, sample SD and SEM.

    Args:
        runs: One dict per run with a ``metrics`` mapping of name to value (None if undefined).
        **info: Extra top-level entries (folds, repeats, seed, ...).

    Returns:
        The summary (the ``cv_summary.json`` layout in this module's docstring).
    """
    names = sorted({name for run in runs for name in run["metrics"]})
    metrics = {}
    for name in names:
        values = [run["metrics"].get(name) for run in runs]
        finite = np.array([v for v in values if v is not None], dtype=np.float64)
        sd = float(finite.std(ddof=1)) if len(finite) > 1 else None
        metrics[name] = {
            "values": values,
            "mean": float(finite.mean()) if len(finite) else None,
            "sd": sd,
            "sem": sd / math.sqrt(len(finite)) if sd is not None else None,
            "n": int(len(finite)),
        }
    return {
        **info,
        "sd": "sample standard deviation (ddof=1)",
        "sem": "sd / sqrt(n)",
        "runs": runs,
        "metrics": metrics,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table: metric, mean ± SD, SEM, min, max, n.

    Args:
        summary: As returned by :func:`summarize`.

    Returns:
        The table text.
    """
    header = (
        f"{summary.get('folds')}-fold cross-validation x {summary.get('repeats')} repeat(s), "
        f"seed {summary.get('seed')}\n\n"
        "| metric | mean ± SD | SEM | min | max | n |\n|---|---|---|---|---|---|"
    )
    lines = [header]
    for name, stats in summary["metrics"].items():
        values = [v for v in stats["values"] if v is not None]
        if not values:
            lines.append(f"| {name} | - | - | - | - | 0 |")
            continue
        sd = f" ± {stats['sd']:.4f}" if stats["sd"] is not None else ""
        sem = f"{stats['sem']:.4f}" if stats["sem"] is not None else "-"
        lines.append(
            f"| {name} | {stats['mean']:.4f}{sd} | {sem} | {min(values):.4f} | "
            f"{max(values):.4f} | {stats['n']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of ``milkit cv ...``.

    Args:
        argv: The options after ``cv``.

    Returns:
        0 on success, 2 on a milkit error (message on stderr), else the parser's exit code.
    """
    try:
        with warnings.catch_warnings(), quiet_lightning():
            # Small cohorts trip Lightning's hints about workers and logging intervals per fold.
            warnings.filterwarnings("ignore", r".*does not have many workers.*")
            warnings.filterwarnings("ignore", r".*smaller than the logging interval.*")
            CVCLI(args=list(argv), run=False, **cli_kwargs("milkit cv")).run_cv()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except MilkitError as error:
        print(f"milkit cv: error: {error}", file=sys.stderr)
        return 2
    return 0


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Raise Lightning's loggers to WARNING for the duration (no per-fold banners)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
