"""ABMIL: the padded-bag contract, multi-branch heads and a quick learning check."""

from __future__ import annotations

import pytest
import torch

from milkit.data.bags import pad_bags
from milkit.errors import BagBatchError, ConfigError
from milkit.models import ABMIL

LENGTHS = [6, 11, 1, 3]
DIM = 8

CONFIGS = [
    {"n_classes": 2},
    {"n_classes": 3, "gated": False},
    {"n_classes": 3, "multi_branch": True},
    {"n_classes": 1, "multi_branch": True, "hidden_dim": None},
    {"n_classes": 2, "hidden_dim": 0, "gated": False, "multi_branch": True},
]


def junk_padded_batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Bags of different lengths, padded, with large random junk in the padding."""
    gen = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, DIM, generator=gen) for n in LENGTHS]
    features, mask = pad_bags(bags)
    features[~mask] = 1e3 * torch.randn(int((~mask).sum()), DIM, generator=gen)
    return bags, features, mask


def make(config: dict) -> ABMIL:
    torch.manual_seed(0)
    return ABMIL(DIM, hidden_dim=config.pop("hidden_dim", 16), attention_dim=8, **config).eval()


def heads_of(model: ABMIL) -> tuple[int, ...]:
    return (model.n_classes,) if model.multi_branch and model.n_classes > 1 else ()


@pytest.mark.parametrize("config", CONFIGS)
def test_output_shapes_and_attention_normalisation(config: dict) -> None:
    model = make(dict(config))
    bags, features, mask = junk_padded_batch()
    out = model(features, mask)
    batch, n_classes = len(bags), model.n_classes
    assert out.logits.shape == (batch, n_classes)
    assert out.attention.shape == (*mask.shape, *heads_of(model))
    assert out.tile_scores.shape == (*mask.shape, n_classes)
    assert out.value is None
    assert torch.all(out.attention[~mask] == 0)
    assert torch.all(out.tile_scores[~mask] == 0)
    ones = torch.ones(batch, *heads_of(model))
    assert torch.allclose(out.attention.sum(dim=1), ones)


@pytest.mark.parametrize("config", CONFIGS)
def test_padding_changes_nothing(config: dict) -> None:
    model = make(dict(config))
    bags, features, mask = junk_padded_batch()
    out = model(features, mask)
    for b, bag in enumerate(bags):
        alone = model(bag[None], torch.ones(1, len(bag), dtype=torch.bool))
        n = len(bag)
        assert torch.allclose(out.logits[b], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.attention[b, :n], alone.attention[0], atol=1e-6)
        assert torch.allclose(out.tile_scores[b, :n], alone.tile_scores[0], atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_logits_are_attention_weighted_tile_scores(config: dict) -> None:
    model = make(dict(config))
    _, features, mask = junk_padded_batch()
    out = model(features, mask)
    attention = out.attention if out.attention.dim() == 3 else out.attention.unsqueeze(-1)
    assert torch.allclose((attention * out.tile_scores).sum(dim=1), out.logits, atol=1e-5)


def test_permuting_tiles_permutes_attention_and_keeps_logits() -> None:
    model = make({"n_classes": 3, "multi_branch": True})
    bag = torch.randn(1, 10, DIM)
    mask = torch.ones(1, 10, dtype=torch.bool)
    perm = torch.randperm(10)
    out, permuted = model(bag, mask), model(bag[:, perm], mask)
    assert torch.allclose(permuted.logits, out.logits, atol=1e-5)
    assert torch.allclose(permuted.attention, out.attention[:, perm], atol=1e-6)


def test_multi_branch_reads_each_class_from_its_own_branch() -> None:
    model = make({"n_classes": 3, "multi_branch": True})
    _, features, mask = junk_padded_batch()
    out = model(features, mask)
    assert out.embedding.shape == (len(LENGTHS), 3, 16)
    with torch.no_grad():
        model.head.weight[1] += 1.0
    changed = model(features, mask).logits != out.logits
    assert changed[:, 1].all() and not changed[:, [0, 2]].any()
    branches_differ = (out.attention[..., 0] - out.attention[..., 1]).abs().amax()
    assert branches_differ > 1e-4


def test_eval_mode_is_deterministic() -> None:
    model = make({"n_classes": 2})
    _, features, mask = junk_padded_batch()
    assert torch.equal(model(features, mask).logits, model(features, mask).logits)


def test_all_padding_bag_raises() -> None:
    model = make({"n_classes": 2})
    _, features, mask = junk_padded_batch()
    mask[2] = False
    with pytest.raises(BagBatchError, match=r"batch index \[2\]"):
        model(features, mask)


def test_bad_constructor_values_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="n_classes must be > 0"):
        ABMIL(DIM, n_classes=0)
    with pytest.raises(ConfigError, match="dropout"):
        ABMIL(DIM, n_classes=2, dropout=-0.1)
    with pytest.raises(ConfigError, match="hidden_dim must be >= 0"):
        ABMIL(DIM, n_classes=2, hidden_dim=-4)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]])
def test_bf16_autocast_is_close_to_float32(config: dict) -> None:
    model = make(dict(config))
    _, features, mask = junk_padded_batch()
    reference = model(features, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features, mask)
    assert torch.isfinite(out.logits).all()
    assert torch.all(out.attention[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), reference.attention.sum(dim=1), atol=1e-3)
    assert torch.allclose(out.logits.float(), reference.logits, atol=5e-2, rtol=5e-2)


def witness_bags(
    n_bags: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian bags; positive bags hold 1-3 witness tiles shifted along the first 4 features.

    Returns:
        features (B, N, D), mask (B, N), labels (B,), witness (B, N) bool.
    """
    bags, witnesses = [], []
    labels = torch.arange(n_bags) % 2
    for label in labels.tolist():
        n = int(torch.randint(8, 25, (1,), generator=gen))
        bag = torch.randn(n, DIM, generator=gen)
        witness = torch.zeros(n, dtype=torch.bool)
        if label:
            witness[
                torch.randperm(n, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))]
            ] = True
            bag[witness, :4] += 3.0
        bags.append(bag)
        witnesses.append(witness)
    features, mask = pad_bags(bags)
    witness, _ = pad_bags([w.unsqueeze(-1) for w in witnesses])
    return features, mask, labels, witness.squeeze(-1)


def test_abmil_learns_witness_bags_and_attends_to_witnesses() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features, mask, labels, witness = witness_bags(64, gen)
    model = ABMIL(DIM, n_classes=2, hidden_dim=32, attention_dim=16, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(features, mask).logits, labels)
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        out = model(features, mask)
    accuracy = (out.logits.argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.9
    positive = labels.bool().unsqueeze(1)
    others = mask & positive & ~witness
    assert out.attention[witness].mean() > out.attention[others].mean()
