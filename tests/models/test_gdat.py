"""GDATMIL: grouping, the padded-bag contract, per-task heads and a quick learning check."""

from __future__ import annotations

import pytest
import torch

from milkit.errors import BagBatchError, ConfigError
from milkit.models.gdat import GDATMIL, group_means, order_groups, spatial_groups

DIM = 8
TILE_PX = 256
LENGTHS = [37, 5, 60, 1]


def make(grouping: str = "spatial") -> GDATMIL:
    torch.manual_seed(0)
    return GDATMIL(
        DIM, [2, 3], embed_dim=16, n_heads=2, n_groups=16, grouping=grouping, attention_dim=8,
        dropout=0.0, block_dropout=0.0,
    ).eval()  # fmt: skip


def grid_coords(n: int, gen: torch.Generator, side: int = 12) -> torch.Tensor:
    """n distinct level-0 tile corners on a side x side tile grid, with a random offset."""
    cells = torch.randperm(side * side, generator=gen)[:n]
    offset = torch.randint(0, 50_000, (1, 2), generator=gen)
    return torch.stack([cells % side, cells // side], dim=1) * TILE_PX + offset


def junk_padded_batch(
    seed: int = 0,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags padded to one length with the padding scattered *between* real tiles, holding huge
    junk features and coordinates far outside every bag."""
    gen = torch.Generator().manual_seed(seed)
    bags = [(torch.randn(n, DIM, generator=gen), grid_coords(n, gen)) for n in LENGTHS]
    width = max(LENGTHS) + 7
    features = 1e4 * torch.randn(len(bags), width, DIM, generator=gen)
    coords = torch.randint(-(10**9), 10**9, (len(bags), width, 2), generator=gen)
    mask = torch.zeros(len(bags), width, dtype=torch.bool)
    for b, (feats, xy) in enumerate(bags):
        slots = torch.randperm(width, generator=gen)[: len(feats)].sort().values
        features[b, slots], coords[b, slots], mask[b, slots] = feats, xy, True
    return bags, features, coords, mask


@pytest.mark.parametrize(
    ("grouping", "with_coords"), [("spatial", True), ("order", True), ("spatial", False)]
)
def test_padding_changes_nothing_and_attention_sums_to_one(
    grouping: str, with_coords: bool
) -> None:
    model = make(grouping)
    bags, features, coords, mask = junk_padded_batch()
    out = model(features, mask, coords if with_coords else None)
    assert torch.all(out.attention[~mask] == 0)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(len(bags)), atol=1e-6)
    assert torch.all(out.tile_scores[~mask] == 0)
    for b, (feats, xy) in enumerate(bags):
        alone = model(
            feats[None],
            torch.ones(1, len(feats), dtype=torch.bool),
            xy[None] if with_coords else None,
        )
        assert torch.allclose(out.logits[b], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.embedding[b], alone.embedding[0], atol=1e-5)
        assert torch.allclose(out.attention[b, mask[b]], alone.attention[0], atol=1e-6)
        assert torch.allclose(out.tile_scores[b, mask[b]], alone.tile_scores[0], atol=1e-5)


def test_logits_are_attention_weighted_tile_scores() -> None:
    model = make()
    _, features, coords, mask = junk_padded_batch(seed=1)
    out = model(features, mask, coords)
    weighted = (out.attention.unsqueeze(-1) * out.tile_scores).sum(dim=1)
    assert torch.allclose(weighted, out.logits, atol=1e-5)


def test_spatial_groups_are_compact_cells_of_each_bags_box() -> None:
    # A 16 x 16 tile bag with a 4 x 4 grid: every cell holds a 4 x 4 block of tiles.
    col, row = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy")
    tiles = torch.stack([col.flatten(), row.flatten()], dim=1)
    coords = torch.stack([tiles * TILE_PX, tiles * TILE_PX + 123_456])  # second bag: shifted
    mask = torch.ones(2, len(tiles), dtype=torch.bool)
    groups = spatial_groups(coords, mask, grid_side=4)
    assert torch.equal(groups[0], groups[1])  # the grid follows each bag's own bounding box
    assert torch.equal(torch.bincount(groups[0], minlength=16), torch.full((16,), 16))
    for g in range(16):
        members = tiles[groups[0] == g]
        assert torch.all(members.amax(0) - members.amin(0) == 3)
    at = {tuple(t.tolist()): int(gr) for t, gr in zip(tiles, groups[0], strict=True)}
    assert at[(0, 0)] == at[(1, 0)] == at[(0, 1)] == at[(1, 1)]
    assert at[(0, 0)] != at[(15, 15)] and at[(15, 0)] != at[(0, 15)]


def test_spatial_groups_ignore_padding_and_take_cells_in_x_then_y() -> None:
    coords = torch.tensor([[[0, 0], [1000, 1000], [10**9, -(10**9)], [0, 1000], [1000, 0]]])
    mask = torch.tensor([[True, True, False, True, True]])
    groups = spatial_groups(coords, mask, grid_side=2)
    assert groups[0].tolist() == [0, 3, 0, 2, 1]


def test_order_groups_share_an_offset_inside_windows() -> None:
    # 64 tiles -> an 8 x 8 square; 4 x 4 windows -> 16 groups of 4 tiles each.
    mask = torch.ones(1, 64, dtype=torch.bool)
    groups = order_groups(mask, window=4)[0]
    assert torch.equal(torch.bincount(groups, minlength=16), torch.full((16,), 4))
    assert groups[0] == groups[4] == groups[32] == groups[36]  # (0,0) (0,4) (4,0) (4,4)
    assert len({int(groups[i]) for i in (0, 1, 2, 3, 8)}) == 5
    # Padding between real tiles does not shift them.
    padded = torch.zeros(1, 80, dtype=torch.bool)
    padded[0, torch.randperm(80, generator=torch.Generator().manual_seed(0))[:64].sort().values] = (
        True
    )
    assert torch.equal(order_groups(padded, window=4)[0, padded[0]], groups)


def test_group_means_average_real_tiles_and_mask_empty_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 9, 3, generator=gen)
    groups = torch.randint(0, 5, (2, 9), generator=gen)
    mask = torch.rand(2, 9, generator=gen) > 0.3
    means, nonempty = group_means(tokens, groups, mask, n_groups=6)
    for b in range(2):
        for g in range(6):
            members = tokens[b, (groups[b] == g) & mask[b]]
            assert bool(nonempty[b, g]) == (len(members) > 0)
            expected = members.mean(0) if len(members) else torch.zeros(3)
            assert torch.allclose(means[b, g], expected, atol=1e-6)


def test_missing_coords_fall_back_to_order_grouping() -> None:
    spatial = make("spatial")
    order = make("order")
    order.load_state_dict(spatial.state_dict())
    _, features, coords, mask = junk_padded_batch(seed=2)
    without = spatial(features, mask, None)
    assert torch.allclose(without.logits, order(features, mask, coords).logits, atol=1e-6)
    assert not torch.allclose(without.logits, spatial(features, mask, coords).logits, atol=1e-4)


def test_heads_per_task() -> None:
    model = make()
    _, features, coords, mask = junk_padded_batch(seed=3)
    assert model.add_task(4) == 2 and model.n_classes_per_task == [2, 3, 4]
    per_task = [model(features, mask, coords, task=t) for t in range(3)]
    assert [out.logits.shape[1] for out in per_task] == [2, 3, 4]
    everything = model(features, mask, coords)
    assert torch.allclose(everything.logits, torch.cat([o.logits for o in per_task], dim=1))
    assert torch.allclose(everything.attention, per_task[0].attention)
    with pytest.raises(ConfigError, match="task=3"):
        model(features, mask, coords, task=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"n_groups": 20}, "perfect square"), ({"embed_dim": 15}, "divisible"),
     ({"grouping": "random"}, "grouping"), ({"dropout": 1.0}, "dropout")],
)  # fmt: skip
def test_bad_configuration_is_rejected(options: dict, message: str) -> None:
    base = {"embed_dim": 16, "n_heads": 2, "n_groups": 16}
    with pytest.raises(ConfigError, match=message):
        GDATMIL(DIM, 2, **{**base, **options})


def test_bad_coords_shape_is_rejected() -> None:
    model = make()
    _, features, coords, mask = junk_padded_batch()
    with pytest.raises(BagBatchError, match="coords"):
        model(features, mask, coords[:, :, :1])


def test_learns_a_simple_mil_task() -> None:
    gen = torch.Generator().manual_seed(0)
    n_train, n_held_out = 128, 32
    features = torch.randn(n_train + n_held_out, 30, DIM, generator=gen)
    coords = torch.randint(0, 20, (*features.shape[:2], 2), generator=gen) * TILE_PX
    target = torch.arange(len(features)) % 2
    for b in target.nonzero().flatten():  # positive bags hold three shifted "tumour" tiles
        features[b, torch.randperm(30, generator=gen)[:3], 0] += 5.0
    mask = torch.ones(features.shape[:2], dtype=torch.bool)
    train, held_out = slice(0, n_train), slice(n_train, None)
    model = make().train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimiser.zero_grad()
        logits = model(features[train], mask[train], coords[train], task=0).logits
        torch.nn.functional.cross_entropy(logits, target[train]).backward()
        optimiser.step()
    model.eval()
    predicted = model(features[held_out], mask[held_out], coords[held_out], task=0).logits.argmax(1)
    assert (predicted == target[held_out]).float().mean() >= 0.85


def test_attention_per_task_pools_once_per_task_with_its_own_pooling() -> None:
    torch.manual_seed(0)
    model = GDATMIL(DIM, [2], embed_dim=16, n_heads=2, n_groups=16, attention_dim=8,
                    dropout=0.0, block_dropout=0.0, attention_per_task=True).eval()  # fmt: skip
    model.add_task(3)
    bags, features, coords, mask = junk_padded_batch(seed=5)
    everything = model(features, mask, coords)
    per_task = [model(features, mask, coords, task=t) for t in range(2)]
    assert everything.attention.shape == (len(bags), features.shape[1], 2)
    assert torch.all(everything.attention[~mask] == 0)
    assert torch.allclose(everything.attention.sum(dim=1), torch.ones(len(bags), 2), atol=1e-6)
    for t, out in enumerate(per_task):
        assert torch.allclose(everything.attention[..., t], out.attention, atol=1e-6)
        assert torch.allclose(everything.embedding[:, t], out.embedding, atol=1e-5)
    assert torch.allclose(everything.logits, torch.cat([o.logits for o in per_task], 1), atol=1e-5)
    assert not torch.allclose(per_task[0].attention, per_task[1].attention)
    assert model.task_modules(1) == [model.heads[1], model.task_poolings[0]]
    assert model.task_modules(0) == [model.heads[0], model.pooling]
    assert not any(target.startswith("pooling") for target in model.lora_targets)
    assert "pooling.gate_proj" in make().lora_targets  # shared pooling: adapted (CoMEL)
    for b, (feats, xy) in enumerate(bags):  # padding changes nothing
        alone = model(feats[None], torch.ones(1, len(feats), dtype=torch.bool), xy[None])
        assert torch.allclose(everything.logits[b], alone.logits[0], atol=1e-5)
