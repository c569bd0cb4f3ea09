"""``milkit cv``: K-fold cross-validation, repeated R times, with one summary of every metric.

Each (repeat r, fold k) trains on the other K - 1 folds for the configured number of epochs
and tests the final model on the held-out fold (the default recipe decays the learning rate
to 0, so the final model is the one to use: configs/trainer/cpu.yaml says why). With
``--monitor val/loss`` (or another validation metric) a validation part is carved out of the
training folds instead, the best epoch by it is tested, and ``--patience N`` adds early
stopping. Folds come from the labels CSV's ``fold`` column when it has one (then every repeat
reuses them), else from patient-grouped folds stratified by label, seeded with ``seed + r``.
Each run is seeded with ``seed + r·K + k``, so the whole CV is deterministic.

Small cohorts run fast: the bags are read once per CV run and kept in memory when they fit
(``--data.in_memory``), and small bags train with one intra-op thread
(:mod:`milkit.training.threads`). The configuration is parsed by the same LightningCLI parser
as ``milkit fit`` (``--config``, group files, any ``--model.*``/``--data.*``/``--trainer.*``
override).

An interrupted CV resumes: rerunning the same command (same options, config files and labels
CSV; ``--jobs`` may differ) in the same ``--out`` keeps every finished run and redoes the rest;
another configuration in that folder is refused. A run is finished when its ``result.json``
exists (written atomically as its last step).

Output under ``--out``::

    cv_config.json               the configuration's hash (what a rerun must match)
    repeat{r}/fold{k}/           config.yaml, metrics.csv, checkpoints/final.ckpt (best.ckpt
                                 with --monitor), predictions/<slide_id>.h5, predictions.csv,
                                 result.json (the run's entry of "runs" below)
    cv_summary.json              see below
    cv_summary.md                the table printed at the end

``cv_summary.json``::

    {"folds": K, "repeats": R, "seed": S, "monitor": null, "seconds": 93.1,
     "left_out": [{"slide_id": "glass_only", "line": 7}],
     "left_out_note": "left out 1 slide(s) of labels.csv without tiles ...",
     "sd": "sample standard deviation (ddof=1)", "sem": "sd / sqrt(n)",
     "runs": [{"repeat": 0, "fold": 0, "seed": 0, "dir": "repeat0/fold0",
               "checkpoint": "repeat0/fold0/checkpoints/final.ckpt", "epochs": 20,
               "n_train": 80, "n_val": 0, "n_test": 20, "seconds": 1.2,
               "metrics": {"auroc": 0.97, "accuracy": 0.9, ...}}, ...],
     "metrics": {"auroc": {"values": [...], "mean": 0.96, "sd": 0.02, "sem": 0.006,
                           "n": 10}, ...}}

Metric names are the test metrics without the ``test/`` prefix; non-finite values are null.
Slides without tiles are left out of every fold (``left_out``, with the labels CSV's line;
``left_out_note`` only when there are some); ``--data.strict true`` refuses them instead.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger

from milkit.atomic import atomic_write
from milkit.data.bags import BAG_MEMORY
from milkit.data.cohort import Cohort
from milkit.data.datamodule import MILDataModule, cohort_bytes
from milkit.data.labels import read_labels
from milkit.errors import ConfigError, MilkitError
from milkit.training.callbacks import PredictionWriter
from milkit.training.cli import (
    MILCLI,
    cli_kwargs,
    configuration_id,
    record_configuration,
    recorded_configuration,
)
from milkit.training.quiet import filter_noise, quiet_lightning
from milkit.training.threads import free_cores, intra_op_threads, small_bags, threads_for_bags

SUMMARY_JSON = "cv_summary.json"
SUMMARY_MD = "cv_summary.md"
#: The CV's configuration hash, written first: a rerun with the same one resumes the folder.
CONFIG_JSON = "cv_config.json"
#: A finished run's entry of ``runs``, in its folder.
RESULT_JSON = "result.json"
_REPLACED_CALLBACKS = (EarlyStopping, ModelCheckpoint, PredictionWriter)


class CVCLI(MILCLI):
    """The ``milkit fit`` parser plus the CV options; classes are instantiated per fold.

    Attributes:
        argv: The options it was built from (set by :func:`main`); worker processes rebuild
            the CLI from them. None: runs stay in this process.
    """

    argv: list[str] | None = None
    _checked_cohort: Cohort | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--folds --repeats --seed --out --monitor --monitor_mode --jobs --patience``."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--folds", type=int, default=5, help="number of folds K")
        parser.add_argument("--repeats", type=int, default=1, help="repeats R of the K folds")
        parser.add_argument("--seed", type=int, default=0, help="seed of splits and training")
        parser.add_argument("--out", type=Path, required=True, help="run folder (new or empty)")
        parser.add_argument(
            "--monitor",
            type=str | None,
            default=None,
            help="validation metric whose best epoch is tested (e.g. val/loss; needs "
            "--data.val_fraction > 0); default: test the final model, no validation part",
        )
        parser.add_argument(
            "--monitor_mode", type=Literal["min", "max"], default="min", help="min or max"
        )
        parser.add_argument(
            "--jobs",
            type=int | None,
            default=None,
            help="folds trained at once, each in its own process; default: one per free core "
            "when small bags train on the CPU (one thread each) and the cohort fits in memory "
            "that many times, else 1",
        )
        parser.add_argument(
            "--patience",
            type=int | None,
            default=None,
            help="with --monitor: stop after this many epochs without progress",
        )

    def instantiate_classes(self) -> None:
        """Nothing at start-up: :meth:`run_cv` instantiates fresh classes for every fold."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """A quiet per-fold trainer: CSV logs, predictions, and with ``--monitor`` the best
        checkpoint (and early stopping with ``--patience``)."""
        config = self.config
        fold_dir = Path(config.trainer.default_root_dir)
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = [c for c in configured if not isinstance(c, _REPLACED_CALLBACKS)]
        monitor = config.monitor
        if monitor is not None and config.patience is not None:
            callbacks.append(
                EarlyStopping(monitor=monitor, mode=config.monitor_mode, patience=config.patience)
            )
        if monitor is not None:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=fold_dir / "checkpoints",
                    filename="best",
                    monitor=monitor,
                    mode=config.monitor_mode,
                    save_top_k=1,
                )
            )
        callbacks.append(PredictionWriter(fold_dir))
        return super().instantiate_trainer(
            callbacks=callbacks,
            logger=CSVLogger(fold_dir, name="", version=""),
            enable_checkpointing=monitor is not None,  # else one final checkpoint, _run_fold
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
        if base.repeats < 1 or (base.patience is not None and base.patience < 0):
            raise ConfigError("--repeats must be >= 1 and --patience >= 0.")
        if base.patience is not None and base.monitor is None:
            raise ConfigError("--patience stops on a validation metric: give --monitor too.")
        finished = self._resume_state(out)
        if base.monitor is not None and not base.data.val_fraction > 0:
            raise ConfigError(
                f"--monitor {base.monitor} needs a validation part: --data.val_fraction > 0."
            )
        fold_ids = self._fold_ids()
        cohort = self._cohort()
        left_out = cohort.left_out_line()
        for note in cohort.notes():
            print(f"cv: {note}")
        if base.monitor is None:
            print(
                f"cv: each fold trains {base.trainer.max_epochs} epochs on all its training "
                "slides and tests the final model (--monitor val/loss: the best epoch on a "
                "validation part instead)"
            )
        plan = [
            (repeat, fold, base.seed + repeat * len(fold_ids) + position)
            for repeat in range(base.repeats)
            for position, fold in enumerate(fold_ids)
        ]
        done = {key: finished[key] for key in ((r, k) for r, k, _ in plan) if key in finished}
        if done:
            print(f"cv: resuming in {out}: {len(done)} of {len(plan)} runs are done")
        todo = [(r, k, seed) for r, k, seed in plan if (r, k) not in done]
        for repeat, fold, _ in todo:  # what an interrupted run left of these is redone
            shutil.rmtree(out / f"repeat{repeat}" / f"fold{fold}", ignore_errors=True)
        jobs = self._jobs(len(todo)) if todo else 1
        start = time.perf_counter()
        if jobs == 1:
            new_runs = []
            with intra_op_threads(None) as set_threads:
                for repeat, fold, seed in todo:
                    new_runs.append(self._run_fold(base, repeat, fold, seed, out, set_threads))
                    _save_run(out, new_runs[-1])
                    print(f"cv: repeat {repeat} fold {fold}: {_progress(new_runs[-1])}")
        else:
            new_runs = self._run_in_processes(todo, jobs, out)
        by_key = {**done, **{(run["repeat"], run["fold"]): run for run in new_runs}}
        runs = [by_key[(repeat, fold)] for repeat, fold, _ in plan]
        summary = summarize(
            runs,
            folds=len(fold_ids),
            repeats=base.repeats,
            seed=base.seed,
            monitor=base.monitor,
            seconds=time.perf_counter() - start,
            left_out=[{"slide_id": row.slide_id, "line": row.line} for row in cohort.left_out],
            **({"left_out_note": left_out} if left_out is not None else {}),
        )
        (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        table = format_table(summary)
        (out / SUMMARY_MD).write_text(table + "\n")
        print(table)
        print(
            f"cv: {len(runs)} run(s) in {summary['seconds']:.0f} s; summary in {out / SUMMARY_JSON}"
        )
        return summary

    def _jobs(self, n_runs: int) -> int:
        """``--jobs``, or the default: one process per free core when bags are small and on
        the CPU and the cohort fits in memory once per process; never more than the runs."""
        base = self.config
        if base.jobs is not None and base.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {base.jobs}.")
        if self.argv is None:  # built from Python without an argv: processes cannot rebuild it
            return 1
        if base.jobs is not None:
            return min(base.jobs, n_runs)
        if base.trainer.accelerator not in ("cpu", "auto") or torch.cuda.is_available():
            return 1
        cohort = self._cohort()
        if not small_bags(cohort.bags):
            return 1
        jobs = min(free_cores(), n_runs)
        while jobs > 1 and cohort_bytes(cohort) * jobs > BAG_MEMORY.max_bytes:
            jobs -= 1
        return jobs

    def _cohort(self) -> Cohort:
        """The cohort as every fold reads it (checked once here, before any fold)."""
        if self._checked_cohort is None:
            data = self.config.data.as_dict()
            init_args = {k: v for k, v in data.items() if not k.startswith("__")}
            self._checked_cohort = MILDataModule(**init_args).cohort
        return self._checked_cohort

    def _resume_state(self, out: Path) -> dict[tuple[int, int], dict[str, Any]]:
        """Check ``--out`` and return the runs already finished there, by (repeat, fold).

        A new or empty folder starts a CV; a folder of a CV with the same configuration
        resumes it (its finished runs are kept); anything else is refused.
        """
        marker = out / CONFIG_JSON
        config_id = configuration_id(self.config, leave_out=("out", "jobs"))
        if out.exists() and any(out.iterdir()):
            if not marker.is_file():
                raise ConfigError(f"{out} is not empty; choose a new --out or delete it.")
            if recorded_configuration(marker) != config_id:
                raise ConfigError(
                    f"{out} holds a cross-validation with another configuration (options, "
                    "config files or labels differ); choose a new --out, or delete it to start "
                    "over."
                )
        else:
            record_configuration(marker, config_id)
        finished = {}
        for path in out.glob(f"repeat*/fold*/{RESULT_JSON}"):
            run = json.loads(path.read_text())
            finished[(run["repeat"], run["fold"])] = run
        return finished

    def _run_in_processes(
        self, plan: list[tuple[int, int, int]], jobs: int, out: Path
    ) -> list[dict[str, Any]]:
        """Train the planned runs in ``jobs`` fresh processes (one thread each); each rebuilds
        this CLI from the same argv, so a run is what it would be in this process."""
        print(f"cv: {len(plan)} runs in {jobs} processes")
        argv: list[str] = self.argv or []
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_start_worker, initargs=(argv,)
        ) as pool:
            futures = {pool.submit(_worker_run, *run): run for run in plan}
            runs = []
            for future in as_completed(futures):
                try:
                    runs.append(future.result())
                except BrokenProcessPool as error:
                    raise ConfigError(
                        "cv's worker processes died before finishing a fold (out of memory, or "
                        "a script that calls milkit.training.cv.main without an `if __name__ == "
                        '"__main__":` guard, which every process re-runs); run with --jobs 1.'
                    ) from error
                _save_run(out, runs[-1])
                repeat, fold, _ = futures[future]
                print(f"cv: repeat {repeat} fold {fold}: {_progress(runs[-1])}")
        order = {(repeat, fold): i for i, (repeat, fold, _) in enumerate(plan)}
        return sorted(runs, key=lambda run: order[(run["repeat"], run["fold"])])

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

    def _run_fold(
        self,
        base: Any,
        repeat: int,
        fold: int,
        seed: int,
        out: Path,
        set_threads: Callable[[int | None], None],
    ) -> dict[str, Any]:
        fold_dir = out / f"repeat{repeat}" / f"fold{fold}"
        config = base.clone()
        config.data.fold = fold
        config.data.n_folds = base.folds
        config.data.split_seed = base.seed + repeat
        config.data.predict_split = "test"
        if base.monitor is None:
            config.data.val_fraction = 0.0  # nothing selects on it: train on every slide
        config.trainer.default_root_dir = str(fold_dir)
        start = time.perf_counter()
        seed_everything(seed, workers=True, verbose=False)
        self.config = config  # what instantiate_classes reads; base again for the next fold
        try:
            MILCLI.instantiate_classes(self)
        finally:
            self.config = base
        model, data, trainer = self.model, self.datamodule, self.trainer
        set_threads(threads_for_bags(data, trainer))
        trainer.fit(model, datamodule=data)
        if base.monitor is None:
            checkpoint = fold_dir / "checkpoints" / "final.ckpt"
            save_checkpoint(trainer, checkpoint)
            tested = trainer.test(model, datamodule=data, verbose=False)
            trainer.predict(model, datamodule=data, return_predictions=False)
        else:
            best = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
            if not best:
                raise ConfigError(f"{fold_dir}: no checkpoint was saved; is {base.monitor} logged?")
            checkpoint = Path(best)
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
            "checkpoint": str(checkpoint.relative_to(out)),
            "epochs": trainer.current_epoch,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
            "seconds": round(time.perf_counter() - start, 2),
            "metrics": {
                key.removeprefix("test/"): _finite(value) for key, value in tested[0].items()
            },
        }


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Write the trainer's model (weights and milkit's record, no optimiser state) atomically."""
    with atomic_write(path) as tmp:
        trainer.save_checkpoint(tmp, weights_only=True)


def _progress(run: dict[str, Any]) -> str:
    """One run's progress line: epochs, seconds and its headline test metric, named."""
    metrics = run["metrics"]
    name = next((n for n in ("auroc", "r2", "accuracy") if metrics.get(n) is not None), None)
    shown = f", test {name} {metrics[name]:.3f}" if name else ""
    return f"{run['epochs']} epoch(s), {run['seconds']:.1f} s{shown}"


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
    lines = [f"{summary['left_out_note']}\n"] if summary.get("left_out_note") else []
    lines.append(header)
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
            filter_noise()
            cli = CVCLI(args=list(argv), run=False, **cli_kwargs("milkit cv"))
            cli.argv = list(argv)
            cli.run_cv()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except MilkitError as error:
        print(f"milkit cv: error: {error}", file=sys.stderr)
        return 2
    return 0


#: The CLI a worker process of :meth:`CVCLI._run_in_processes` rebuilt from the argv.
_WORKER: CVCLI | None = None


def _start_worker(argv: list[str]) -> None:
    """Worker start-up: one intra-op thread per process (the workers share the cores), the
    noise filtered as in :func:`main`, the CLI rebuilt."""
    global _WORKER
    torch.set_num_threads(1)
    filter_noise()
    _WORKER = CVCLI(args=argv, run=False, **cli_kwargs("milkit cv"))


def _worker_run(repeat: int, fold: int, seed: int) -> dict[str, Any]:
    """One run of the plan, in a worker process."""
    assert _WORKER is not None, "worker used before _start_worker"
    base = _WORKER.config
    with quiet_lightning(), intra_op_threads(None) as set_threads:
        return _WORKER._run_fold(base, repeat, fold, seed, Path(base.out).resolve(), set_threads)


def _save_run(out: Path, run: dict[str, Any]) -> None:
    """Write a finished run's result into its folder, atomically: the run is done."""
    with atomic_write(out / run["dir"] / RESULT_JSON) as tmp:
        tmp.write_text(json.dumps(run, indent=2) + "\n")


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
