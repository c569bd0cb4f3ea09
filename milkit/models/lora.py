"""LoRA with one adapter per task and OWLoRA's protections (CoMEL, docs/papers.md D.3).

A :class:`LoRALinear` wraps a Linear ``y = W0 x + b`` and adds one low-rank adapter per task::

    y = W0 x + b + Σ_t B_t diag(s_t) A_t x,   A_t: (r, in),  B_t: (out, r),  s_t: (r,)

with ``A_t ~ N(0, 1/r²)``, ``B_t = 0`` and ``s_t = 1`` at creation, so a fresh adapter changes
nothing. :meth:`LoRALinear.add_adapter` freezes ``W0``, ``b`` and every earlier adapter and
makes the new one the only trainable part of the layer.

OWLoRA's protections of the newest adapter (each switchable):

- ``A_t``'s rows are kept orthogonal to the *protected input subspace*: the span of the earlier
  adapters' A rows (``protect_adapters``) and of W0's top right-singular vectors
  (``protect_base``; the fewest that hold ``energy`` of ``Σ σ²``). Then ``A_t x = 0`` for any x
  in it, so the layer's output on such inputs is exactly what it was before task t: the input
  directions W0 and earlier adapters respond to are left alone.
- ``B_t``'s columns are kept orthogonal to the *protected output subspace*: the span of the
  earlier adapters' B columns and of W0's top left-singular vectors. Then the new adapter's
  contribution ``B_t diag(s_t) A_t x`` has no component there, for any input: it never writes
  into the output directions W0 and earlier adapters write to.

:meth:`LoRALinear.project_gradients` removes the protected components from the new adapter's
gradients (the paper's method; call it between ``backward`` and the optimiser step), and
:meth:`LoRALinear.add_adapter` starts ``A_t`` inside the allowed subspace (the random init is
projected too, otherwise its fixed component would keep reading protected inputs once B
grows). Both invariants are then exact for optimisers whose step is a linear function of past
gradients (SGD, momentum). Adam rescales each coordinate and so leaks out of the subspace;
calling :meth:`LoRALinear.project_weights` after every step restores exactness for any optimiser.

These guarantees hold per layer. Through a non-linear network a later layer's new adapter still
reads whatever part of an old task's hidden features lies outside W0's principal inputs, so
with the paper's two protections the model's outputs on old data change less but are not
invariant. milkit adds a third, ``protect_features`` (the representation memory of gradient
projection memory, Saha et al. 2021): after a task, :func:`milkit.models.lora_model.protect_seen_inputs` runs the model
over that task's data and adds to every layer's protected inputs the principal directions of
the inputs that layer actually saw (``feature_energy`` of their energy). A new adapter then
gives ``A_t h ≈ 0`` for the hidden features ``h`` of old data at every layer, so, layer by layer,
the whole model's outputs on old data stay unchanged up to the energy left out
(tests/models/test_lora.py measures all three).

The subspaces are computed once per adapter, when it is added (W0 and earlier adapters are
frozen; the ``protect_*`` switches are read then), and recomputed after ``load_state_dict``. The authors' public code uses a random basis for W0 (a no-op); this
module uses W0's SVD. With both protections off and no penalty, the layers are plain LoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from milkit.errors import ConfigError


def principal_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular directions that hold ``energy`` of ``Σ σ²``.

    Args:
        singular_values: ``(K,)`` singular values in descending order.
        energy: Fraction of the squared singular values to cover, in (0, 1].

    Returns:
        k in ``[0, K]``; 0 for a zero matrix.
    """
    squared = singular_values.double() ** 2
    total = squared.sum()
    if total <= 0:
        return 0
    cumulative = squared.cumsum(0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor([energy], dtype=torch.float64))) + 1
    return min(k, len(singular_values))


def orthonormal_basis(columns: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
    """An orthonormal basis of the span of some column vectors (numerically rank-revealing).

    Args:
        columns: Tensors of shape ``(dim, k_i)``.
        dim: Ambient dimension.

    Returns:
        ``(dim, k)`` float64 with orthonormal columns spanning them; ``(dim, 0)`` if none.
    """
    stacked = [column.detach().double() for column in columns if column.shape[1]]
    if not stacked:
        return torch.zeros(dim, 0, dtype=torch.float64)
    left, singular, _ = torch.linalg.svd(torch.cat(stacked, dim=1), full_matrices=False)
    # Directions below this are float32 rounding of dependent inputs, not real directions.
    return left[:, singular > singular.max().clamp(min=1e-300) * 1e-6]


class LoRALinear(nn.Module):
    """A Linear layer with a list of LoRA adapters and OWLoRA protections (module docstring).

    Attributes:
        base: The wrapped ``nn.Linear`` (``W0``, ``b``).
        lora_A: ``A_t``, each ``(rank, in_features)``.
        lora_B: ``B_t``, each ``(out_features, rank)``.
        lora_scale: ``s_t``, each ``(rank,)``.
        feature_basis: ``(in_features, k)`` orthonormal directions of earlier tasks' inputs.
    """

    # Buffers, declared so that attribute access is typed (not nn.Module.__getattr__'s union).
    feature_basis: torch.Tensor
    _protected_in: torch.Tensor | None
    _protected_out: torch.Tensor | None

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 16,
        *,
        protect_adapters: bool = True,
        protect_base: bool = True,
        energy: float = 0.99,
        protect_features: bool = False,
    ) -> None:
        """Wrap a Linear layer; it has no adapter until :meth:`add_adapter`.

        Args:
            base: The layer to adapt (kept, not copied).
            rank: Adapter rank r.
            protect_adapters: Keep new adapters orthogonal to earlier adapters' subspaces.
            protect_base: Keep new adapters orthogonal to W0's principal subspaces.
            energy: Fraction of W0's squared singular values its principal subspaces cover.
            protect_features: Keep new adapters' inputs orthogonal to the recorded inputs of
                earlier tasks (:meth:`add_protected_inputs`).

        Raises:
            ConfigError: If ``rank`` is not positive or ``energy`` is outside (0, 1].
        """
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"LoRALinear: rank must be > 0, got {rank!r}.")
        if not 0.0 < energy <= 1.0:
            raise ConfigError(f"LoRALinear: energy must be in (0, 1], got {energy!r}.")
        self.base = base
        self.rank = rank
        self.protect_adapters = protect_adapters
        self.protect_base = protect_base
        self.energy = energy
        self.protect_features = protect_features
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.lora_scale = nn.ParameterList()
        # Caches of protected_subspaces(); buffers so that .to() moves them.
        self.register_buffer("_protected_in", None, persistent=False)
        self.register_buffer("_protected_out", None, persistent=False)
        # (in_features, k) orthonormal directions of earlier tasks' inputs; saved with the model.
        self.register_buffer("feature_basis", base.weight.new_zeros(base.in_features, 0))
        self.register_load_state_dict_post_hook(_forget_subspaces)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Take the saved feature basis's shape (it grows with every task) before loading."""
        saved = state_dict.get(prefix + "feature_basis")
        if saved is not None:
            self.feature_basis = self.feature_basis.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def in_features(self) -> int:
        """Input size of the layer."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output size of the layer."""
        return self.base.out_features

    @property
    def n_adapters(self) -> int:
        """Number of adapters (tasks after the first)."""
        return len(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b + Σ_t B_t diag(s_t) A_t x``.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        out = self.base(x)
        for a, b, scale in zip(self.lora_A, self.lora_B, self.lora_scale, strict=True):
            out = out + F.linear(F.linear(x, a) * scale, b)
        return out

    def add_adapter(self, warn: bool = True) -> int:
        """Freeze W0, b and all adapters, and append a new trainable adapter.

        The new ``A`` starts orthogonal to the protected input subspace (module docstring).

        Args:
            warn: Warn when the protections leave fewer free directions than the rank
                (:func:`milkit.models.lora_model.add_lora_adapters` warns once for all layers).

        Returns:
            The new adapter's index.
        """
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        weight = self.base.weight
        device, dtype = weight.device, weight.dtype
        self.lora_A.append(
            nn.Parameter(
                torch.randn(self.rank, self.in_features, device=device, dtype=dtype) / self.rank
            )
        )
        self.lora_B.append(
            nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))
        )
        self.lora_scale.append(nn.Parameter(torch.ones(self.rank, device=device, dtype=dtype)))
        _forget_subspaces(self)
        self.project_weights()
        free_in, free_out = self.free_directions()
        if warn and min(free_in, free_out) < self.rank:
            warnings.warn(
                f"LoRALinear({self.in_features} -> {self.out_features}): the protections leave "
                f"{free_in} input and {free_out} output directions free for a rank-{self.rank} "
                "adapter, which can only learn within them; lower energy or switch a protection "
                "off if the new task does not learn.",
                stacklevel=2,
            )
        return self.n_adapters - 1

    def free_directions(self) -> tuple[int, int]:
        """Input and output directions the newest adapter may use (outside the protections)."""
        basis_in, basis_out = self.protected_subspaces()
        return self.in_features - basis_in.shape[1], self.out_features - basis_out.shape[1]

    def protected_subspaces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal bases of the subspaces the newest adapter must stay orthogonal to.

        "Earlier adapters" are all but the newest; with no adapter, only W0 counts.

        Returns:
            ``(in_features, k_in)`` input basis (earlier A rows, W0's top right-singular
            vectors, earlier tasks' input directions) and ``(out_features, k_out)`` output
            basis (earlier B columns, W0's top left-singular vectors), on the weight's device
            and dtype; ``k = 0`` when nothing is protected on that side.
        """
        if self._protected_in is None or self._protected_out is None:
            inputs: list[torch.Tensor] = []
            outputs: list[torch.Tensor] = []
            if self.protect_base:
                left, singular, right_t = torch.linalg.svd(
                    self.base.weight.detach().double(), full_matrices=False
                )
                k = principal_rank(singular, self.energy)
                inputs.append(right_t[:k].T)
                outputs.append(left[:, :k])
            if self.protect_adapters:
                inputs += [a.T for a in list(self.lora_A)[:-1]]
                outputs += list(self.lora_B)[:-1]
            if self.protect_features:
                inputs.append(self.feature_basis)
            weight = self.base.weight
            self._protected_in = orthonormal_basis(inputs, self.in_features).to(weight)
            self._protected_out = orthonormal_basis(outputs, self.out_features).to(weight)
        return self._protected_in, self._protected_out

    @torch.no_grad()
    def add_protected_inputs(self, gram: torch.Tensor, energy: float) -> int:
        """Add the principal directions of some inputs to :attr:`feature_basis`.

        Args:
            gram: ``(in_features, in_features)`` ``Σ x xᵀ`` over the inputs the layer saw.
            energy: Fraction of ``Σ |x|²`` the added directions must hold, in (0, 1].

        Returns:
            The number of protected feature directions afterwards.
        """
        eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())  # ascending
        eigenvalues = eigenvalues.flip(0).clamp(min=0.0)
        k = principal_rank(eigenvalues.sqrt(), energy)
        directions = eigenvectors.flip(1)[:, :k]
        basis = orthonormal_basis([self.feature_basis, directions], self.in_features)
        self.feature_basis = basis.to(self.base.weight)
        _forget_subspaces(self)
        return self.feature_basis.shape[1]

    def _remove_protected(self, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """In place: ``a (r, in)`` rows and ``b (out, r)`` columns minus their protected parts."""
        basis_in, basis_out = self.protected_subspaces()
        if a is not None:
            a.sub_((a @ basis_in) @ basis_in.T)
        if b is not None:
            b.sub_(basis_out @ (basis_out.T @ b))

    def project_gradients(self) -> None:
        """Project the newest adapter's A and B gradients off the protected subspaces.

        Call between ``backward`` and the optimiser step. No-op without adapters.
        """
        if self.n_adapters:
            self._remove_protected(self.lora_A[-1].grad, self.lora_B[-1].grad)

    @torch.no_grad()
    def project_weights(self) -> None:
        """Project the newest adapter's A and B themselves off the protected subspaces.

        Call after the optimiser step to keep the invariants exact with Adam-like optimisers.
        No-op without adapters.
        """
        if self.n_adapters:
            self._remove_protected(self.lora_A[-1], self.lora_B[-1])

    def orthogonality_penalty(self) -> torch.Tensor:
        """OWLoRA's penalty on the newest adapter: ``(‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F) / r²``.

        Returns:
            A differentiable scalar; 0 without adapters.
        """
        if not self.n_adapters:
            return self.base.weight.new_zeros(())
        a, b = self.lora_A[-1], self.lora_B[-1]
        eye = torch.eye(self.rank, device=a.device, dtype=a.dtype)
        gram_a = ((a @ a.T - eye) ** 2).sum()
        gram_b = ((b.T @ b - eye) ** 2).sum()
        return (gram_a + gram_b) / self.rank**2

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return (
            f"rank={self.rank}, adapters={self.n_adapters}, protect_adapters="
            f"{self.protect_adapters}, protect_base={self.protect_base}, energy={self.energy}, "
            f"protect_features={self.protect_features}"
        )


def _forget_subspaces(module: LoRALinear, *_: object) -> None:
    """Drop the cached protected subspaces (new adapter, or W0 / adapters loaded)."""
    module._protected_in = None
    module._protected_out = None
