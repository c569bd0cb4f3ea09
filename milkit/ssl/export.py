"""Export a pretrained backbone as a timm ``local-dir:`` folder.

The folder holds ``config.json`` (architecture, the keyword arguments that rebuild the model,
and a ``pretrained_cfg`` with input size and normalisation) and ``model.safetensors``, so::

    timm.create_model("local-dir:" + out_dir, pretrained=True)

rebuilds the backbone with its weights; milkit needs no loader of its own. (With
``pretrained=False`` timm builds the architecture but leaves the weights random.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import milkit
from milkit.atomic import atomic_write, write_text_atomic
from milkit.errors import ConfigError, EncoderError
from milkit.ssl.dino_module import DINOHParams, DINOModule

__all__ = ["export_backbone"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Fields of the source pretrained_cfg that describe the architecture, not the source weights.
_ARCHITECTURE_FIELDS = ("interpolation", "first_conv", "classifier")


def _model_args(backbone: nn.Module) -> dict[str, Any]:
    """Keyword arguments that rebuild ``backbone`` from its architecture name."""
    # timm records the create_model kwargs; drop rates only matter for training
    args = {
        key: value
        for key, value in getattr(backbone, "_model_args", {}).items()
        if not key.endswith("drop_rate") and key != "drop_path_rate"
    }
    args["num_classes"] = backbone.num_classes
    if isinstance(backbone, VisionTransformer):
        # Any: the blocks' attention classes vary, and each records its num_heads.
        attention: Any = backbone.blocks[0].attn
        # spelled out so the folder describes the network without consulting timm's registry
        args.update(
            img_size=list(backbone.patch_embed.img_size),
            patch_size=list(backbone.patch_embed.patch_size),
            embed_dim=backbone.embed_dim,
            depth=len(backbone.blocks),
            num_heads=attention.num_heads,
            global_pool=backbone.global_pool,
            dynamic_img_size=backbone.dynamic_img_size,
        )
    return args


def export_backbone(
    source: DINOModule | nn.Module,
    out_dir: str | Path,
    *,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    input_size_px: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a backbone as a timm ``local-dir:`` model folder.

    Args:
        source: A `DINOModule` (its teacher backbone is exported) or a timm model.
        out_dir: Folder to create; ``config.json`` is written last and marks it complete.
        mean: Normalisation mean; defaults to the module's, else ImageNet's.
        std: Normalisation std; defaults to the module's, else ImageNet's.
        input_size_px: Side of the input the model expects; defaults to the module's global
            crop size, else the ViT's position grid, else the model's ``pretrained_cfg``.
        overwrite: Replace an existing export in ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        EncoderError: If ``source`` is not a timm model or its arguments are not JSON-serialisable.
        ConfigError: If ``out_dir`` already holds an export and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    provenance: dict[str, Any] = {"milkit_version": milkit.__version__}
    if isinstance(source, DINOModule):
        backbone = source.teacher.backbone
        hp = cast(DINOHParams, source.hparams)
        # tuple(): they may be lists (hyperparameters read from YAML).
        mean = mean or cast(tuple[float, float, float], tuple(hp.mean))
        std = std or cast(tuple[float, float, float], tuple(hp.std))
        input_size_px = input_size_px or hp.img_size
        provenance.update(source="DINO teacher backbone", dino_hparams=dict(source.hparams))
    else:
        backbone = source
    source_cfg = getattr(backbone, "pretrained_cfg", None)
    if not source_cfg or not source_cfg.get("architecture"):
        raise EncoderError(
            f"export_backbone needs a timm model (with pretrained_cfg), got "
            f"{type(backbone).__name__}; build it with timm.create_model."
        )
    if (out_dir / CONFIG_NAME).exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an exported model; pass overwrite=True.")

    if input_size_px is None:
        grid = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        input_size_px = int(grid[0]) if grid else int(source_cfg["input_size"][-1])
    model_args = _model_args(backbone)
    pretrained_cfg = {key: source_cfg[key] for key in _ARCHITECTURE_FIELDS if key in source_cfg}
    pretrained_cfg.update(
        input_size=[3, input_size_px, input_size_px],
        fixed_input_size=not model_args.get("dynamic_img_size", False),
        crop_pct=1.0,
        crop_mode="center",
        mean=list(mean or IMAGENET_DEFAULT_MEAN),
        std=list(std or IMAGENET_DEFAULT_STD),
        num_classes=backbone.num_classes,
        custom_load=False,  # the weights are a native timm state dict
    )
    config = {
        "architecture": source_cfg["architecture"],
        "num_classes": backbone.num_classes,
        "num_features": backbone.num_features,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "milkit": provenance,
    }
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as err:
        raise EncoderError(
            f"export_backbone: the arguments of {source_cfg['architecture']} are not "
            f"JSON-serialisable ({err}); rebuild the model with plain-valued kwargs."
        ) from err

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    with atomic_write(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(out_dir / CONFIG_NAME, config_text)
    return out_dir
