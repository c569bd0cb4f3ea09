"""TileScoreRegressor: tile scores in [0, 1] pooled (mean or attention) into a slide value."""

from __future__ import annotations

import pytest
import torch

from milkit.data.bags import pad_bags
from milkit.errors import BagBatchError, ConfigError
from milkit.models import TileScoreRegressor

LENGTHS = [6, 11, 1, 3]
DIM = 8
MODES = ["mean", "attention"]


def junk_padded_batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Bags of different lengths, padded, with large random junk in the padding."""
    gen = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, DIM, generator=gen) for n in LENGTHS]
    features, mask = pad_bags(bags)
    features[~mask] = 1e3 * torch.randn(int((~mask).sum()), DIM, generator=gen)
    return bags, features, mask


def make(pooling: str, **kwargs: object) -> TileScoreRegressor:
    torch.manual_seed(0)
    return TileScoreRegressor(DIM, hidden_dim=16, attention_dim=8, pooling=pooling, **kwargs).eval()


@pytest.mark.parametrize("pooling", MODES)
def test_value_is_attention_weighted_tile_score_in_unit_interval(pooling: str) -> None:
    model = make(pooling)
    bags, features, mask = junk_padded_batch()
    out = model(features, mask)
    assert out.value.shape == (len(bags),) and out.logits is None
    assert out.tile_scores.shape == mask.shape and out.attention.shape == mask.shape
    assert torch.all((out.value >= 0) & (out.value <= 1))
    assert torch.all((out.tile_scores >= 0) & (out.tile_scores <= 1))
    assert torch.all(out.attention[~mask] == 0) and torch.all(out.tile_scores[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(len(bags)))
    assert torch.allclose(out.value, (out.attention * out.tile_scores).sum(dim=1))


def test_mean_pooling_is_the_mean_tile_score_over_real_tiles() -> None:
    model = make("mean")
    bags, features, mask = junk_padded_batch()
    out = model(features, mask)
    for b, bag in enumerate(bags):
        n = len(bag)
        assert torch.allclose(out.value[b], out.tile_scores[b, :n].mean())
        assert torch.allclose(out.attention[b, :n], torch.full((n,), 1 / n))


def test_attention_pooling_is_not_uniform() -> None:
    out = make("attention")(*junk_padded_batch()[1:])
    assert out.attention[1, :11].std() > 1e-4


@pytest.mark.parametrize("pooling", MODES)
def test_padding_changes_nothing(pooling: str) -> None:
    model = make(pooling, dropout=0.5)
    bags, features, mask = junk_padded_batch()
    out = model(features, mask)
    for b, bag in enumerate(bags):
        n = len(bag)
        alone = model(bag[None], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(out.value[b], alone.value[0], atol=1e-6)
        assert torch.allclose(out.attention[b, :n], alone.attention[0], atol=1e-6)
        assert torch.allclose(out.tile_scores[b, :n], alone.tile_scores[0], atol=1e-6)


@pytest.mark.parametrize("pooling", MODES)
def test_masking_a_tile_subset_equals_dropping_it(pooling: str) -> None:
    model = make(pooling)
    bag = torch.randn(1, 10, DIM)
    tumour_bed = torch.tensor([[True, False, True, True, False, False, True, True, False, True]])
    restricted = model(bag, tumour_bed)
    dropped = model(bag[:, tumour_bed[0]], torch.ones(1, int(tumour_bed.sum()), dtype=torch.bool))
    assert torch.allclose(restricted.value, dropped.value, atol=1e-6)


def test_bf16_autocast_is_close_to_float32() -> None:
    model = make("attention")
    bags, features, mask = junk_padded_batch()
    reference = model(features, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features, mask)
    assert torch.all(out.attention[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(len(bags)), atol=1e-3)
    assert torch.allclose(out.value.float(), reference.value, atol=2e-2)


def test_all_padding_bag_raises() -> None:
    _, features, mask = junk_padded_batch()
    mask[3] = False
    for pooling in MODES:
        with pytest.raises(BagBatchError, match=r"batch index \[3\]"):
            make(pooling)(features, mask)


def test_unknown_pooling_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="pooling must be one of"):
        TileScoreRegressor(DIM, pooling="max")  # type: ignore[arg-type]


def test_attention_pooling_learns_to_weight_the_informative_tiles() -> None:
    """Slide value = mean tile target over 'stroma' tiles only (docs/papers.md C's pitfall)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n_bags, n_tiles = 48, 20
    features = torch.randn(n_bags, n_tiles, DIM, generator=gen)
    stroma = torch.rand(n_bags, n_tiles, generator=gen) < 0.4
    stroma[:, 0] = True
    features[..., 0] = torch.where(stroma, 2.0, -2.0)  # tissue type is visible in feature 0
    density = torch.rand(n_bags, n_tiles, generator=gen)
    features[..., 1] = 4 * density - 2  # the local TIL density, visible in feature 1
    target = (density * stroma).sum(dim=1) / stroma.sum(dim=1)
    mask = torch.ones(n_bags, n_tiles, dtype=torch.bool)
    model = TileScoreRegressor(DIM, hidden_dim=16, dropout=0.0, attention_dim=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(model(features, mask).value, target).backward()
        optimiser.step()
    with torch.no_grad():
        out = model.eval()(features, mask)
    assert out.attention[stroma].mean() > 2 * out.attention[~stroma].mean()
    assert torch.nn.functional.mse_loss(out.value, target) < 0.05 * target.var()
