"""milkit.models: plain nn.Modules for multiple-instance learning over padded bags of tiles.

Every model takes ``features (B, N, D)``, ``mask (B, N)`` (True = real tile) and ``coords
(B, N, 2)`` and returns a :class:`MILOutput` (docs/design.md §6; the contract is
:mod:`milkit.models.contract`). No Lightning, losses or files here.
"""

from milkit.models.abmil import ABMIL
from milkit.models.contract import MILModel, MILModelBase, MultiTaskMILModel
from milkit.models.dsmil import DSMIL, critical_instance_logits, critical_instances
from milkit.models.gdat import GDATMIL
from milkit.models.lora import LoRALinear
from milkit.models.lora_model import apply_lora
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    AttentionPooling,
    GatedAttentionPooling,
    Pooled,
    attention_pool,
    masked_softmax,
)
from milkit.models.regression import TileScoreRegressor

__all__ = [
    "ABMIL",
    "DSMIL",
    "GDATMIL",
    "LoRALinear",
    "apply_lora",
    "AttentionPooling",
    "GatedAttentionPooling",
    "MILModel",
    "MILModelBase",
    "MILOutput",
    "MultiTaskMILModel",
    "Pooled",
    "TileScoreRegressor",
    "attention_pool",
    "critical_instance_logits",
    "critical_instances",
    "masked_softmax",
]
