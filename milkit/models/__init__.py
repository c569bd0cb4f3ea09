"""milkit.models: plain nn.Modules for multiple-instance learning over padded bags of tiles.

Every model takes ``features (B, N, D)`` and ``mask (B, N)`` (True = real tile) and returns a
:class:`MILOutput` (design.md §6). No Lightning, losses or files here.
"""

from milkit.models.abmil import ABMIL
from milkit.models.dsmil import DSMIL, critical_instance_logits, critical_instances
from milkit.models.gdat import GDATMIL
from milkit.models.lora import LoRALinear
from milkit.models.lora_model import apply_lora
from milkit.models.output import MILOutput
from milkit.models.pooling import (
    AttentionPooling,
    BagBatchError,
    GatedAttentionPooling,
    Pooled,
    attention_pool,
    masked_softmax,
    pad_bags,
)
from milkit.models.regression import TileScoreRegressor

__all__ = [
    "ABMIL",
    "DSMIL",
    "GDATMIL",
    "LoRALinear",
    "apply_lora",
    "AttentionPooling",
    "BagBatchError",
    "GatedAttentionPooling",
    "MILOutput",
    "Pooled",
    "TileScoreRegressor",
    "attention_pool",
    "critical_instance_logits",
    "critical_instances",
    "masked_softmax",
    "pad_bags",
]
