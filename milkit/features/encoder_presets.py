"""The named pathology encoders (``uni``, ``virchow2`` ...): where their weights live, how to
feed them and under which licence. :func:`milkit.features.encoders.load_encoder` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from timm.layers import SwiGLUPacked
from torch import nn

Pooling = Literal["timm", "cls", "cls+mean"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """A named pathology encoder: where its weights live and how to feed it.

    Attributes:
        name: Preset name (``uni``, ``virchow2`` ...).
        architecture: timm registry name that builds the same network without the hub.
        hub_id: Hugging Face repo holding timm weights; None when ``architecture`` carries a timm
            pretrained tag that timm resolves itself.
        timm_kwargs: Keyword arguments the model card passes to ``timm.create_model``.
        arch_kwargs: Arguments the hub's ``config.json`` supplies; added only when building from
            ``architecture`` (random init, ``--encoder-weights``).
        input_size: Model input (H, W) in pixels.
        mean: Per-channel normalisation mean (RGB, inputs scaled to [0, 1]).
        std: Per-channel normalisation standard deviation.
        embed_dim: Length D of one tile embedding.
        pooling: ``cls`` (class token) or ``cls+mean`` (class token ++ mean of patch tokens).
        gated: Whether the hub asks users to request access first.
        licence: Licence of the weights (check the model page before commercial use).
        timm_loadable: False when the published weights are not a timm checkpoint.
        note: What is unverified or special about this preset.
    """

    name: str
    architecture: str
    hub_id: str | None
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    pooling: Pooling
    gated: bool
    licence: str
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    timm_loadable: bool = True
    note: str = ""


def _vit(
    name: str, architecture: str, hub_id: str | None, embed_dim: int, **kw: Any
) -> EncoderSpec:
    """Preset for a 224-px ViT with ImageNet normalisation and CLS pooling unless overridden."""
    defaults: dict[str, Any] = dict(
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls"
    )
    return EncoderSpec(name, architecture, hub_id, embed_dim=embed_dim, **(defaults | kw))


_KAIKO_NOTE = "mean/std 0.5 and CLS pooling from the 1aurent timm port's model card."
_PRESET_LIST = (
    _vit("uni", "vit_large_patch16_224", "MahmoodLab/UNI", 1024, gated=True,
         licence="CC-BY-NC-ND-4.0", timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
         arch_kwargs={"img_size": 224}),
    _vit("uni2-h", "vit_giant_patch14_224", "MahmoodLab/UNI2-h", 1536, gated=True,
         licence="CC-BY-NC-ND-4.0",
         timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                      "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                      "no_embed_class": True, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU,
                      "reg_tokens": 8, "dynamic_img_size": True}),
    _vit("virchow2", "vit_huge_patch14_224", "paige-ai/Virchow2", 2560, pooling="cls+mean",
         gated=True, licence="CC-BY-NC-ND-4.0",
         timm_kwargs={"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU},
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                      "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True},
         note="arch_kwargs recalled from the hub config.json (631M parameters), not re-read."),
    _vit("h-optimus-0", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0", 1536,
         mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), gated=True,
         licence="Apache-2.0", timm_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
         arch_kwargs={"img_size": 224, "global_pool": "token"},
         note="gated=True (access form on the hub) is unverified."),
    _vit("phikon-v2", "vit_large_patch16_224", "owkin/phikon-v2", 1024, gated=False,
         licence="Owkin non-commercial", arch_kwargs={"img_size": 224, "init_values": 1e-5},
         timm_loadable=False,
         note="Published as a transformers Dinov2Model, not timm; no timm port is known to "
         "milkit. Random init builds a timm ViT-L/16 of the same size."),
    _vit("gigapath", "vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath", 1536, gated=True,
         licence="Apache-2.0 (hub access conditions apply)",
         arch_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                      "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
         note="The model card resizes to 256 and centre-crops 224; milkit resizes the tile to 224."),
    _vit("lunit-dino-vits16", "vit_small_patch16_224", "1aurent/vit_small_patch16_224.lunit_dino",
         384, mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464),
         gated=False, licence="lunit-non-commercial", note="Community timm port of Lunit's weights."),
    _vit("kaiko-vits16", "vit_small_patch16_224",
         "1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms", 384,
         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), gated=False, licence="kaiko-non-commercial",
         timm_kwargs={"dynamic_img_size": True}, note=_KAIKO_NOTE),
    _vit("kaiko-vitb16", "vit_base_patch16_224",
         "1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms", 768,
         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), gated=False, licence="kaiko-non-commercial",
         timm_kwargs={"dynamic_img_size": True}, note=_KAIKO_NOTE),
    _vit("dino-vits16", "vit_small_patch16_224.dino", None, 384, gated=False,
         licence="Apache-2.0", note="ImageNet DINO weights (not pathology); a baseline."),
)  # fmt: skip
PRESETS: Mapping[str, EncoderSpec] = {spec.name: spec for spec in _PRESET_LIST}


def list_presets() -> list[EncoderSpec]:
    """Return the named encoder presets, in documentation order."""
    return list(_PRESET_LIST)


def presets_help() -> str:
    """One line per preset (name, dim, hub repo, gated, licence) for ``--help`` and docs."""
    return "\n".join(
        f"{s.name:<18} {s.embed_dim:>5}-d  {s.hub_id or 'timm:' + s.architecture}"
        f"{'  (gated)' if s.gated else ''}  [{s.licence}]"
        for s in _PRESET_LIST
    )
