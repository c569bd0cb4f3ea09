"""The run folder of ``milkit continual``: layout, resume, ``results.json`` and the plot.

``RUN_DIR`` (``--out``)::

    config.yaml                      the full configuration (rerun with --config)
    stage{k}_{task}/model.pt         weights + strategy state after stage k (weights_only load)
    stage{k}_{task}/result.json      the stage's metrics; written last: marks it finished
    stage{k}_{task}/metrics.csv      Lightning's training log
    results.json                     everything below, rewritten after every stage
    accuracy_matrix.png              class- and task-incremental accuracy matrices

Rerunning with the same ``--out`` and configuration continues after the last finished stage
(an unfinished stage is trained again from its start); another configuration is refused.

``results.json``: ``strategy``, ``seed``, ``tasks``, ``stages`` (task names per stage),
``class_names``, ``finished``, ``config``; matrices ``R[t][j]`` (after stage t, on task j; null
for tasks not seen yet) ``accuracy_matrix`` (class-incremental), ``head_accuracy_matrix``
(argmax of the concatenated heads, no task prior), ``task_id_accuracy_matrix`` (task prototypes
name the task), ``task_accuracy_matrix``,
``task_auroc_matrix``, ``tile_auroc_matrix``, ``tile_dice_matrix``, ``logit_drift_matrix``
(``‖L − L₀‖ / ‖L₀‖`` of the task head's test logits against those right after the task was
learnt); summaries ``average_accuracy``, ``bwt``, ``task_average_accuracy``, ``task_bwt`` (BWT
null for ``joint``: one stage has nothing to forget), ``tile_auroc``/``tile_dice`` (per task,
last stage), ``average_tile_auroc``, ``average_tile_dice``, ``earlier_tile_auroc`` (tile
AUROC at the end, mean over the tasks learnt before the last stage), ``head_average_accuracy``,
``task_id_accuracy`` (last-row means), ``logit_drift`` (mean over the
tasks learnt before the last stage; 0 when their outputs did not move), ``tile_thresholds``
(per task, chosen on validation) and ``stage_info`` (epochs, seconds, slide counts per stage).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import Namespace

import milkit
from milkit.atomic import atomic_write, write_json_atomic
from milkit.errors import ConfigError
from milkit.training.continual.metrics import average_and_bwt, plot_accuracy_matrices
from milkit.training.continual.strategies import StageContext
from milkit.training.continual.tasks import TaskSequence

RESULTS_JSON = "results.json"
PLOT_PNG = "accuracy_matrix.png"
CONFIG_YAML = "config.yaml"
STAGE_RESULT = "result.json"
STAGE_MODEL = "model.pt"
METRICS = (
    "accuracy",
    "head_accuracy",
    "task_id_accuracy",
    "task_accuracy",
    "task_auroc",
    "tile_auroc",
    "tile_dice",
    "logit_drift",
)


def finished_stages(out: Path, contexts: list[StageContext], dumped: dict[str, Any]) -> int:
    """How many leading stages ``out`` holds finished, after checking it is this run's folder.

    Args:
        out: ``RUN_DIR``.
        contexts: All stages of the run.
        dumped: The run's configuration as plain data, without ``out``.

    Returns:
        The number of finished stages at the start of the sequence.

    Raises:
        ConfigError: ``out`` holds finished stages of another configuration.
    """
    done = 0
    for context in contexts:
        folder = stage_dir(out, context)
        if not ((folder / STAGE_RESULT).is_file() and (folder / STAGE_MODEL).is_file()):
            break
        done += 1
    if done:
        saved_path = out / CONFIG_YAML
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
        if saved is not None:
            saved.pop("out", None)
        if saved != dumped:
            differences = sorted(
                key
                for key in set(saved or {}) | set(dumped)
                if (saved or {}).get(key) != dumped.get(key)
            )
            raise ConfigError(
                f"{out} holds {done} finished stage(s) of a run with another configuration "
                f"(differs in: {', '.join(differences) or 'the saved config is missing'}); "
                "rerun with the same configuration to resume, or choose a new --out."
            )
    return done


def stage_dir(out: Path, context: StageContext) -> Path:
    """``RUN_DIR/stage{k}_{task}`` (``joint`` for a stage of several tasks).

    Args:
        out: ``RUN_DIR``.
        context: The stage.

    Returns:
        The stage's folder.
    """
    tasks = context.tasks
    name = "joint" if len(tasks) > 1 else context.sequence.tasks[tasks[0]].name
    return out / f"stage{context.stage}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"


def write_report(
    out: Path,
    results: list[dict[str, Any]],
    sequence: TaskSequence,
    stages: list[tuple[int, ...]],
    config: Namespace,
    dumped: dict[str, Any],
) -> dict[str, Any]:
    """Write ``results.json`` and the plot for the stages finished so far.

    Args:
        out: ``RUN_DIR``.
        results: The finished stages' ``result.json`` contents, in order.
        sequence: The tasks.
        stages: Task indices of every stage of the run.
        config: The parsed configuration (``strategy``, ``seed``).
        dumped: The configuration as plain data (recorded in the results).

    Returns:
        The content of ``results.json``.
    """
    summary = summarize_run(results, sequence, stages, config, dumped)
    write_json_atomic(out / RESULTS_JSON, summary)
    plot_accuracy_matrices(
        {
            "class-incremental accuracy": summary["accuracy_matrix"],
            "task-incremental accuracy": summary["task_accuracy_matrix"],
        },
        sequence.names,
        ["+".join(names) for names in summary["stages"]],
        out / PLOT_PNG,
        f"{config.strategy}, seed {config.seed}",
    )
    return summary


def summarize_run(
    results: list[dict[str, Any]],
    sequence: TaskSequence,
    stages: list[tuple[int, ...]],
    config: Namespace,
    dumped: dict[str, Any],
) -> dict[str, Any]:
    """``results.json`` from the finished stages' results (module docstring).

    Args:
        results: The finished stages' results, in order.
        sequence: The tasks.
        stages: Task indices of every stage of the run.
        config: The parsed configuration (``strategy``, ``seed``).
        dumped: The configuration as plain data.

    Returns:
        The results.
    """
    names = sequence.names
    matrices = {
        metric: [
            [result["metrics"].get(name, {}).get(metric) for name in names] for result in results
        ]
        for metric in METRICS
    }
    average, bwt = average_and_bwt(matrices["accuracy"])
    task_average, task_bwt = average_and_bwt(matrices["task_accuracy"])
    tile_auroc = matrices["tile_auroc"][-1]
    tile_dice = matrices["tile_dice"][-1]
    # Tasks learnt before the last stage; logit drift 0 means their outputs did not move.
    earlier = [name for result in results[:-1] for name in result["tasks"]]

    def last_row_mean(metric: str, tasks: list[str]) -> float | None:
        return _mean([matrices[metric][-1][names.index(name)] for name in tasks])

    return {
        "milkit_version": milkit.__version__,
        "strategy": config.strategy,
        "seed": config.seed,
        "tasks": names,
        "stages": [[names[t] for t in stage] for stage in stages[: len(results)]],
        "class_names": sequence.class_names,
        "finished": len(results) == len(stages),
        "accuracy_matrix": matrices["accuracy"],
        "head_accuracy_matrix": matrices["head_accuracy"],
        "task_id_accuracy_matrix": matrices["task_id_accuracy"],
        "task_accuracy_matrix": matrices["task_accuracy"],
        "task_auroc_matrix": matrices["task_auroc"],
        "tile_auroc_matrix": matrices["tile_auroc"],
        "tile_dice_matrix": matrices["tile_dice"],
        "logit_drift_matrix": matrices["logit_drift"],
        "average_accuracy": average,
        "bwt": bwt,
        "task_average_accuracy": task_average,
        "task_bwt": task_bwt,
        "tile_auroc": tile_auroc,
        "tile_dice": tile_dice,
        "average_tile_auroc": _mean(tile_auroc),
        "average_tile_dice": _mean(tile_dice),
        "earlier_tile_auroc": last_row_mean("tile_auroc", earlier),
        "head_average_accuracy": _mean(matrices["head_accuracy"][-1]),
        "task_id_accuracy": _mean(matrices["task_id_accuracy"][-1]),
        "logit_drift": last_row_mean("logit_drift", earlier),
        "tile_thresholds": results[-1]["tile_thresholds"],
        "stage_info": [
            {key: result[key] for key in ("tasks", "epochs", "n_train", "n_val", "seconds")}
            for result in results
        ],
        "config": dumped,
    }


def stage_line(result: dict[str, Any]) -> str:
    """One printed line about a finished stage: epochs, time, accuracies per seen task."""
    row = ", ".join(
        f"{name} {values['task_accuracy']:.3f}/{values['accuracy']:.3f}"
        for name, values in result["metrics"].items()
    )
    return (
        f"continual: stage {result['stage']} ({'+'.join(result['tasks'])}): "
        f"{result['epochs']} epoch(s), {result['seconds']:.1f} s; task/class-incremental "
        f"accuracy: {row}"
    )


def save_torch(path: Path, content: dict[str, Any]) -> None:
    """``torch.save`` atomically (:func:`milkit.atomic.atomic_write`)."""
    with atomic_write(path) as tmp:
        torch.save(content, tmp)


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None
