"""Masked softmax and attention pooling (milkit.models.pooling)."""

from __future__ import annotations

import pytest
import torch

from milkit.data.bags import pad_bags
from milkit.errors import BagBatchError, ConfigError, MilkitError
from milkit.models.pooling import (
    AttentionPooling,
    GatedAttentionPooling,
    attention_pool,
    masked_softmax,
)

LENGTHS = [5, 9, 1, 4]
DIM = 6


def junk_padded_batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Bags of different lengths, padded, with large random junk in the padding."""
    gen = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, DIM, generator=gen) for n in LENGTHS]
    features, mask = pad_bags(bags)
    features[~mask] = 1e3 * torch.randn(int((~mask).sum()), DIM, generator=gen)
    return bags, features, mask


def test_masked_softmax_is_zero_on_padding_and_sums_to_one() -> None:
    _, _, mask = junk_padded_batch()
    for shape in [mask.shape, (*mask.shape, 3)]:
        scores = torch.randn(shape)
        scores[~mask] = 1e6  # padding scores far above the real ones must still get 0
        weights = masked_softmax(scores, mask)
        assert weights.shape == scores.shape
        assert torch.all(weights[~mask] == 0)
        assert torch.allclose(weights.sum(dim=1), torch.ones(weights.sum(dim=1).shape))


def test_masked_softmax_matches_softmax_over_real_tiles() -> None:
    _, _, mask = junk_padded_batch()
    scores = torch.randn(mask.shape)
    weights = masked_softmax(scores, mask)
    for b, n in enumerate(LENGTHS):
        assert torch.allclose(weights[b, :n], scores[b, :n].softmax(dim=0))


def test_masked_softmax_of_bf16_scores_is_float32_and_normalised() -> None:
    _, _, mask = junk_padded_batch()
    weights = masked_softmax(torch.randn(mask.shape).bfloat16(), mask)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(LENGTHS)))


def test_all_padding_bag_raises_a_clear_error() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(BagBatchError, match=r"batch index \[1\].*no real tile") as info:
        masked_softmax(torch.zeros(2, 2), mask)
    assert isinstance(info.value, MilkitError) and isinstance(info.value, ValueError)


def test_bad_masks_are_rejected() -> None:
    with pytest.raises(BagBatchError, match="must be bool"):
        masked_softmax(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(BagBatchError, match=r"shape \(2, 4\)"):
        masked_softmax(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(BagBatchError, match=r"\(B, N, D\)"):
        AttentionPooling(DIM)(torch.zeros(3, DIM), torch.ones(1, 3, dtype=torch.bool))


def test_attention_pool_is_the_weighted_sum_and_ignores_non_finite_padding() -> None:
    bags, features, mask = junk_padded_batch()
    features[~mask] = float("inf")
    attention = masked_softmax(torch.randn(*mask.shape, 2), mask)
    pooled = attention_pool(features, attention, mask)
    assert pooled.shape == (len(bags), 2, DIM)
    for b, bag in enumerate(bags):
        expected = attention[b, : len(bag)].T @ bag
        assert torch.allclose(pooled[b], expected, atol=1e-6)
    single = attention_pool(features, attention[..., 0], mask)
    assert torch.allclose(single, pooled[:, 0])


@pytest.mark.parametrize("pooling_cls", [AttentionPooling, GatedAttentionPooling])
@pytest.mark.parametrize("n_heads", [1, 3])
def test_pooling_ignores_padding(pooling_cls: type[AttentionPooling], n_heads: int) -> None:
    torch.manual_seed(0)
    pooling = pooling_cls(DIM, attention_dim=8, n_heads=n_heads, dropout=0.5).eval()
    bags, features, mask = junk_padded_batch()
    embedding, attention = pooling(features, mask)
    head_shape = () if n_heads == 1 else (n_heads,)
    assert embedding.shape == (len(bags), *head_shape, DIM)
    assert attention.shape == (*mask.shape, *head_shape)
    assert torch.all(attention[~mask] == 0)
    assert torch.allclose(attention.sum(dim=1), torch.ones(len(bags), *head_shape))
    for b, bag in enumerate(bags):
        alone = pooling(bag[None], torch.ones(1, len(bag), dtype=torch.bool))
        assert torch.allclose(attention[b, : len(bag)], alone.attention[0], atol=1e-6)
        assert torch.allclose(embedding[b], alone.embedding[0], atol=1e-5)


def test_gated_scores_follow_the_gated_formula() -> None:
    torch.manual_seed(0)
    pooling = GatedAttentionPooling(DIM, attention_dim=8, n_heads=2)
    h = torch.randn(2, 5, DIM)
    hidden = torch.tanh(h @ pooling.tanh_proj.weight.T + pooling.tanh_proj.bias) * torch.sigmoid(
        h @ pooling.gate_proj.weight.T + pooling.gate_proj.bias
    )
    expected = hidden @ pooling.score.weight.T + pooling.score.bias
    assert torch.allclose(pooling.scores(h), expected, atol=1e-6)


def test_plain_attention_has_no_gate() -> None:
    torch.manual_seed(0)
    pooling = AttentionPooling(DIM, attention_dim=8)
    h = torch.randn(1, 4, DIM)
    expected = torch.tanh(pooling.tanh_proj(h)) @ pooling.score.weight.T + pooling.score.bias
    assert not hasattr(pooling, "gate_proj")
    assert torch.allclose(pooling.scores(h), expected, atol=1e-6)


def test_pooling_under_bf16_autocast_stays_normalised() -> None:
    torch.manual_seed(0)
    pooling = GatedAttentionPooling(DIM, attention_dim=8).eval()
    bags, features, mask = junk_padded_batch()
    reference = pooling(features, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding, attention = pooling(features, mask)
    assert torch.all(attention[~mask] == 0)
    assert torch.allclose(attention.sum(dim=1), torch.ones(len(bags)), atol=1e-3)
    assert torch.allclose(attention, reference.attention, atol=2e-2)
    assert torch.allclose(embedding.float(), reference.embedding, atol=5e-2, rtol=5e-2)


def test_bad_constructor_values_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="n_heads must be > 0"):
        AttentionPooling(DIM, n_heads=0)
    with pytest.raises(ConfigError, match="dropout"):
        GatedAttentionPooling(DIM, dropout=1.0)
