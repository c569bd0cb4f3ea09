"""Tests for milkit.features.encoders: random timm encoders, presets, hub errors, local weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx2
import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import timm
import timm.models._hub
import torch
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

from milkit.errors import EncoderError
from milkit.features.encoder_presets import EncoderSpec, list_presets, presets_help
from milkit.features.encoders import Encoder, load_encoder

# One real CPU build in the fast suite; the others' architectures are checked on "meta" there.
FAST_REAL_BUILD = "kaiko-vits16"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: the hub client is put in offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    """A randomly initialised vit_tiny_patch16_224 encoder (seeded)."""
    torch.manual_seed(0)
    return load_encoder("vit_tiny_patch16_224", pretrained=False)


@pytest.fixture(scope="module")
def small() -> Encoder:
    """timm's 0.3M-parameter ``test_vit`` (160 px, 64-d), randomly initialised (seeded)."""
    torch.manual_seed(0)
    return load_encoder("test_vit", pretrained=False)


def _tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail_hub(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Hugging Face download that timm attempts raise ``exc``."""

    def raise_exc(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", raise_exc)


# --- random timm encoders and preprocessing ---------------------------------------------------


def test_random_timm_encoder_embeds_to_embed_dim(tiny: Encoder) -> None:
    out = tiny.embed(_tiles(3, 64))
    assert tiny.embed_dim == 192
    assert out.shape == (3, tiny.embed_dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    info = tiny.describe()
    assert info["pretrained"] is False and info["weights_sha256"] is None
    assert info["architecture"] == "vit_tiny_patch16_224" and info["embed_dim"] == 192
    json.dumps(info)  # provenance must be JSON-serialisable


def test_preprocess_resizes_and_normalises_constant_tiles(tiny: Encoder) -> None:
    values = (10, 128, 250)
    tiles = np.broadcast_to(np.array(values, dtype=np.uint8), (2, 64, 64, 3)).copy()
    x = tiny.preprocess(tiles)
    assert x.shape == (2, 3, *tiny.input_size) == (2, 3, 224, 224)
    for c, v in enumerate(values):
        expected = (v / 255.0 - tiny.mean[c]) / tiny.std[c]
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected))


def test_preprocess_keeps_input_size_tiles_and_accepts_tensors(tiny: Encoder) -> None:
    tiles = _tiles(2, 224)
    x = tiny.preprocess(torch.from_numpy(tiles))
    mean = torch.tensor(tiny.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255.0 - mean) / std
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 64, 64, 3), np.float32), np.zeros((64, 64, 3), np.uint8)]
)
def test_preprocess_rejects_non_uint8_batches(tiny: Encoder, bad: np.ndarray) -> None:
    with pytest.raises(EncoderError, match=r"uint8 RGB tiles of shape \(B, H, W, 3\)"):
        tiny.preprocess(bad)


def test_cls_plus_mean_pooling_concatenates_class_token_and_patch_mean() -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, depth=1, reg_tokens=4, img_size=64
    )
    enc = Encoder(
        vit.eval(),
        name="test",
        architecture="vit_tiny_patch16_224",
        input_size=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        pooling="cls+mean",
        pretrained=False,
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        out = enc(x)
    assert enc.embed_dim == 2 * 192 and out.shape == (2, enc.embed_dim)
    torch.testing.assert_close(out[:, :192], tokens[:, 0])
    torch.testing.assert_close(out[:, 192:], tokens[:, 5:].mean(dim=1))  # 1 cls + 4 registers


# --- presets ----------------------------------------------------------------------------------


def test_every_preset_is_complete() -> None:
    presets = list_presets()
    assert {"uni", "uni2-h", "virchow2", "h-optimus-0", "phikon-v2", "gigapath"} <= {
        p.name for p in presets
    }
    for spec in presets:
        assert isinstance(spec, EncoderSpec)
        assert timm.is_model(spec.architecture.partition(".")[0]), spec.name
        assert spec.hub_id or "." in spec.architecture, f"{spec.name}: no source of weights"
        assert len(spec.mean) == 3 and len(spec.std) == 3 and min(spec.std) > 0
        assert spec.input_size == (224, 224) and spec.embed_dim > 0
        assert spec.pooling in ("cls", "cls+mean") and spec.licence
        assert spec.timm_loadable or spec.note, f"{spec.name}: say why it is not loadable"
        assert spec.name in presets_help()


@pytest.mark.parametrize("spec", list_presets(), ids=lambda s: s.name)
def test_preset_architecture_builds_on_meta_with_its_embed_dim(spec: EncoderSpec) -> None:
    enc = load_encoder(spec.name, pretrained=False, device="meta")
    assert enc.embed_dim == spec.embed_dim
    assert (enc.mean, enc.std, enc.input_size) == (spec.mean, spec.std, spec.input_size)
    out = enc(torch.empty(2, 3, *spec.input_size, device="meta"))
    assert out.shape == (2, spec.embed_dim)
    assert enc.describe()["pretrained"] is False


def test_hub_id_of_a_preset_uses_the_preset() -> None:
    enc = load_encoder("hf-hub:paige-ai/virchow2", pretrained=False, device="meta")
    assert enc.pooling == "cls+mean" and enc.embed_dim == 2560
    assert enc.architecture == "vit_huge_patch14_224"


def _check_real_build(name: str) -> None:
    spec = next(s for s in list_presets() if s.name == name)
    enc = load_encoder(name, pretrained=False)
    out = enc.embed(_tiles(1, 96))
    assert out.shape == (1, spec.embed_dim) and torch.isfinite(out).all()


def test_a_small_preset_builds_and_embeds_on_cpu() -> None:
    _check_real_build(FAST_REAL_BUILD)


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in list_presets() if s.name != FAST_REAL_BUILD])
def test_preset_builds_and_embeds_on_cpu(name: str) -> None:
    _check_real_build(name)


# --- hub errors and unknown ids ---------------------------------------------------------------


def test_gated_hub_model_says_how_to_get_access(monkeypatch: pytest.MonkeyPatch) -> None:
    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/x"))
    _fail_hub(GatedRepoError("403 Client Error: gated", response=response), monkeypatch)
    with pytest.raises(EncoderError) as info:
        load_encoder("uni")
    msg = str(info.value)
    assert "gated" in msg and "https://huggingface.co/MahmoodLab/UNI" in msg
    assert "huggingface-cli login" in msg and "HF_TOKEN" in msg
    assert "local-dir:" in msg and "--encoder-weights" in msg


@pytest.mark.parametrize("encoder_id", ["hf-hub:someone/some-vit", "test_vit.r160_in1k"])
def test_uncached_hub_weights_offline_say_what_to_do(
    encoder_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_hub(LocalEntryNotFoundError("not in cache and offline"), monkeypatch)
    with pytest.raises(EncoderError, match="offline") as info:
        load_encoder(encoder_id)
    assert "local-dir:" in str(info.value) and "HF_TOKEN" in str(info.value)


def test_phikon_v2_explains_it_is_not_a_timm_model() -> None:
    with pytest.raises(EncoderError, match="transformers") as info:
        load_encoder("phikon-v2")
    assert "--encoder-weights" in str(info.value)


@pytest.mark.parametrize(
    ("encoder_id", "suggestion"),
    [("vit_smal_patch16_224", "vit_small_patch16_224"), ("uni2h", "uni2-h")],
)
def test_unknown_id_suggests_close_matches(encoder_id: str, suggestion: str) -> None:
    with pytest.raises(EncoderError) as info:
        load_encoder(encoder_id, pretrained=False)
    msg = str(info.value)
    assert encoder_id in msg and suggestion in msg
    assert "hf-hub:" in msg and "local-dir:" in msg


def test_repo_id_without_prefix_points_to_hf_hub() -> None:
    with pytest.raises(EncoderError, match="hf-hub:someone/model"):
        load_encoder("someone/model", pretrained=False)


def test_timm_model_without_published_weights_is_refused() -> None:
    with pytest.raises(EncoderError, match="no pretrained weights.*pretrained=False"):
        load_encoder("vit_giant_patch14_224")


# --- local checkpoints ------------------------------------------------------------------------


def test_safetensors_weights_load_exactly(small: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file(small.model.state_dict(), path)
    loaded = load_encoder("test_vit", pretrained=False, weights_path=path)
    tiles = _tiles(2, 160)
    torch.testing.assert_close(loaded.embed(tiles), small.embed(tiles), rtol=0, atol=0)
    assert loaded.pretrained is True and loaded.weights_sha256 == _sha256(path)


def test_wrapped_torch_checkpoint_loads_exactly(small: Encoder, tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in small.model.state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 64)  # a classifier the encoder drops
    path = tmp_path / "small.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_encoder("test_vit", weights_path=path)
    tiles = _tiles(2, 64, seed=1)
    torch.testing.assert_close(loaded.embed(tiles), small.embed(tiles), rtol=0, atol=0)
    assert loaded.describe()["weights_sha256"] == _sha256(path)


def test_dino_teacher_backbone_checkpoint_loads(small: Encoder, tmp_path: Path) -> None:
    teacher = {f"backbone.{k}": v for k, v in small.model.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 64)  # DINO projection head
    path = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "student": {"x": torch.zeros(1)}}, path)
    loaded = load_encoder("test_vit", weights_path=path)
    tiles = _tiles(1, 160)
    torch.testing.assert_close(loaded.embed(tiles), small.embed(tiles), rtol=0, atol=0)


def test_checkpoint_of_another_architecture_is_named(small: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file(small.model.state_dict(), path)
    with pytest.raises(EncoderError) as info:
        load_encoder("test_vit3", weights_path=path)
    msg = str(info.value)
    assert str(path) in msg and "not a test_vit3" in msg
    assert "shape mismatches" in msg and "(64,) vs model (96,)" in msg


class _Arbitrary:
    """Not a tensor: weights_only loading must refuse it."""


def test_pickle_with_arbitrary_objects_is_refused(small: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small.model.state_dict(), "extra": _Arbitrary()}, path)
    with pytest.raises(EncoderError, match="Refusing to unpickle") as info:
        load_encoder("test_vit", weights_path=path)
    assert str(path) in str(info.value)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="nothing.pt do not exist"):
        load_encoder("test_vit", weights_path=tmp_path / "nothing.pt")


# --- local-dir ----------------------------------------------------------------------------------


def _export_local_dir(folder: Path) -> torch.nn.Module:
    """Write a 2-block 64-px vit_tiny as timm's local-dir layout; return the model."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, img_size=64).eval()
    folder.mkdir()
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": {"depth": 2, "img_size": 64},
        "pretrained_cfg": {
            "input_size": [3, 64, 64],
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "mean": [0.7, 0.55, 0.7],
            "std": [0.2, 0.25, 0.2],
            "num_classes": 0,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors")
    return model


def test_local_dir_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    model = _export_local_dir(folder)
    enc = load_encoder(f"local-dir:{folder}")
    assert enc.input_size == (64, 64) and enc.interpolation == "bilinear"
    assert enc.mean == (0.7, 0.55, 0.7) and enc.std == (0.2, 0.25, 0.2)
    assert enc.weights_sha256 == _sha256(folder / "model.safetensors")
    assert len(enc.model.blocks) == 2 and enc.embed_dim == 192
    x = enc.preprocess(_tiles(2, 64))
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model(x), rtol=0, atol=0)


def test_local_dir_random_init_differs_and_records_no_hash(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    model = _export_local_dir(folder)
    enc = load_encoder(f"local-dir:{folder}", pretrained=False)
    assert enc.pretrained is False and enc.weights_sha256 is None
    x = enc.preprocess(_tiles(1, 64))
    with torch.no_grad():
        assert not torch.allclose(enc(x), model(x))


def test_local_dir_without_config_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="no config.json.*model.safetensors"):
        load_encoder(f"local-dir:{tmp_path}")


def test_local_dir_without_weights_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    _export_local_dir(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="holds no weights"):
        load_encoder(f"local-dir:{folder}")


def test_random_weights_come_from_the_seed_alone() -> None:
    """Issue #27: one seed, one encoder, whatever the global RNG; the seed is in describe()."""
    torch.manual_seed(123)
    first = load_encoder("test_vit", pretrained=False, seed=5)
    state_after = torch.random.get_rng_state()
    torch.manual_seed(999)
    again = load_encoder("test_vit", pretrained=False, seed=5)
    other = load_encoder("test_vit", pretrained=False, seed=6)
    torch.manual_seed(123)
    assert torch.equal(torch.random.get_rng_state(), state_after)  # the caller's RNG untouched
    same = [torch.equal(a, b) for a, b in zip(_weights(first), _weights(again), strict=True)]
    differ = [torch.equal(a, c) for a, c in zip(_weights(first), _weights(other), strict=True)]
    assert all(same) and not all(differ)
    assert first.describe()["random_seed"] == 5


def _weights(encoder: Encoder) -> list[torch.Tensor]:
    return list(encoder.state_dict().values())
