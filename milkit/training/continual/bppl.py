"""BPPL: bag-prototype pseudo-labelling of tiles from slide labels (CoMEL; docs/papers.md D.2).

Works with any attention-MIL model: it needs the pooling's attention ``a (B, N)``, the tiles'
representations ``h (B, N, K)``, the bag logits and the bag labels. For a *positive* training bag
that the model classifies correctly with confidence above ``bag_threshold`` (τ₁):

1. prototypes: positive ``z⁺ = Σ a_i h_i`` (the bag embedding when ``h`` are the pooled
   instance embeddings), negative ``z⁻ = Σ (1 − a_i) h_i / Σ (1 − a_i)``;
2. each tile's pseudo-label and confidence come from ``softmax([cos(h_i, z⁺), cos(h_i, z⁻)] / T)``
   (label 1 where the positive prototype wins); tiles with confidence above τ₂ are kept;
3. the instance loss is the BCE between ``p_i`` (the attention min-max normalised within the
   bag, so it stays differentiable) and the kept pseudo-labels, times ``weight``.

Negative bags and unconfident bags add no instance loss. τ₂ starts at ``instance_threshold``
and, with ``adapt``, becomes after every epoch the mean pseudo-label confidence over the tiles
of the bags selected in that epoch ("the mean confidence of correct bags"; unchanged after an
epoch without such bags). Pseudo-labels are targets: they are computed without gradients.

Choices beyond the paper (unconfirmed): ``h`` defaults to the tile features (any model has them;
pass the pooled instance embeddings where a model exposes them), the temperature ``T`` (1 =
the paper's plain softmax), and multi-head attention ``(B, N, H)`` averaged over heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from milkit.errors import ConfigError

_EPS = 1e-6


@dataclass
class BPPL:
    """Bag-prototype pseudo-labelling (module docstring); holds τ₂ as state across epochs.

    Args:
        weight: Weight of the instance loss (the paper's 1); 0 switches BPPL off.
        bag_threshold: τ₁, the least probability of the true class for a bag to be used.
        instance_threshold: Initial τ₂, the least pseudo-label confidence of a kept tile.
        adapt: Update τ₂ after every epoch from the confidences seen (else it stays fixed).
        temperature: Temperature T of the softmax over the two cosine similarities.
    """

    weight: float = 1.0
    bag_threshold: float = 0.95
    instance_threshold: float = 0.5
    adapt: bool = True
    temperature: float = 1.0
    threshold: float = field(init=False)
    _confidence_sum: float = field(init=False, repr=False)
    _confidence_count: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Check the options and start τ₂ at ``instance_threshold``.

        Raises:
            ConfigError: A negative weight, thresholds outside [0, 1) or a non-positive
                temperature.
        """
        if self.weight < 0 or self.temperature <= 0:
            raise ConfigError(
                f"BPPL: weight must be >= 0 and temperature > 0, got {self.weight} and "
                f"{self.temperature}; fix --bppl.weight / --bppl.temperature."
            )
        for name in ("bag_threshold", "instance_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"BPPL: {name} must be in [0, 1), got {getattr(self, name)}.")
        self.reset()

    @property
    def enabled(self) -> bool:
        """Whether BPPL adds anything to the loss (``weight > 0``)."""
        return self.weight > 0

    def reset(self) -> None:
        """Start over: τ₂ back to ``instance_threshold`` (e.g. at the start of a new task)."""
        self.threshold = self.instance_threshold
        self._confidence_sum = 0.0
        self._confidence_count = 0

    def end_epoch(self) -> float:
        """Adapt τ₂ to the mean confidence of the epoch's selected tiles (with ``adapt``).

        Returns:
            τ₂ for the next epoch.
        """
        if self.adapt and self._confidence_count:
            self.threshold = self._confidence_sum / self._confidence_count
        self._confidence_sum = 0.0
        self._confidence_count = 0
        return self.threshold

    def loss(
        self,
        attention: torch.Tensor,
        instances: torch.Tensor,
        mask: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        positive: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted instance loss of a training batch (and τ₂ statistics for the epoch).

        Args:
            attention: ``(B, N)`` or ``(B, N, H)`` attention of the pooling (0 on padding).
            instances: ``(B, N, K)`` tile representations ``h_i`` (e.g. the tile features).
            mask: ``(B, N)`` bool, True for real tiles.
            logits: ``(B, C)`` bag logits over the bag's own classes (other classes may be
                ``-inf``, as for one task of a multi-head model).
            targets: ``(B,)`` int64 true class index into ``logits``.
            positive: ``(B,)`` bool, True for bags of a positive class (tumour, not normal).

        Returns:
            A scalar: ``weight · BCE`` over the kept tiles, 0 (still part of the graph) when
            no bag or tile qualifies.
        """
        scores = attention.mean(dim=-1) if attention.dim() == 3 else attention
        zero = scores.sum() * 0.0
        if not self.enabled:
            return zero
        with torch.no_grad():
            probabilities = logits.detach().float().softmax(dim=-1)
            true_probability = probabilities.gather(1, targets[:, None]).squeeze(1)
            correct = probabilities.argmax(dim=-1) == targets
            chosen = positive & correct & (true_probability > self.bag_threshold)
        if not chosen.any():
            return zero
        scores, keep_tiles = scores[chosen], mask[chosen]
        with torch.no_grad():
            labels, confidence = pseudo_labels(
                scores.detach().float(),
                instances[chosen].detach().float(),
                keep_tiles,
                self.temperature,
            )
            self._confidence_sum += float(confidence[keep_tiles].sum())
            self._confidence_count += int(keep_tiles.sum())
            kept = keep_tiles & (confidence > self.threshold)
        if not kept.any():
            return zero
        normalised = minmax_within_bags(scores.float(), keep_tiles).clamp(_EPS, 1.0 - _EPS)
        return self.weight * F.binary_cross_entropy(normalised[kept], labels[kept])


def pseudo_labels(
    attention: torch.Tensor, instances: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels of tiles from their similarity to the bag's two prototypes.

    Args:
        attention: ``(B, N)`` attention, 0 on padding.
        instances: ``(B, N, K)`` tile representations.
        mask: ``(B, N)`` bool, True for real tiles.
        temperature: Softmax temperature over the two cosine similarities.

    Returns:
        ``(B, N)`` float labels (1 where the positive prototype is closer) and ``(B, N)``
        confidences in [0.5, 1] (0 on padding).
    """
    weights = attention * mask
    clean = instances * mask.unsqueeze(-1)
    positive = (weights.unsqueeze(-1) * clean).sum(dim=1)
    inverse = (1.0 - weights) * mask
    negative = (inverse.unsqueeze(-1) * clean).sum(dim=1) / inverse.sum(dim=1, keepdim=True).clamp(
        min=_EPS
    )
    similarity = torch.stack(
        [
            F.cosine_similarity(clean, positive.unsqueeze(1), dim=-1, eps=_EPS),
            F.cosine_similarity(clean, negative.unsqueeze(1), dim=-1, eps=_EPS),
        ],
        dim=-1,
    )
    positive_probability = (similarity / temperature).softmax(dim=-1)[..., 0]
    labels = (positive_probability > 0.5).float()
    confidence = torch.maximum(positive_probability, 1.0 - positive_probability) * mask
    return labels, confidence


def minmax_within_bags(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalise scores over each bag's real tiles (differentiable).

    Args:
        scores: ``(B, N)`` scores.
        mask: ``(B, N)`` bool, True for real tiles.

    Returns:
        ``(B, N)`` in [0, 1] on real tiles (0 for a bag whose tiles all score the same), 0 on
        padding.
    """
    low = scores.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)
    high = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
    normalised = (scores - low) / (high - low).clamp(min=_EPS)
    return normalised.masked_fill(~mask, 0.0)
