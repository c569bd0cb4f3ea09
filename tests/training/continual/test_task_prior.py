"""Task prototypes: which task a slide comes from, and the class-incremental probabilities."""

from __future__ import annotations

import numpy as np
import torch

from milkit.training.continual.task_prior import (
    TaskPrototypes,
    class_incremental_log_probs,
    slide_descriptors,
)


def test_descriptors_average_the_real_tiles_only() -> None:
    features = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [1e6, 1e6]], [[5.0, 6.0], [0.0, 0.0], [9, 9]]]
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = np.array([[2.0, 3.0], [5.0, 6.0]])
    assert np.allclose(slide_descriptors(features, mask).numpy(), expected)


def test_posterior_follows_the_pooled_variance_of_each_dimension() -> None:
    rng = np.random.default_rng(0)
    prototypes = TaskPrototypes()
    # Dimension 0 is noisy (SD 10), dimension 1 precise (SD 0.1): a step of 1 in dimension 1
    # names the task, a step of 5 in dimension 0 does not.
    for task, centre in enumerate(([0.0, 0.0], [0.0, 1.0])):
        prototypes.add(task, centre + rng.normal(size=(200, 2)) * [10.0, 0.1])
    floor = 1e-3 * np.mean([100.0, 0.01])  # keeps a dimension that never varies finite
    assert np.allclose(prototypes.variance(), [100.0 + floor, 0.01 + floor], rtol=0.2)
    log_posterior = prototypes.log_posterior(np.array([[5.0, 0.95], [-5.0, 0.02]]), [0, 1])
    assert np.allclose(np.exp(log_posterior).sum(axis=1), 1.0)
    assert log_posterior.argmax(axis=1).tolist() == [1, 0]
    only_one = prototypes.log_posterior(np.array([[5.0, 0.95]]), [0])
    assert np.allclose(only_one, 0.0)


def test_class_probabilities_are_task_posterior_times_the_heads_softmax() -> None:
    logits = np.array([[2.0, 0.0, 9.0, 8.0, 7.0]])
    task_of_class = np.array([0, 0, 1, 1, 1])
    log_posterior = np.log(np.array([[0.9, 0.1]]))
    probs = np.exp(class_incremental_log_probs(logits, task_of_class, log_posterior))[0]
    head0 = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    head1 = np.exp([9.0, 8.0, 7.0]) / np.exp([9.0, 8.0, 7.0]).sum()
    assert np.allclose(probs, np.concatenate([0.9 * head0, 0.1 * head1]))
    plain = np.exp(class_incremental_log_probs(logits, task_of_class, None))[0]
    assert np.allclose(plain, np.exp(logits[0]) / np.exp(logits[0]).sum())


def test_state_round_trips() -> None:
    prototypes = TaskPrototypes()
    prototypes.add(0, np.array([[0.0, 1.0], [2.0, 1.0]]))
    prototypes.add(1, np.array([[5.0, 5.0], [7.0, 3.0], [6.0, 4.0]]))
    restored = TaskPrototypes()
    restored.load_state_dict(prototypes.state_dict())
    points = np.array([[1.0, 1.0], [6.0, 4.0], [3.5, 2.5]])
    assert np.allclose(
        restored.log_posterior(points, [0, 1]), prototypes.log_posterior(points, [0, 1])
    )
    assert restored.counts == {0: 2, 1: 3}
