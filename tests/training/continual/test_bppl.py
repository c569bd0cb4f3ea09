"""BPPL: prototypes, pseudo-labels, which bags count, the instance loss and the τ₂ adaptation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milkit.errors import ConfigError
from milkit.training.continual.bppl import BPPL, minmax_within_bags, pseudo_labels

D = 8


def witness_bag(n: int = 10, witnesses: tuple[int, ...] = (2, 7), pad: int = 0) -> dict:
    """One positive bag: background tiles plus witnesses along e_0, attention on the witnesses."""
    generator = torch.Generator().manual_seed(0)
    background = torch.zeros(D)
    background[1] = 2.0
    instances = background + 0.3 * torch.randn(n + pad, D, generator=generator)
    truth = torch.zeros(n + pad, dtype=torch.bool)
    truth[list(witnesses)] = True
    instances[truth, 0] += 4.0
    mask = torch.arange(n + pad) < n
    scores = torch.where(truth, 2.0, 0.0).masked_fill(~mask, float("-inf"))
    return {
        "instances": instances[None],
        "mask": mask[None],
        "attention": scores.softmax(dim=0)[None],
        "truth": truth[None],
    }


def test_pseudo_labels_mark_the_witnesses_and_ignore_padding() -> None:
    bag = witness_bag(pad=3)
    labels, confidence = pseudo_labels(bag["attention"], bag["instances"], bag["mask"])
    real = bag["mask"]
    assert torch.equal(labels[real].bool(), bag["truth"][real])
    assert (confidence[real] >= 0.5).all() and (confidence[real] <= 1.0).all()
    assert (confidence[~real] == 0).all()
    # Padding (whatever it holds) changes neither labels nor confidences of real tiles.
    unpadded = witness_bag(pad=0)
    labels_0, confidence_0 = pseudo_labels(
        unpadded["attention"], unpadded["instances"], unpadded["mask"]
    )
    assert torch.equal(labels_0[0], labels[0, :10])
    assert torch.allclose(confidence_0[0], confidence[0, :10])


def test_minmax_within_bags() -> None:
    scores = torch.tensor([[0.1, 0.4, 0.2, 9.0], [0.3, 0.3, -5.0, -5.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    normalised = minmax_within_bags(scores, mask)
    assert torch.allclose(normalised[0, :3], torch.tensor([0.0, 1.0, 1.0 / 3.0]))
    assert normalised[0, 3] == 0  # padding
    assert torch.equal(normalised[1], torch.zeros(4))  # all real tiles equal


def test_loss_is_the_bce_of_normalised_attention_against_kept_pseudo_labels() -> None:
    bag = witness_bag()
    logits = torch.tensor([[-3.0, 3.0]])  # confident and correct: p(positive) ≈ 0.998
    bppl = BPPL(weight=2.0)
    loss = bppl.loss(
        bag["attention"],
        bag["instances"],
        bag["mask"],
        logits,
        torch.tensor([1]),
        torch.tensor([True]),
    )
    labels, confidence = pseudo_labels(bag["attention"], bag["instances"], bag["mask"])
    kept = confidence > 0.5
    p = minmax_within_bags(bag["attention"], bag["mask"]).clamp(1e-6, 1 - 1e-6)
    assert loss.item() == pytest.approx(2.0 * F.binary_cross_entropy(p[kept], labels[kept]).item())


@pytest.mark.parametrize(
    ("logits", "target", "positive"),
    [
        ([[-3.0, 3.0]], 1, False),  # a negative bag
        ([[3.0, -3.0]], 1, True),  # misclassified
        ([[0.0, 1.0]], 1, True),  # correct but not confident (p ≈ 0.73 < τ₁)
    ],
)
def test_bags_that_do_not_qualify_add_no_loss(
    logits: list[list[float]], target: int, positive: bool
) -> None:
    bag = witness_bag()
    attention = bag["attention"].clone().requires_grad_(True)
    bppl = BPPL()
    loss = bppl.loss(
        attention,
        bag["instances"],
        bag["mask"],
        torch.tensor(logits),
        torch.tensor([target]),
        torch.tensor([positive]),
    )
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert bppl.end_epoch() == 0.5  # nothing seen: τ₂ unchanged


def test_descending_the_loss_moves_attention_towards_the_witnesses() -> None:
    bag = witness_bag()
    truth = bag["truth"][0]
    # Attention slightly favours the witnesses, with some spread; BPPL should sharpen it.
    noise = 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    scores = (torch.where(truth, 0.5, 0.0) + noise).requires_grad_(True)
    optimiser = torch.optim.SGD([scores], lr=1.0)
    bppl = BPPL()
    shares = []
    for _ in range(20):
        attention = scores.softmax(dim=0)
        shares.append(attention[truth].sum().item())
        loss = bppl.loss(
            attention[None],
            bag["instances"],
            bag["mask"],
            torch.tensor([[-4.0, 4.0]]),
            torch.tensor([1]),
            torch.tensor([True]),
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert shares[-1] > shares[0] + 0.1


def test_threshold_adapts_to_the_mean_confidence_of_selected_bags() -> None:
    bag = witness_bag()
    args = (bag["instances"], bag["mask"], torch.tensor([[-4.0, 4.0]]), torch.tensor([1]))
    bppl = BPPL()
    bppl.loss(bag["attention"], *args, torch.tensor([True]))
    _, confidence = pseudo_labels(bag["attention"], bag["instances"], bag["mask"])
    assert bppl.end_epoch() == pytest.approx(confidence[bag["mask"]].mean().item())
    assert bppl.threshold > 0.5
    assert bppl.end_epoch() == pytest.approx(confidence[bag["mask"]].mean().item())  # kept
    bppl.reset()
    assert bppl.threshold == 0.5
    fixed = BPPL(adapt=False, instance_threshold=0.6)
    fixed.loss(bag["attention"], *args, torch.tensor([True]))
    assert fixed.end_epoch() == 0.6


def test_weight_zero_switches_it_off_and_bad_options_are_rejected() -> None:
    bag = witness_bag()
    off = BPPL(weight=0.0)
    assert not off.enabled
    loss = off.loss(
        bag["attention"],
        bag["instances"],
        bag["mask"],
        torch.tensor([[-4.0, 4.0]]),
        torch.tensor([1]),
        torch.tensor([True]),
    )
    assert loss.item() == 0.0
    for options in ({"bag_threshold": 1.0}, {"instance_threshold": -0.1}, {"weight": -1.0}):
        with pytest.raises(ConfigError, match="BPPL"):
            BPPL(**options)
