"""Continual strategies, metrics and configs, each on its own (no full runs)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from milkit.errors import ConfigError, FeatureFileError
from milkit.models.gdat import GDATMIL
from milkit.synth.continual_features import write_feature_tasks
from milkit.training.continual.baselines import (
    EWC,
    EWCOptions,
    LwF,
    LwFOptions,
    Replay,
    ReplayOptions,
)
from milkit.training.continual.metrics import (
    BagPredictions,
    average_and_bwt,
    best_threshold,
    dice,
    read_tile_labels,
    task_metrics,
    tile_scores,
)
from milkit.training.continual.module import ContinualModule
from milkit.training.continual.run import make_strategy
from milkit.training.continual.strategies import LoRAOptions, StageContext, Strategy
from milkit.training.continual.task_prior import TaskPrototypes
from milkit.training.continual.tasks import ContinualData, TaskSequence, load_task_sequence


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> TaskSequence:
    tasks = write_feature_tasks(
        tmp_path_factory.mktemp("tasks"), n_tasks=2, parts=(6, 4, 4), n_tiles=(6, 10), feature_dim=8
    )
    return load_task_sequence(ContinualData(str(tasks.features_dir), str(tasks.labels_csv)))


def small_gdat(sequence: TaskSequence) -> GDATMIL:
    torch.manual_seed(0)
    return GDATMIL(8, [2], embed_dim=16, n_blocks=1, n_heads=2, n_groups=4, attention_dim=8)


def context(sequence: TaskSequence, stage: int) -> StageContext:
    return StageContext(stage, (stage,), sequence, ContinualData(), seed=0)


def module_for(model: GDATMIL, strategy: Strategy, sequence: TaskSequence) -> ContinualModule:
    n_classes = sum(model.n_classes_per_task)
    return ContinualModule(
        model,
        strategy,
        torch.from_numpy(sequence.task_of_class[:n_classes]),
        torch.from_numpy(sequence.negative[:n_classes]),
        partial(torch.optim.Adam, lr=1e-3),
    )


def first_batch(sequence: TaskSequence, task: int = 1) -> Any:
    return next(iter(sequence.loader(sequence.items(task, "train"), batch_size=3)))


def test_lora_trains_only_the_newest_adapters_and_heads(sequence: TaskSequence) -> None:
    model = small_gdat(sequence)
    strategy = make_strategy("lora", lora=LoRAOptions(rank=2))
    for stage in (0, 1):
        strategy.grow(model, context(sequence, stage))
        strategy.start(model, context(sequence, stage))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if stage == 0:
            assert trainable == {name for name, _ in model.named_parameters()}
    assert model.n_tasks == 2
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if name.startswith("heads.1.") or name.rsplit(".", 1)[-1] == "0" and "lora_" in name
    }
    assert not any("norm" in name for name in trainable)  # LayerNorms stay frozen


def test_lora_trains_the_new_tasks_pooling_when_it_has_one(sequence: TaskSequence) -> None:
    torch.manual_seed(0)
    model = GDATMIL(8, [2], embed_dim=16, n_blocks=1, n_heads=2, n_groups=4, attention_dim=8,
                    attention_per_task=True)  # fmt: skip
    strategy = make_strategy("lora", lora=LoRAOptions(rank=2))
    for stage in (0, 1):
        strategy.grow(model, context(sequence, stage))
        strategy.start(model, context(sequence, stage))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"task_poolings.0.score.weight", "heads.1.weight"} <= trainable
    assert not any(name.startswith(("pooling.", "heads.0")) for name in trainable)
    assert not any(name.startswith("pooling") and "lora_" in name for name, _ in
                   model.named_parameters())  # fmt: skip


def test_owlora_penalises_and_projects_only_after_the_first_task(sequence: TaskSequence) -> None:
    model = small_gdat(sequence)
    strategy = make_strategy("owlora", lora=LoRAOptions(rank=2, energy=0.5))
    module = module_for(model, strategy, sequence)
    batch = first_batch(sequence, 0)
    strategy.grow(model, context(sequence, 0))
    strategy.start(model, context(sequence, 0))
    assert strategy.penalty(module, batch, module(batch)) is None
    strategy.grow(model, context(sequence, 1))
    strategy.start(model, context(sequence, 1))
    module = module_for(model, strategy, sequence)
    penalty = strategy.penalty(module, batch, module(batch))
    assert penalty is not None and penalty.item() > 0
    layer = model.embed[0]
    with torch.no_grad():
        layer.lora_A[0].normal_()
    strategy.after_step(model)  # the newest A is projected off W0's protected input subspace
    basis_in, _ = layer.protected_subspaces()
    assert torch.allclose(layer.lora_A[0] @ basis_in, torch.zeros(2, basis_in.shape[1]), atol=1e-5)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(sequence: TaskSequence) -> None:
    model = small_gdat(sequence)
    strategy = EWC(EWCOptions(weight=10.0))
    module = module_for(model, strategy, sequence)
    batch = first_batch(sequence, 0)
    assert strategy.penalty(module, batch, module(batch)) is None  # nothing learnt yet
    strategy.finish(module, context(sequence, 0))
    assert set(strategy.fisher) == {name for name, _ in model.named_parameters()}
    assert sum(f.sum() for f in strategy.fisher.values()) > 0
    assert strategy.penalty(module, batch, module(batch)).item() == 0.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1)
    assert strategy.penalty(module, batch, module(batch)).item() > 0
    restored = EWC(EWCOptions())
    restored.load_state_dict(strategy.state_dict())
    assert all(torch.equal(restored.fisher[k], v) for k, v in strategy.fisher.items())


def test_lwf_penalty_is_zero_while_the_model_equals_its_teacher(sequence: TaskSequence) -> None:
    model = small_gdat(sequence)
    strategy = LwF(LwFOptions(weight=1.0, temperature=2.0))
    strategy.grow(model, context(sequence, 1))
    strategy.start(model, context(sequence, 1))
    module = module_for(model, strategy, sequence)
    batch = first_batch(sequence)
    assert strategy.old_slices == [slice(0, 2)]
    model.eval()  # no dropout: the student is then exactly the (eval-mode) teacher
    assert strategy.penalty(module, batch, module(batch)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        # the bias shifts the old head's class balance; a constant added to a weight row would
        # not (the pooled token is layer-normed: its features sum to zero)
        model.heads[0].bias[0].add_(1.0)
    assert strategy.penalty(module, batch, module(batch)).item() > 0
    with pytest.raises(ConfigError, match="temperature"):
        LwF(LwFOptions(temperature=0.0))


def test_replay_keeps_a_class_balanced_memory(sequence: TaskSequence) -> None:
    strategy = Replay(ReplayOptions(per_task=4))
    model = small_gdat(sequence)
    strategy.finish(module_for(model, strategy, sequence), context(sequence, 0))
    assert len(strategy.memory) == 4 and all(task == 0 for task, _ in strategy.memory)
    rows = [row for _, row in strategy.memory]
    assert set(rows) <= set(sequence.tasks[0].split.train.tolist())
    assert sorted(sequence.tasks[0].targets[rows].tolist()) == [0, 0, 1, 1]
    items = strategy.train_items(context(sequence, 1))
    assert items[-4:] == strategy.memory and len(items) == 6 + 4
    restored = Replay(ReplayOptions())
    restored.load_state_dict(strategy.state_dict())
    assert restored.memory == strategy.memory


def test_task_softmax_and_one_softmax_losses(sequence: TaskSequence) -> None:
    model = small_gdat(sequence)
    model.add_task(2)
    batch = first_batch(sequence)
    per_task = module_for(model, make_strategy("finetune"), sequence)
    output = per_task(batch)
    local = output.logits[:, 2:].log_softmax(dim=-1)
    expected = -local.gather(1, (batch.targets - 2)[:, None]).mean()
    assert per_task.classification_loss(output, batch.targets).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    joint = module_for(model, make_strategy("joint"), sequence)
    expected_joint = torch.nn.functional.cross_entropy(output.logits, batch.targets)
    assert joint.classification_loss(output, batch.targets).item() == pytest.approx(
        expected_joint.item(), rel=1e-5
    )
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("distill")


def test_average_and_bwt() -> None:
    assert average_and_bwt([[0.9, None], [0.6, 0.8]]) == (pytest.approx(0.7), pytest.approx(-0.3))
    three = [[1.0, None, None], [0.8, 0.9, None], [0.5, 0.9, 0.7]]
    assert average_and_bwt(three) == (pytest.approx(0.7), pytest.approx(((0.5 - 1.0) + 0.0) / 2))
    assert average_and_bwt([[0.9, 0.8]]) == (pytest.approx(0.85), None)  # joint: one stage
    assert average_and_bwt([[0.9]]) == (pytest.approx(0.9), None)


def test_dice_and_threshold_choice() -> None:
    truth = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.55, 0.1, 0.0])
    assert dice(scores, truth, 0.5) == pytest.approx(2 * 2 / (3 + 2))
    assert dice(scores, truth, 0.58) == 1.0
    assert 0.55 <= best_threshold(scores, truth) < 0.6
    assert dice(np.zeros(3), np.zeros(3), 0.5) == 1.0


def test_tile_scores_are_gated_by_the_positive_probability() -> None:
    predictions = BagPredictions(
        logits=np.array([[4.0, -4.0], [-4.0, 4.0]]),  # slide 0 called negative, slide 1 positive
        targets=np.array([0, 1]),
        attention=[np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.8, 0.1])],
        tile_truth=[np.zeros(3, np.uint8), np.array([0, 1, 0], np.uint8)],
        descriptors=np.zeros((2, 4)),
    )
    negative = np.array([True, False])
    one_task = np.array([0, 0])
    scores = tile_scores(predictions, np.array([0, 1]), negative)
    assert scores[0].max() < 0.01  # a hot spot on a negative slide is suppressed
    assert scores[1].argmax() == 1 and scores[1].max() > 0.99
    metrics = task_metrics(predictions, np.array([0, 1]), negative, 0.5, one_task, None)
    assert metrics["accuracy"] == metrics["task_accuracy"] == 1.0
    assert metrics["task_id_accuracy"] is None
    assert metrics["tile_auroc"] == 1.0 and metrics["tile_dice"] == 1.0
    no_truth = BagPredictions(
        predictions.logits,
        predictions.targets,
        predictions.attention,
        [None, None],
        np.zeros((2, 4)),
    )
    assert (
        task_metrics(no_truth, np.array([0, 1]), negative, 0.5, one_task, None)["tile_auroc"]
        is None
    )


def test_the_task_prior_lets_the_right_head_answer() -> None:
    # Task 0's slides; the task-1 head's logits are larger on both (uncalibrated heads).
    logits = np.array([[1.0, -1.0, 6.0, 5.0], [-1.0, 1.0, 5.0, 6.0]])
    descriptors = np.array([[0.1, 0.0], [-0.1, 0.1]])
    predictions = BagPredictions(logits, np.array([0, 1]), [np.ones(1)] * 2, [None] * 2,
                                 descriptors)  # fmt: skip
    prototypes = TaskPrototypes()
    prototypes.add(0, np.array([[0.0, 0.2], [0.1, -0.2], [-0.1, 0.0]]))
    prototypes.add(1, np.array([[4.0, 4.2], [4.1, 3.8], [3.9, 4.0]]))
    task_of_class, negative = np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0], bool)
    with_prior = task_metrics(predictions, np.array([0, 1]), negative, None, task_of_class,
                              prototypes)  # fmt: skip
    assert with_prior["head_accuracy"] == 0.0  # the argmax of all heads picks task 1's classes
    assert with_prior["accuracy"] == with_prior["task_id_accuracy"] == 1.0
    plain = task_metrics(predictions, np.array([0, 1]), negative, None, task_of_class, None)
    assert plain["accuracy"] == plain["head_accuracy"] == 0.0
    assert plain["task_accuracy"] == with_prior["task_accuracy"] == 1.0


def test_tile_labels_must_match_the_tiles(tmp_path: Path) -> None:
    path = tmp_path / "bag.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("tile_labels", data=np.array([0, 2, 1]))
    assert read_tile_labels(path, 3).tolist() == [0, 1, 1]
    with pytest.raises(FeatureFileError, match="tile_labels has 3 entries for 4 tiles"):
        read_tile_labels(path, 4)
