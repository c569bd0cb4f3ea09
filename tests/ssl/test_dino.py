"""DINO head (weight-normalised prototypes), loss (pairs, centring, sharpening), KoLeo and
schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from milkit.errors import ConfigError
from milkit.ssl.dino import DINOHead, DINOLoss, cosine_schedule, koleo_loss


def _prototype_norms(head: DINOHead) -> torch.Tensor:
    return head.last_layer.weight.norm(dim=1)


def test_head_prototypes_have_unit_norm_and_stay_so_after_training() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    assert head.last_layer.weight.shape == (32, 8)
    torch.testing.assert_close(_prototype_norms(head), torch.ones(32))
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        head(torch.randn(4, 16)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(_prototype_norms(head), torch.ones(32))


def test_head_magnitude_trainable_without_norm_last_layer() -> None:
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_head_shapes_and_depth(n_layers: int) -> None:
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, n_layers=n_layers)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == n_layers
    assert head(torch.randn(5, 16)).shape == (5, 32)


def test_head_rejects_zero_layers() -> None:
    with pytest.raises(ConfigError, match="n_layers=0"):
        DINOHead(16, 32, n_layers=0)


def _reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Per-tile, per-pair loop written independently of the vectorised loss."""
    batch = teacher.shape[0] // 2
    terms = []
    for b in range(batch):
        for t_view in range(2):
            target = F.softmax((teacher[t_view * batch + b] - center[0]) / teacher_temp, dim=0)
            for s_view in range(n_crops):
                if s_view == t_view:
                    continue
                logits = student[s_view * batch + b] / student_temp
                terms.append(F.cross_entropy(logits[None], target[None]))
    return torch.stack(terms).mean()


def test_loss_matches_reference_and_centre_follows_ema() -> None:
    torch.manual_seed(0)
    n_crops, batch, k = 4, 3, 10
    loss_fn = DINOLoss(k, n_crops, warmup_teacher_temp_epochs=0.0, teacher_temp=0.05)
    center = torch.zeros(1, k)
    for _ in range(2):
        student = torch.randn(n_crops * batch, k)
        teacher = torch.randn(2 * batch, k) * 3
        expected = _reference_loss(student, teacher, center, n_crops, 0.1, 0.05)
        torch.testing.assert_close(loss_fn(student, teacher, epoch=5.0), expected)
        # the loss used the old centre; the new one is its EMA with the teacher batch mean
        center = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, center)


def test_loss_gradient_reaches_student_only() -> None:
    student = torch.randn(6, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    DINOLoss(8, 3)(student, teacher, epoch=0.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_loss_is_lowest_when_student_matches_teacher_views() -> None:
    torch.manual_seed(0)
    batch, k = 8, 16
    teacher = torch.randn(2 * batch, k) * 5
    # student logits proportional to the targets of the *other* global view vs random logits
    matching = torch.cat([teacher[batch:], teacher[:batch]]) * (0.1 / 0.04)
    loss_match = DINOLoss(k, 2, warmup_teacher_temp_epochs=0.0, teacher_temp=0.04)
    loss_random = DINOLoss(k, 2, warmup_teacher_temp_epochs=0.0, teacher_temp=0.04)
    assert loss_match(matching, teacher, 0.0) < loss_random(torch.randn(2 * batch, k), teacher, 0.0)


def test_teacher_temperature_warms_up_linearly() -> None:
    loss_fn = DINOLoss(
        8, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10
    )
    assert loss_fn.teacher_temp_at(0.0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp_at(5.0) == pytest.approx(0.055)
    assert loss_fn.teacher_temp_at(10.0) == pytest.approx(0.07)
    assert loss_fn.teacher_temp_at(50.0) == pytest.approx(0.07)


def test_loss_needs_both_global_crops() -> None:
    with pytest.raises(ConfigError, match="n_crops=1"):
        DINOLoss(8, 1)


def test_cosine_schedule_warmup_and_decay() -> None:
    values = [cosine_schedule(1.0, 0.1, s, 100, warmup_steps=10) for s in range(101)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    # without warm-up, e.g. the teacher momentum 0.996 -> 1
    assert cosine_schedule(0.996, 1.0, 0, 50) == pytest.approx(0.996)
    assert cosine_schedule(0.996, 1.0, 50, 50) == pytest.approx(1.0)


def test_koleo_is_minus_the_mean_log_nearest_distance_on_the_sphere() -> None:
    torch.manual_seed(0)
    # four unit axes: every nearest neighbour lies sqrt(2) away, whatever the embeddings' scale
    axes = torch.eye(4) * torch.tensor([[1.0], [3.0], [0.5], [7.0]])
    assert koleo_loss(axes).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # a pair at 60 degrees (distance 1) and one far point whose nearest is that pair
    points = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    nearest = [1.0, 1.0, 2 * math.sin(math.radians(60))]  # point 2 is 120 deg from point 1
    assert koleo_loss(points).item() == pytest.approx(-np.mean(np.log(nearest)), abs=1e-6)
    # two tiles on one point: the loss rises towards -log(eps), the gradient stays finite
    tiles = torch.randn(6, 8)
    tiles[1] = tiles[0]
    tiles.requires_grad_(True)
    loss = koleo_loss(tiles)
    loss.backward()
    assert loss.item() > koleo_loss(torch.randn(6, 8)).item() + 2
    assert tiles.grad is not None and tiles.grad.isfinite().all()
    with pytest.raises(ConfigError, match="at least 2 embeddings"):
        koleo_loss(torch.ones(1, 8))


def test_koleo_gradient_pushes_nearest_neighbours_apart() -> None:
    torch.manual_seed(0)
    embeddings = torch.randn(16, 8, requires_grad=True)

    def min_chord_distance(x: torch.Tensor) -> float:
        unit = F.normalize(x.detach(), dim=-1)
        return float(torch.cdist(unit, unit).add(torch.eye(len(x)) * 9).min())

    before = min_chord_distance(embeddings), koleo_loss(embeddings).item()
    optimiser = torch.optim.SGD([embeddings], lr=1.0)
    for _ in range(30):
        optimiser.zero_grad()
        koleo_loss(embeddings).backward()
        optimiser.step()
    # the closest pair ends much farther apart (0.70 -> 1.15 for this draw)
    assert min_chord_distance(embeddings) > 1.4 * before[0]
    assert koleo_loss(embeddings).item() < before[1] - 0.2
