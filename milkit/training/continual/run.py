"""``milkit continual``: train a MIL model on a sequence of tasks and measure what it forgets.

::

    milkit continual --config configs/continual/gdat_owlora.yaml \\
        --data.features_dir FEATURES --data.labels_csv labels.csv \\
        --strategy owlora --seed 0 --out runs/owlora

Every stage (one per task; one over all tasks for ``joint``) is a fresh Lightning fit with
early stopping on that stage's validation slides (``--monitor``, default ``val/loss``); the best
weights are kept. Then the tile-score threshold of each new task is chosen on its validation
slides (never on test; docs/papers.md E) and every task seen so far is evaluated on its test slides
(:mod:`milkit.training.continual.metrics`). Tasks, classes and splits:
:mod:`milkit.training.continual.tasks`; strategies: :mod:`milkit.training.continual.strategies`.
Any config value can be overridden (``--model.init_args.embed_dim 128``, ``--lora.rank 8``,
``--bppl.weight 1`` turns BPPL on); ``--print_config`` shows them all.

Run folder layout, resume and ``results.json``: :mod:`milkit.training.continual.results`.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from milkit.atomic import write_json_atomic
from milkit.errors import ConfigError, MilkitError
from milkit.models.contract import MultiTaskMILModel, require_mil_model, require_task_heads
from milkit.training.continual.baselines import (
    EWC,
    EWCOptions,
    LwF,
    LwFOptions,
    Replay,
    ReplayOptions,
)
from milkit.training.continual.bppl import BPPL
from milkit.training.continual.metrics import evaluate_stage
from milkit.training.continual.module import ContinualModule
from milkit.training.continual.results import (
    CONFIG_YAML,
    RESULTS_JSON,
    STAGE_MODEL,
    STAGE_RESULT,
    finished_stages,
    save_torch,
    stage_dir,
    stage_line,
    write_report,
)
from milkit.training.continual.strategies import (
    Finetune,
    Joint,
    LoRA,
    LoRAOptions,
    OWLoRA,
    StageContext,
    Strategy,
)
from milkit.training.continual.task_prior import TaskPrototypes, loader_descriptors
from milkit.training.continual.tasks import ContinualData, Item, load_task_sequence
from milkit.training.quiet import filter_noise, quiet_lightning

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Joint, Finetune, LoRA, OWLoRA, EWC, LwF, Replay)
}
_TRAINER_OWNED = {"callbacks", "logger", "default_root_dir", "enable_checkpointing"}


def build_parser() -> ArgumentParser:
    """The ``milkit continual`` parser (jsonargparse; every option also settable in YAML).

    Returns:
        The parser.
    """
    parser = ArgumentParser(
        prog="milkit continual",
        description="Continual MIL: train on a sequence of tasks, evaluate every seen task.",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s)")
    parser.add_argument(
        "--strategy", type=Literal[tuple(STRATEGIES)], default="owlora", help="continual strategy"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of stage k is seed + k")
    parser.add_argument("--out", type=str | None, default=None, help="run folder (RUN_DIR)")
    parser.add_argument("--monitor", default="val/loss", help="early stopping metric")
    parser.add_argument("--monitor_mode", type=Literal["min", "max"], default="min")
    parser.add_argument("--patience", type=int, default=10, help="epochs without progress")
    parser.add_argument(
        "--task_prior",
        type=Literal["prototypes", "none"],
        default="prototypes",
        help="class-incremental prediction: weigh each task's head by p(task | slide) from "
        "per-task prototypes of the input features (prototypes), or take the argmax of all "
        "heads' logits (none)",
    )
    parser.add_class_arguments(ContinualData, "data")
    parser.add_subclass_arguments(
        nn.Module,
        "model",
        skip={"in_dim", "n_classes_per_task"},
        instantiate=False,
        required=False,
        default={"class_path": "milkit.models.GDATMIL"},
    )
    parser.add_argument(
        "--optimizer",
        type=OptimizerCallable,
        default={"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-4}},
    )
    parser.add_class_arguments(Trainer, "trainer", skip=_TRAINER_OWNED, instantiate=False)
    parser.set_defaults(
        {
            "trainer.devices": 1,
            "trainer.max_epochs": 50,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "trainer.log_every_n_steps": 10,
        }
    )
    parser.add_class_arguments(LoRAOptions, "lora")
    parser.add_class_arguments(EWCOptions, "ewc")
    parser.add_class_arguments(LwFOptions, "lwf")
    parser.add_class_arguments(ReplayOptions, "replay")
    parser.add_argument("--bppl", type=BPPL | None, default=None, help="BPPL; null for off")
    return parser


def make_strategy(
    name: str,
    *,
    lora: LoRAOptions | None = None,
    ewc: EWCOptions | None = None,
    lwf: LwFOptions | None = None,
    replay: ReplayOptions | None = None,
) -> Strategy:
    """Build a strategy by name with its options.

    Args:
        name: One of :data:`STRATEGIES`.
        lora: Options of ``lora``/``owlora``.
        ewc: Options of ``ewc``.
        lwf: Options of ``lwf``.
        replay: Options of ``replay``.

    Returns:
        The strategy.

    Raises:
        ConfigError: Unknown name.
    """
    options: dict[str, Any] = {
        "lora": lora or LoRAOptions(),
        "owlora": lora or LoRAOptions(),
        "ewc": ewc or EWCOptions(),
        "lwf": lwf or LwFOptions(),
        "replay": replay or ReplayOptions(),
    }
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}.")
    # Strategies with options take them as their one argument, which type[Strategy] cannot say.
    cls: Callable[..., Strategy] = STRATEGIES[name]
    return cls(options[name]) if name in options else cls()


def build_model(config: Namespace, in_dim: int, n_classes_per_task: list[int]) -> nn.Module:
    """Instantiate the configured model with one head per task of the first stage.

    Args:
        config: ``class_path`` and ``init_args`` (without ``in_dim``/``n_classes_per_task``).
        in_dim: Feature length D.
        n_classes_per_task: Classes of each head to start with.

    Returns:
        The model.

    Raises:
        ConfigError: A model without per-task heads (:mod:`milkit.models.contract`).
    """
    module_name, _, class_name = config.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    require_task_heads(cls)
    init_args = config.init_args.as_dict() if config.get("init_args") else {}
    model = cls(in_dim=in_dim, n_classes_per_task=n_classes_per_task, **init_args)
    require_mil_model(model)
    return model


def run_continual(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """Run (or resume) a continual sequence and write ``RUN_DIR``.

    Args:
        parser: The parser that made ``config`` (to instantiate and dump it).
        config: The parsed configuration.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: No ``--out``, a ``RUN_DIR`` of another configuration, or bad options.
        LabelsError: Problems with the tasks (every one, before training).
    """
    if not config.out:
        raise ConfigError("set --out RUN_DIR, the folder of the run's results.")
    if str(config.trainer.devices) not in ("1", "[0]") or config.trainer.num_nodes != 1:
        raise ConfigError(
            f"continual runs train on one device (evaluation runs in this process); got "
            f"--trainer.devices {config.trainer.devices} --trainer.num_nodes "
            f"{config.trainer.num_nodes}. Set --trainer.devices 1."
        )
    out = Path(config.out)
    init = parser.instantiate(config)
    sequence = load_task_sequence(init.data)
    strategy = make_strategy(
        config.strategy, lora=init.lora, ewc=init.ewc, lwf=init.lwf, replay=init.replay
    )
    n_tasks = len(sequence.tasks)
    stages: list[tuple[int, ...]] = (
        [tuple(range(n_tasks))] if strategy.joint else [(t,) for t in range(n_tasks)]
    )
    contexts = [
        StageContext(k, tasks, sequence, init.data, config.seed + k)
        for k, tasks in enumerate(stages)
    ]
    dumped = yaml.safe_load(parser.dump(config, skip_none=False))
    done = finished_stages(out, contexts, {k: v for k, v in dumped.items() if k != "out"})
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_YAML).write_text(parser.dump(config, skip_none=False))
    seed_everything(config.seed, verbose=False)
    model = build_model(
        config.model, sequence.feature_dim, [sequence.tasks[t].n_classes for t in stages[0]]
    )
    prototypes = TaskPrototypes() if config.task_prior == "prototypes" else None
    results: list[dict[str, Any]] = []
    for context in contexts[:done]:
        strategy.grow(model, context)
        results.append(json.loads((stage_dir(out, context) / STAGE_RESULT).read_text()))
    if done:
        state = torch.load(stage_dir(out, contexts[done - 1]) / STAGE_MODEL, weights_only=True)
        model.load_state_dict(state["model"])
        strategy.load_state_dict(state["strategy"])
        if prototypes is not None:
            prototypes.load_state_dict(state["task_prototypes"])
        print(f"continual: resuming {out} after stage {done - 1} of {len(stages)}")
    summary = write_report(out, results, sequence, stages, config, dumped) if done else {}
    for context in contexts[done:]:
        results.append(
            _train_stage(model, strategy, prototypes, context, config, init, out, results)
        )
        print(stage_line(results[-1]))
        summary = write_report(out, results, sequence, stages, config, dumped)
    return summary


def _train_stage(
    model: nn.Module,
    strategy: Strategy,
    prototypes: TaskPrototypes | None,
    context: StageContext,
    config: Namespace,
    init: Namespace,
    out: Path,
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fit one stage, keep its best weights, evaluate, and save checkpoint and result.

    ``previous`` are the earlier stages' results: their tile thresholds and, as the reference
    of the logit drift, each task's own-head test logits right after it was learnt.
    ``prototypes`` (None: no task prior) get the stage's tasks' prototypes.
    """
    start = time.perf_counter()
    folder = stage_dir(out, context)
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished attempt starts over
    folder.mkdir(parents=True)
    seed_everything(context.seed, verbose=False)
    strategy.grow(model, context)
    strategy.start(model, context)
    sequence = context.sequence
    n_classes = sum(cast(MultiTaskMILModel, model).n_classes_per_task)
    if init.bppl is not None:
        init.bppl.reset()
    module = ContinualModule(
        model,
        strategy,
        torch.from_numpy(sequence.task_of_class[:n_classes]),
        torch.from_numpy(sequence.negative[:n_classes]),
        init.optimizer,
        init.bppl,
    )
    train_items = strategy.train_items(context)
    val_items = [item for task in context.tasks for item in sequence.items(task, "val")]
    trainer, best_score = _fit(module, context, config, folder, train_items, val_items)
    strategy.finish(module, context)
    if prototypes is not None:
        for task in context.tasks:
            loader = sequence.loader(
                sequence.items(task, "train"),
                batch_size=context.data.batch_size,
                num_workers=context.data.num_workers,
            )
            prototypes.add(task, loader_descriptors(loader))
    device = trainer.strategy.root_device
    thresholds, metrics, logits = evaluate_stage(
        model,
        context,
        device,
        previous_thresholds=previous[-1]["tile_thresholds"] if previous else {},
        reference_logits={  # stages run by milkit before logit drift existed have none
            name: np.asarray(logits)
            for result in previous
            for name, logits in result.get("task_logits", {}).items()
        },
        prototypes=prototypes,
    )
    model.cpu()
    state = {"model": model.state_dict(), "strategy": strategy.state_dict()}
    if prototypes is not None:
        state["task_prototypes"] = prototypes.state_dict()
    save_torch(folder / STAGE_MODEL, state)
    result_tasks = [sequence.tasks[t].name for t in context.tasks]
    result = {
        "stage": context.stage,
        "tasks": result_tasks,
        "epochs": trainer.current_epoch,
        "best_score": best_score,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "seconds": round(time.perf_counter() - start, 2),
        "tile_thresholds": thresholds,
        "metrics": metrics,
        "task_logits": {name: logits[name].tolist() for name in result_tasks},
    }
    write_json_atomic(folder / STAGE_RESULT, result)
    return result


def _fit(
    module: ContinualModule,
    context: StageContext,
    config: Namespace,
    folder: Path,
    train_items: list[Item],
    val_items: list[Item],
) -> tuple[Trainer, float]:
    """A fresh Lightning fit with early stopping; the module ends with its best weights.

    Returns:
        The trainer and the best value of ``--monitor``.

    Raises:
        ConfigError: No checkpoint was saved (the monitored metric is not logged).
    """
    data = context.data
    checkpoint = ModelCheckpoint(
        dirpath=folder / "lightning",
        filename="best",
        monitor=config.monitor,
        mode=config.monitor_mode,
        save_top_k=1,
        save_weights_only=True,
    )
    stopping = EarlyStopping(
        monitor=config.monitor, mode=config.monitor_mode, patience=config.patience
    )
    trainer = Trainer(
        **config.trainer.as_dict(),
        callbacks=[stopping, checkpoint],
        logger=CSVLogger(folder, name="", version=""),
        default_root_dir=folder,
        enable_checkpointing=True,
    )
    loader = context.sequence.loader
    trainer.fit(
        module,
        loader(
            train_items,
            batch_size=data.batch_size,
            training=True,
            max_tiles=data.max_tiles,
            num_workers=data.num_workers,
        ),
        loader(val_items, batch_size=data.batch_size, num_workers=data.num_workers),
    )
    if not checkpoint.best_model_path:
        raise ConfigError(f"{folder}: no checkpoint was saved; is {config.monitor} logged?")
    best = torch.load(checkpoint.best_model_path, weights_only=True, map_location="cpu")
    module.load_state_dict(best["state_dict"])
    shutil.rmtree(folder / "lightning")
    return trainer, float(checkpoint.best_model_score)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    """Entry point of ``milkit continual ...``.

    Args:
        argv: The options after ``continual``.

    Returns:
        0 on success, 2 on a milkit error (message on stderr), else the parser's exit code
        (``--help`` and ``--print_config`` exit 0).
    """
    parser = build_parser()
    try:
        config = parser.parse_args(list(argv))
        with warnings.catch_warnings(), quiet_lightning():
            filter_noise()
            summary = run_continual(parser, config)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except MilkitError as error:
        print(f"milkit continual: error: {error}", file=sys.stderr)
        return 2
    average, bwt = summary["average_accuracy"], summary["bwt"]
    print(
        f"continual: {summary['strategy']} on {len(summary['tasks'])} task(s): average "
        f"accuracy {average:.3f}, BWT {'n/a' if bwt is None else f'{bwt:+.3f}'} "
        f"(task-incremental {summary['task_average_accuracy']:.3f}); results in "
        f"{Path(config.out) / RESULTS_JSON}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
