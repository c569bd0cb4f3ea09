"""Tile encoders: a timm model id plus the input transform and pooling that go with it.

An id is a named preset (``uni``, ``virchow2`` ...), a timm registry name
(``vit_small_patch16_224.dino``), ``hf-hub:org/name`` or ``local-dir:PATH`` (a folder with timm's
``config.json`` and ``model.safetensors``). timm builds every architecture and reads hub and
local-dir weights; milkit adds the presets, batched torch preprocessing, pooling other than
timm's (Virchow2's CLS + mean of patch tokens), strict loading of local checkpoints, and errors
that say what to do (gated weights, offline use, wrong checkpoint).
"""

from __future__ import annotations

import difflib
import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from torch import nn

from milkit.errors import EncoderError
from milkit.features.encoder_presets import (
    PRESETS,
    EncoderSpec,
    Pooling,
)

# Exactly the failures of reaching gated, missing or uncached weights on the Hugging Face Hub.
_HUB_ERRORS = (
    GatedRepoError,
    RepositoryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    HfHubHTTPError,
)
# Keys under which training frameworks nest the weights (DINO keeps the teacher to use).
_CHECKPOINT_CONTAINERS = ("state_dict", "model", "teacher")
# Key prefixes added by DDP, torch.compile and SSL wrappers; keys outside them are projection heads.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")
# timm's local-dir preference order (timm.models._hub.load_state_dict_from_path), for the hash.
_LOCAL_DIR_WEIGHT_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


class Encoder(nn.Module):
    """A tile encoder: ``preprocess`` uint8 tiles, then ``forward`` to (B, D) embeddings.

    Attributes:
        model: The timm network (classifier removed).
        name: The encoder id as given to :func:`load_encoder`.
        architecture: timm architecture name of ``model``.
        input_size: Model input (H, W) in pixels.
        mean: Normalisation mean per RGB channel.
        std: Normalisation standard deviation per RGB channel.
        interpolation: Resize mode (``bicubic`` or ``bilinear``).
        embed_dim: Embedding length D.
        pooling: ``timm`` (the model's own head pooling), ``cls`` or ``cls+mean``.
        pretrained: False when the weights are random (features are then meaningless).
        weights_sha256: SHA-256 of the local weight file loaded, else None.
        hub_id: Hugging Face repo the weights came from, if any.
        random_seed: The seed random weights were drawn with; None for loaded weights.
    """

    model: Any  # a timm model: forward_features, num_prefix_tokens, pretrained_cfg
    _mean: torch.Tensor
    _std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        architecture: str,
        input_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
        pooling: Pooling,
        pretrained: bool,
        weights_sha256: str | None = None,
        hub_id: str | None = None,
        random_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.architecture = architecture
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
        self.pooling = pooling
        self.pretrained = pretrained
        self.weights_sha256 = weights_sha256
        self.hub_id = hub_id
        self.random_seed = random_seed
        width = int(getattr(model, "head_hidden_size", 0) or getattr(model, "num_features", 0))
        self.embed_dim = 2 * width if pooling == "cls+mean" else width
        device = next(model.parameters()).device
        # Non-persistent buffers follow .to(device) without entering the state dict.
        for key, values in (("_mean", self.mean), ("_std", self.std)):
            buf = torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self.register_buffer(key, buf, persistent=False)

    def preprocess(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Turn a batch of RGB tiles into normalised model input on the encoder's device.

        Args:
            tiles: uint8 array or tensor of shape (B, H, W, 3).

        Returns:
            float32 tensor of shape (B, 3, h, w) with (h, w) = ``input_size``: resized (antialiased)
            if needed, scaled to [0, 1], then normalised with ``mean`` and ``std``.

        Raises:
            EncoderError: If ``tiles`` is not a uint8 (B, H, W, 3) batch.
        """
        x = torch.as_tensor(tiles)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise EncoderError(
                f"{self.name}: preprocess expects uint8 RGB tiles of shape (B, H, W, 3), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        x = x.to(self._mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=True)
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots, as PIL's resize would not
        return ((x - self._mean) / self._std).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed tiles.

        Args:
            x: float tensor of shape (B, 3, h, w), output of :meth:`preprocess`.

        Returns:
            Embeddings of shape (B, ``embed_dim``).
        """
        if self.pooling == "timm":
            return self.model(x)
        tokens = self.model.forward_features(x)  # (B, prefix + patches, width)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        patches = tokens[:, self.model.num_prefix_tokens :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    @torch.inference_mode()
    def embed(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocess and embed uint8 tiles (B, H, W, 3) without gradients; returns (B, D)."""
        return self(self.preprocess(tiles))

    def describe(self) -> dict[str, Any]:
        """Provenance for feature-file attributes and the config hash (JSON-serialisable)."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "hub_id": self.hub_id,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "random_seed": self.random_seed,
            "embed_dim": self.embed_dim,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "pooling": self.pooling,
        }


def load_encoder(
    encoder_id: str,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Encoder:
    """Build a tile encoder from a preset name or any timm model id.

    Args:
        encoder_id: Preset name (see :func:`presets_help`), timm name (``vit_small_patch16_224``),
            ``hf-hub:org/name`` or ``local-dir:PATH``.
        pretrained: Load published weights; False builds the architecture randomly initialised.
        weights_path: Local checkpoint (``.safetensors`` or a torch file of tensors) loaded
            strictly into the architecture instead of published weights.
        device: Device the encoder lives on (``meta`` builds without allocating memory).
        seed: Seed of random weights (``pretrained=False`` without ``weights_path``): drawn on
            the CPU, so the same seed gives the same encoder on every device and run; recorded
            in :meth:`Encoder.describe`, so files from another random encoder are stale.

    Returns:
        The encoder in eval mode.

    Raises:
        EncoderError: Unknown id, unreachable or gated hub weights, or a checkpoint that does
            not fit the architecture.
    """
    preset = _find_preset(encoder_id)
    timm_loads = pretrained and weights_path is None
    random_seed = seed if not pretrained and weights_path is None else None
    if preset is not None:
        if timm_loads and not preset.timm_loadable:
            raise EncoderError(
                f"{preset.name} ({preset.hub_id}) cannot be loaded through timm: {preset.note} "
                "Convert its weights to timm's layout and pass them with --encoder-weights PATH "
                "(or local-dir:PATH), or use pretrained=False for a random encoder."
            )
        kwargs = {**preset.timm_kwargs}
        if timm_loads and preset.hub_id is not None:
            timm_id = f"hf-hub:{preset.hub_id}"
        else:
            timm_id, kwargs = preset.architecture, {**preset.arch_kwargs, **kwargs}
        model = _create(timm_id, timm_loads, kwargs, device, random_seed)
        transform: dict[str, Any] = {
            "input_size": preset.input_size,
            "mean": preset.mean,
            "std": preset.std,
            "interpolation": "bicubic",
        }
        pooling: Pooling = preset.pooling
        hub_id = preset.hub_id
    else:
        _check_timm_id(encoder_id, timm_loads)
        model = _create(encoder_id, timm_loads, {}, device, random_seed)
        cfg = timm.data.resolve_model_data_config(model)
        transform = {k: cfg[k] for k in ("mean", "std", "interpolation")}
        transform["input_size"] = tuple(cfg["input_size"][1:])
        pooling = "timm"
        hub_id = encoder_id.partition(":")[2] if encoder_id.startswith("hf-hub:") else None
    sha = None
    if weights_path is not None:
        sha = _load_weights(model, Path(weights_path))
    elif timm_loads and encoder_id.startswith("local-dir:"):
        sha = _sha256(_local_dir_weights(Path(encoder_id.partition(":")[2])))
    architecture = model.pretrained_cfg.get("architecture") or encoder_id
    encoder = Encoder(
        model.eval(),
        name=encoder_id,
        architecture=architecture,
        pooling=pooling,
        pretrained=pretrained or weights_path is not None,
        weights_sha256=sha,
        hub_id=hub_id if timm_loads else None,
        random_seed=random_seed,
        **transform,
    )
    return encoder.to(device)


def _find_preset(encoder_id: str) -> EncoderSpec | None:
    """The preset named by ``encoder_id`` or whose hub repo it names (``[hf-hub:]org/name``)."""
    key = encoder_id.lower()
    for spec in PRESETS.values():
        hub = (spec.hub_id or "").lower()
        if key == spec.name or (hub and key in (hub, f"hf-hub:{hub}")):
            return spec
    return None


def _check_timm_id(encoder_id: str, pretrained: bool) -> None:
    """Raise an EncoderError for ids timm cannot build, with close matches and what to do."""
    try:
        source, ident = timm.models.parse_model_name(encoder_id)
    except ValueError as exc:
        raise EncoderError(f"Encoder id {encoder_id!r}: {exc}") from None
    if source == "local-dir":
        folder = Path(ident)
        if not (folder / "config.json").is_file():
            raise EncoderError(
                f"local-dir:{folder} has no config.json; the folder must hold timm's config.json "
                "(architecture, model_args, pretrained_cfg) and model.safetensors."
            )
        if pretrained:
            _local_dir_weights(folder)
        return
    if source == "hf-hub":
        return
    arch, _, tag = ident.partition(".")
    if not timm.is_model(arch):
        candidates = list(PRESETS) + timm.list_models()
        close = difflib.get_close_matches(encoder_id.lower(), candidates, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise EncoderError(
            f"Unknown encoder {encoder_id!r}: not a milkit preset nor a timm model.{hint} "
            f"Presets: {', '.join(PRESETS)}. For other weights use hf-hub:org/name or "
            "local-dir:PATH (a folder with timm's config.json and model.safetensors)."
        )
    if pretrained and not timm.list_pretrained(f"{arch}.{tag or '*'}"):
        raise EncoderError(
            f"timm has no pretrained weights for {encoder_id!r}; pass pretrained=False for a "
            "random encoder or --encoder-weights PATH for your own checkpoint."
        )


def _create(
    timm_id: str,
    pretrained: bool,
    kwargs: Mapping[str, Any],
    device: str | torch.device,
    random_seed: int | None = None,
) -> Any:
    """``timm.create_model`` without a classifier, turning hub failures into EncoderErrors.

    Models are built on the CPU and moved afterwards (timm loads published weights there, and
    seeded random weights must not depend on the device's generator); ``meta`` builds allocate
    nothing. A ``random_seed`` seeds the initialisation without touching the caller's RNG.
    """
    build_on = "meta" if torch.device(device).type == "meta" else "cpu"
    try:
        with torch.random.fork_rng(devices=[]), torch.device(build_on):
            if random_seed is not None:
                torch.default_generator.manual_seed(random_seed)  # the CPU's only
            return timm.create_model(timm_id, pretrained=pretrained, num_classes=0, **kwargs)
    except _HUB_ERRORS as exc:
        raise _hub_error(timm_id, exc) from exc
    except RuntimeError as exc:
        if not timm_id.startswith("local-dir:"):
            raise
        raise EncoderError(f"Cannot load {timm_id}: {exc}") from exc


def _hub_error(timm_id: str, exc: Exception) -> EncoderError:
    """An EncoderError saying why hub weights are out of reach and the ways around it."""
    repo = timm_id.partition(":")[2] if timm_id.startswith("hf-hub:") else f"timm/{timm_id}"
    page = f"https://huggingface.co/{repo}"
    login = "`hf auth login` (older clients: `huggingface-cli login`) or set HF_TOKEN"
    offline = "To work offline, download the weights once and use local-dir:PATH or --encoder-weights PATH."
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = (
            "are not in the local Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE or no network). Run once with network access (gated models: "
            f"request access on {page}, then {login})"
        )
    elif isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) in (401, 403)
    ):
        why = f"are gated or private and this machine is not authorised. Request access on {page}, then {login}"
    else:
        why = f"could not be fetched ({type(exc).__name__}: {exc}). Check the id on {page}; if the repo is private, {login}"
    return EncoderError(f"Weights for {timm_id} {why}. {offline}")


def _local_dir_weights(folder: Path) -> Path:
    """The weight file timm reads from a local-dir folder (same preference order as timm)."""
    for name in _LOCAL_DIR_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    for suffix in _WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise EncoderError(
        f"local-dir:{folder} holds no weights (model.safetensors or pytorch_model.bin); "
        "add them or pass pretrained=False for a random encoder."
    )


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, taken out of training containers (``state_dict`` ...)."""
    if not path.is_file():
        raise EncoderError(f"Encoder weights {path} do not exist.")
    try:
        if path.suffix == ".safetensors":
            obj: Any = safetensors.torch.load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EncoderError(
            f"Refusing to unpickle {path}: it holds Python objects besides tensors (loaded with "
            "weights_only=True, as nothing untrusted is unpickled). Re-save only the state dict, "
            f"ideally as .safetensors. ({_offending_global(exc)})"
        ) from None
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise EncoderError(f"Cannot read encoder weights {path}: {exc}") from exc
    while isinstance(obj, dict):
        key = next((k for k in _CHECKPOINT_CONTAINERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
    state = (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not state:
        raise EncoderError(f"{path} holds no tensors; expected a model state dict.")
    return state


def _offending_global(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that names the disallowed object."""
    lines = str(exc).splitlines()
    return next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0] if lines else "")


def _load_weights(model: nn.Module, path: Path) -> str:
    """Load a checkpoint strictly into ``model`` (classifier keys dropped); return its SHA-256.

    Raises:
        EncoderError: If the file cannot be read or its keys or shapes do not fit ``model``.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    classifier = cfg.get("classifier") or "head"
    heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(heads)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        arch = cfg.get("architecture", type(model).__name__)
        problems = [
            f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
            for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", shapes))
            if items
        ]  # fmt: skip
        raise EncoderError(
            f"{path}: this checkpoint is not a {arch}: {'; '.join(problems)}. Pass the encoder "
            "id the weights were trained with."
        )
    model.load_state_dict(state, strict=True)
    return _sha256(path)
