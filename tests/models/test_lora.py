"""LoRA adapters and OWLoRA's protections: exact algebra, projections, and what stays invariant."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from milkit.errors import ConfigError
from milkit.models.gdat import GDATMIL
from milkit.models.lora import LoRALinear, principal_rank
from milkit.models.lora_model import (
    add_lora_adapters,
    apply_lora,
    lora_layers,
    lora_orthogonality_penalty,
    project_lora_gradients,
    project_lora_weights,
    protect_seen_inputs,
)

RANK = 4
D_IN, D_OUT = 24, 20  # single-layer tests


def layer_with_trained_adapter(seed: int = 0, **options: object) -> LoRALinear:
    """A LoRALinear whose first adapter holds random (as if trained) values.

    ``energy`` defaults to 0.5 so that W0's principal subspaces of a random W0 stay partial.
    """
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), rank=RANK, **{"energy": 0.5, **options})
    layer.add_adapter()
    with torch.no_grad():
        layer.lora_A[0].normal_()
        layer.lora_B[0].normal_()
        layer.lora_scale[0].uniform_(0.5, 2.0)
    return layer


def test_fresh_adapter_leaves_the_output_exactly_unchanged() -> None:
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), rank=RANK, energy=0.5)
    x = torch.randn(7, D_IN)
    plain = layer.base(x)
    layer.add_adapter()
    assert torch.equal(layer(x), plain)
    trained = layer_with_trained_adapter()
    before = trained(x)
    trained.add_adapter()
    assert torch.equal(trained(x), before)


def test_output_is_base_plus_sum_of_adapters() -> None:
    layer = layer_with_trained_adapter(protect_adapters=False, protect_base=False)
    layer.add_adapter()
    with torch.no_grad():
        layer.lora_B[1].normal_()
    x = torch.randn(7, D_IN)
    weight = layer.base.weight + sum(
        b @ torch.diag(s) @ a
        for a, b, s in zip(layer.lora_A, layer.lora_B, layer.lora_scale, strict=True)
    )
    assert torch.allclose(layer(x), F.linear(x, weight, layer.base.bias), atol=1e-5)
    with torch.no_grad():
        for b in layer.lora_B:
            b.zero_()
    assert torch.equal(layer(x), layer.base(x))


def test_add_adapter_trains_only_the_newest_adapter() -> None:
    layer = layer_with_trained_adapter()
    assert layer.add_adapter() == 1
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.1", "lora_B.1", "lora_scale.1"}


def test_orthogonality_penalty() -> None:
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), rank=RANK, protect_base=False)
    assert layer.orthogonality_penalty().item() == 0.0
    layer.add_adapter()
    a = torch.linalg.qr(torch.randn(D_IN, RANK))[0].T  # orthonormal rows
    b = torch.linalg.qr(torch.randn(D_OUT, RANK))[0]  # orthonormal columns
    with torch.no_grad():
        layer.lora_A[0].copy_(a)
        layer.lora_B[0].copy_(b)
    assert layer.orthogonality_penalty().item() < 1e-10
    with torch.no_grad():
        layer.lora_A[0].mul_(2.0)  # A Aᵀ = 4 I: ‖3 I‖² / r² = 9 r / r²
    assert layer.orthogonality_penalty().item() == pytest.approx(9.0 / RANK, rel=1e-5)
    penalty = layer.orthogonality_penalty()
    penalty.backward()
    assert layer.lora_A[0].grad.abs().sum() > 0


def test_principal_rank_covers_the_requested_energy() -> None:
    singular = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [principal_rank(singular, e) for e in (0.5, 0.64, 0.9, 0.99, 1.0)] == [1, 1, 2, 3, 3]
    assert principal_rank(torch.zeros(3), 0.99) == 0


def reference_basis(columns: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis of the span of the given column blocks, computed with scipy."""
    return torch.from_numpy(scipy.linalg.orth(torch.cat(columns, 1).double().numpy()))


def principal_bases(weight: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top left/right singular vectors of W holding ``energy`` of Σσ², via numpy."""
    u, s, vt = np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)
    k = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= energy)) + 1
    return torch.from_numpy(vt[:k].T), torch.from_numpy(u[:, :k])


@pytest.mark.parametrize(
    ("protect_adapters", "protect_base"), [(True, True), (True, False), (False, True)]
)
def test_project_gradients_removes_exactly_the_protected_components(
    protect_adapters: bool, protect_base: bool
) -> None:
    layer = layer_with_trained_adapter(protect_adapters=protect_adapters, protect_base=protect_base)
    layer.add_adapter()
    a_old, b_old = layer.lora_A[0].detach().double(), layer.lora_B[0].detach().double()
    right, left = principal_bases(layer.base.weight, 0.5)
    assert 0 < right.shape[1] < D_OUT // 2  # a real, partial principal subspace
    protected_in = ([right] if protect_base else []) + ([a_old.T] if protect_adapters else [])
    protected_out = ([left] if protect_base else []) + ([b_old] if protect_adapters else [])
    basis_in, basis_out = reference_basis(protected_in), reference_basis(protected_out)

    grad_a, grad_b = torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK)
    layer.lora_A[1].grad, layer.lora_B[1].grad = grad_a.clone(), grad_b.clone()
    layer.project_gradients()
    new_a, new_b = layer.lora_A[1].grad.double(), layer.lora_B[1].grad.double()
    assert new_a.norm() > 0.1 and new_b.norm() > 0.1  # free directions remain on both sides

    for block in protected_in:  # rows of the A update are orthogonal to every protected input
        assert (new_a @ block).abs().max() < 1e-5
    for block in protected_out:  # columns of the B update are orthogonal to every protected output
        assert (block.T @ new_b).abs().max() < 1e-5
    # ... and only the protected components were removed (orthogonal projection).
    expected_a = grad_a.double() - grad_a.double() @ basis_in @ basis_in.T
    expected_b = grad_b.double() - basis_out @ basis_out.T @ grad_b.double()
    assert torch.allclose(new_a, expected_a, atol=1e-5)
    assert torch.allclose(new_b, expected_b, atol=1e-5)
    if not protect_base:  # switched off: W0's directions are not removed
        assert (new_a @ right).abs().max() > 1e-2
    if not protect_adapters:
        assert (new_a @ a_old.T).abs().max() > 1e-2


def test_new_adapter_starts_outside_the_protected_input_subspace() -> None:
    layer = layer_with_trained_adapter()
    layer.add_adapter()
    basis_in, _ = layer.protected_subspaces()
    assert basis_in.shape[1] > RANK  # W0's directions and the earlier adapter's rows
    assert (layer.lora_A[1] @ basis_in).abs().max() < 1e-6
    assert layer.lora_A[1].norm() > 0.1


def test_protected_subspaces_follow_a_loaded_state_dict() -> None:
    source = layer_with_trained_adapter(seed=0)
    source.add_adapter()
    target = layer_with_trained_adapter(seed=1)
    target.add_adapter()
    stale = target.protected_subspaces()[0].clone()
    target.load_state_dict(source.state_dict())
    loaded, expected = target.protected_subspaces()[0], source.protected_subspaces()[0]
    projector = loaded @ loaded.T
    assert torch.allclose(projector, expected @ expected.T, atol=1e-5)
    assert not torch.allclose(projector, stale @ stale.T, atol=1e-2)


def test_apply_lora_adapts_gdat_targets_but_not_the_heads() -> None:
    torch.manual_seed(0)
    model = GDATMIL(8, [2, 3], embed_dim=16, n_heads=2, n_groups=16, attention_dim=8).eval()
    features, mask = torch.randn(2, 20, 8), torch.ones(2, 20, dtype=torch.bool)
    before = model(features, mask).logits
    layers = apply_lora(model, rank=RANK)
    names = {name for name, sub in model.named_modules() if isinstance(sub, LoRALinear)}
    per_block = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    expected = {"embed.0", "pooling.tanh_proj", "pooling.gate_proj"} | {
        f"blocks.{i}.{layer}" for i in range(2) for layer in per_block
    }
    assert names == expected and len(layers) == len(expected)
    assert all(type(head) is nn.Linear for head in model.heads)
    with pytest.warns(UserWarning, match="directions free"):  # random W0 spreads its energy
        add_lora_adapters(model)
    assert torch.equal(model(features, mask).logits, before)
    assert lora_orthogonality_penalty(model).item() > 0
    with pytest.raises(ConfigError, match="match no Linear"):
        apply_lora(model, ["blocks.*.attn.qkv"])  # already adapted


def test_apply_lora_rejects_bad_targets() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="no target patterns"):
        apply_lora(model)
    with pytest.raises(ConfigError, match=r"\['head'\]"):
        apply_lora(model, ["0", "head"])
    with pytest.raises(ConfigError, match="apply_lora"):
        add_lora_adapters(model)


# --- the key property: what OWLoRA keeps invariant while a later task trains -----------------

IN, HIDDEN, OUT = 16, 32, 8


def task_data(seed: int, input_rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear regression data; inputs confined to a random ``input_rank``-dim subspace if given."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(256, input_rank or IN, generator=gen)
    basis = torch.linalg.qr(torch.randn(IN, input_rank, generator=gen))[0] if input_rank else None
    x = z @ basis.T if basis is not None else z
    return x, z @ torch.randn(z.shape[1], OUT, generator=gen) / 2


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimiser: str, steps: int = 200
) -> float:
    """Train the trainable parameters with the OWLoRA hooks (no-ops for an unprotected model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimiser == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        project_lora_gradients(model)
        opt.step()
        if optimiser == "adam":  # Adam's per-coordinate scaling leaks out of the subspace
            project_lora_weights(model)
    return F.mse_loss(model(x), y).item()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input every LoRA layer sees when the model runs on x."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
        for layer in lora_layers(model)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after - before).norm() / before.norm()).item()


@pytest.fixture(scope="module")
def task1_model() -> nn.Sequential:
    """A two-layer LoRA'd MLP trained on task 1 (whole model, no adapters yet)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    with torch.no_grad():  # small init: W0's principal subspaces then come from task 1's data
        for p in model.parameters():
            p.mul_(0.01)
    apply_lora(model, ["0", "2"], rank=RANK)
    x1, y1 = task_data(1, input_rank=4)
    assert fit(model, x1, y1, "sgd", steps=300) < 0.05
    return model


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
def test_projection_keeps_outputs_on_protected_inputs(
    task1_model: nn.Sequential, optimiser: str
) -> None:
    model = task1_model
    x1, _ = task_data(1, input_rank=4)
    arms = {}
    for protect in (True, False):
        arm = copy.deepcopy(model)
        for layer in lora_layers(arm):
            layer.protect_base = layer.protect_adapters = protect
        arms[protect] = arm
    for arm in arms.values():
        add_lora_adapters(arm)
    # Task-1 inputs of each layer, projected onto that layer's protected input subspace.
    bases = [layer.protected_subspaces() for layer in lora_layers(arms[True])]
    for basis_in, basis_out in bases:  # the protections leave room to learn on both sides
        assert 0 < basis_in.shape[1] <= IN - RANK and 0 < basis_out.shape[1] <= OUT - RANK
    probes = [
        h @ b_in @ b_in.T for h, (b_in, _) in zip(layer_inputs(model, x1), bases, strict=True)
    ]
    first_in, last_out = bases[0][0], bases[-1][1]
    x1_protected = x1 @ first_in @ first_in.T

    x2, y2 = task_data(2, input_rank=None)
    changes = {}
    for protect, arm in arms.items():
        layers = lora_layers(arm)
        layer_before = [layer(p).detach() for layer, p in zip(layers, probes, strict=True)]
        out_before = arm(x1_protected).detach()
        start = F.mse_loss(arm(x2), y2).item()
        assert fit(arm, x2, y2, optimiser) < 0.3 * start  # the new adapters do learn task 2
        changes[protect] = {
            "layers": [
                relative_change(layer(p), before)
                for layer, p, before in zip(layers, probes, layer_before, strict=True)
            ],
            "protected_output": relative_change(
                arm(x1_protected) @ last_out, out_before @ last_out
            ),
            "output": relative_change(arm(x1_protected), out_before),
        }
    on, off = changes[True], changes[False]
    # Exact invariants: each layer's output on its protected inputs, and the model's output
    # component in the last layer's protected output subspace for inputs in the first layer's.
    assert max(on["layers"]) < 1e-4 and min(off["layers"]) > 0.3
    assert on["protected_output"] < 1e-4 and off["protected_output"] > 0.3
    # The whole output is not invariant: the last layer's new adapter reads the hidden features
    # of task-1 inputs (not confined to its W0's principal inputs) and writes into its free
    # output directions. It still changes clearly less than without the protections.
    assert on["output"] < 0.5 * off["output"]

    # Task 3: the task-2 adapters' rows join the protected inputs, and stay protected.
    protected = arms[True]
    with pytest.warns(UserWarning, match="directions free"):  # last layer: outputs all taken
        add_lora_adapters(protected)
    first = lora_layers(protected)[0]
    basis_in, _ = first.protected_subspaces()
    assert basis_in.shape[1] == bases[0][0].shape[1] + RANK
    probe = x2 @ basis_in @ basis_in.T
    before = first(probe).detach()
    x3, y3 = task_data(3, input_rank=None)
    fit(protected, x3, y3, optimiser)
    assert relative_change(first(probe), before) < 1e-4


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
def test_feature_protection_keeps_the_whole_model_unchanged_on_old_data(
    task1_model: nn.Sequential, optimiser: str
) -> None:
    torch.manual_seed(0)
    x1, _ = task_data(1, input_rank=4)
    x2, y2 = task_data(2, input_rank=None)
    changes, kept, learnt = {}, {}, {}
    for protect_features in (True, False):
        arm = copy.deepcopy(task1_model)
        for layer in lora_layers(arm):
            layer.protect_features = protect_features
        kept[protect_features] = protect_seen_inputs(arm, lambda arm=arm: arm(x1), energy=0.9999)
        before = arm(x1).detach()
        add_lora_adapters(arm)
        start = F.mse_loss(arm(x2), y2).item()
        learnt[protect_features] = fit(arm, x2, y2, optimiser) / start
        changes[protect_features] = relative_change(arm(x1), before)
    # The first layer sees task 1's 4-dim input subspace; the second, tanh features of it.
    assert kept[True][0] == 4 and 4 < kept[True][1] <= HIDDEN - RANK
    assert kept[False] == [0, 0]
    # W0 and adapter protections alone (the paper's) let the output on old data move by
    # 0.2-0.4; protecting what each layer saw keeps it to the energy left out (1e-4 here).
    assert changes[True] < 0.03 and changes[False] > 0.15, changes
    assert learnt[True] < 0.6, learnt  # the new adapters still learn task 2


@pytest.mark.filterwarnings("ignore:LoRALinear.*directions free")  # fresh W0: outputs all taken
def test_feature_basis_is_saved_and_loaded_with_the_model(task1_model: nn.Sequential) -> None:
    model = copy.deepcopy(task1_model)
    for layer in lora_layers(model):
        layer.protect_features = True
    x1, _ = task_data(1, input_rank=4)
    protect_seen_inputs(model, lambda: model(x1), energy=0.999)
    add_lora_adapters(model)
    fresh = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    apply_lora(fresh, ["0", "2"], rank=RANK, protect_features=True)
    add_lora_adapters(fresh)
    fresh.load_state_dict(model.state_dict())
    for loaded, saved in zip(lora_layers(fresh), lora_layers(model), strict=True):
        torch.testing.assert_close(loaded.feature_basis, saved.feature_basis)
        torch.testing.assert_close(loaded.protected_subspaces()[0], saved.protected_subspaces()[0])
    with pytest.raises(ConfigError, match="energy"):
        protect_seen_inputs(model, lambda: model(x1), energy=0.0)
