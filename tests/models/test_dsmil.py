"""DSMIL: critical instances over real tiles, the bag stream's attention and the bag contract."""

from __future__ import annotations

import math

import pytest
import torch

from milkit.data.bags import pad_bags
from milkit.errors import BagBatchError
from milkit.models import DSMIL, critical_instance_logits, critical_instances

LENGTHS = [6, 11, 1, 3]
DIM = 8


def make(**kwargs: object) -> DSMIL:
    torch.manual_seed(0)
    return DSMIL(DIM, **{"n_classes": 2, "query_dim": 8, **kwargs}).eval()


def padded_with_high_scoring_junk(
    model: DSMIL,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Bags of different lengths whose padding scores far above every real tile, per class.

    Junk rows are large multiples of the instance classifier's weight rows (raw features go
    straight into it when the model has no input MLP).
    """
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(n, DIM, generator=gen) for n in LENGTHS]
    features, mask = pad_bags(bags)
    weight = model.instance_classifier.weight.detach()
    pads = (~mask).nonzero()
    for k, (b, i) in enumerate(pads.tolist()):
        features[b, i] = 1e3 * weight[k % len(weight)]
    return bags, features, mask


def test_critical_instances_ignore_higher_scoring_padding() -> None:
    scores = torch.tensor(
        [[[0.25, 2.0], [0.5, -1.0], [9.0, 9.0]], [[-5.0, -3.0], [-4.0, -6.0], [0.0, 0.0]]]
    )
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert critical_instances(scores, mask).tolist() == [[1, 0], [1, 0]]
    assert critical_instance_logits(scores, mask).tolist() == [[0.5, 2.0], [-4.0, -3.0]]


def test_critical_instance_logits_pass_gradients_to_the_critical_tiles_only() -> None:
    scores = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    critical_instance_logits(scores, mask).sum().backward()
    assert torch.all(scores.grad.sum(dim=1) == 1)
    assert int((scores.grad != 0).sum()) == 2 * 3


@pytest.mark.parametrize("n_classes", [1, 2, 3])
def test_padding_with_high_scoring_junk_changes_nothing(n_classes: int) -> None:
    model = make(n_classes=n_classes)
    bags, features, mask = padded_with_high_scoring_junk(model)
    out = model(features, mask)
    raw_scores = model.instance_classifier(features)
    for b, bag in enumerate(bags):  # the precondition of this test
        if len(bag) < max(LENGTHS):
            assert raw_scores[b, len(bag) :].amax(dim=0).min() > raw_scores[b, : len(bag)].amax()
    heads = (n_classes,) if n_classes > 1 else ()
    assert out.logits.shape == (len(bags), n_classes)
    assert out.attention.shape == (*mask.shape, *heads)
    assert out.tile_scores.shape == (*mask.shape, n_classes)
    assert torch.all(out.attention[~mask] == 0) and torch.all(out.tile_scores[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(len(bags), *heads))
    for b, bag in enumerate(bags):
        n = len(bag)
        alone = model(bag[None], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(out.logits[b], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.attention[b, :n], alone.attention[0], atol=1e-6)
        assert torch.allclose(out.tile_scores[b, :n], alone.tile_scores[0], atol=1e-5)


def test_attention_is_softmax_of_query_similarity_to_the_critical_instance() -> None:
    model = make(n_classes=3, nonlinear_query=False)
    bag = torch.randn(1, 7, DIM)
    out = model(bag, torch.ones(1, 7, dtype=torch.bool))
    with torch.no_grad():
        c = bag[0] @ model.instance_classifier.weight.T + model.instance_classifier.bias
        q = bag[0] @ model.query.weight.T + model.query.bias
        for k in range(3):
            q_m = q[int(c[:, k].argmax())]
            expected = (q @ q_m / math.sqrt(8)).softmax(dim=0)
            assert torch.allclose(out.attention[0, :, k], expected, atol=1e-6)
        class_embeddings = out.attention[0].T @ bag[0]  # values are the embeddings themselves
        logits = model.bag_classifier(class_embeddings.reshape(-1))
    assert torch.allclose(out.logits[0], logits, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"hidden_dim": 16, "value_projection": True}])
def test_permuting_tiles_permutes_attention_and_keeps_logits(options: dict) -> None:
    model = make(**options)
    bag = torch.randn(1, 12, DIM)
    mask = torch.ones(1, 12, dtype=torch.bool)
    perm = torch.randperm(12)
    out, permuted = model(bag, mask), model(bag[:, perm], mask)
    assert torch.allclose(permuted.logits, out.logits, atol=1e-5)
    assert torch.allclose(permuted.attention, out.attention[:, perm], atol=1e-6)
    assert torch.allclose(permuted.tile_scores, out.tile_scores[:, perm], atol=1e-6)


def test_eval_mode_is_deterministic_with_dropout() -> None:
    model = make(hidden_dim=16, dropout=0.5)
    features = torch.randn(2, 5, DIM)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(model(features, mask).logits, model(features, mask).logits)


def test_all_padding_bag_raises() -> None:
    model = make()
    with pytest.raises(BagBatchError, match=r"batch index \[0\]"):
        model(torch.randn(2, 3, DIM), torch.tensor([[False] * 3, [True] * 3]))


def test_bf16_autocast_is_close_to_float32() -> None:
    model = make(n_classes=2, value_projection=True)
    bags, features, mask = padded_with_high_scoring_junk(model)
    reference = model(features, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features, mask)
    assert torch.isfinite(out.logits).all()
    assert torch.all(out.attention[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(len(bags), 2), atol=1e-3)
    assert torch.allclose(out.logits.float(), reference.logits, atol=5e-2, rtol=5e-2)
