"""Multi-crop augmentation of H&E tiles: crop geometry, invariants, colour ops, collation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from milkit.errors import ConfigError, MilkitError
from milkit.ssl.augment import (
    GaussianBlur,
    HEDJitter,
    MultiCropAugmentation,
    RandomDihedral,
    collate_crops,
)

NO_COLOUR = dict(
    color_jitter_p=0.0,
    hed_jitter_p=0.0,
    grayscale_p=0.0,
    global_blur_p=(0.0, 0.0),
    local_blur_p=0.0,
    solarize_p=0.0,
)


def _tile(height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_crops_have_sizes_dtypes_and_order() -> None:
    aug = MultiCropAugmentation(global_size_px=32, local_size_px=16, n_local_crops=3)
    crops = aug(_tile())
    assert aug.n_crops == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    # two local crops drawn independently almost surely differ
    assert not torch.equal(crops[2], crops[3])


def test_no_local_crops() -> None:
    crops = MultiCropAugmentation(global_size_px=24, n_local_crops=0)(_tile())
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2


def test_normalisation_uses_mean_and_std() -> None:
    tile = np.full((32, 32, 3), 128, dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    aug = MultiCropAugmentation(
        global_size_px=16, local_size_px=8, n_local_crops=2, mean=mean, std=std, **NO_COLOUR
    )
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    for crop in aug(tile):
        torch.testing.assert_close(crop, expected.view(3, 1, 1).expand_as(crop))


def test_dihedral_preserves_pixels_and_reaches_all_8_symmetries() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    dihedral = RandomDihedral()
    seen = set()
    for _ in range(200):
        out = dihedral(image)
        assert torch.equal(out.flatten(1).sort().values, image.flatten(1).sort().values)
        seen.add(out.numpy().tobytes())
    assert len(seen) == 8


def test_geometry_only_pipeline_preserves_pixel_multiset() -> None:
    # a full-tile crop at the tile's own size: only the flips/rotations move pixels
    tile = _tile(24, 24)
    aug = MultiCropAugmentation(
        global_size_px=24,
        global_scale=(1.0, 1.0),
        n_local_crops=0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        **NO_COLOUR,
    )
    torch.manual_seed(1)
    expected = np.sort(tile.reshape(-1, 3), axis=0)
    for crop in aug(tile):
        pixels = (crop * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3).numpy()
        np.testing.assert_array_equal(np.sort(pixels, axis=0), expected)


def test_hed_jitter_round_trip_is_identity_without_jitter() -> None:
    image = torch.rand(3, 16, 16) * 0.9 + 0.05
    torch.testing.assert_close(HEDJitter(scale=0.0, bias=0.0)(image), image, atol=1e-5, rtol=0)


def test_hed_jitter_is_mild_and_in_range() -> None:
    torch.manual_seed(0)
    # an H&E-like pink/purple image
    image = torch.tensor([0.85, 0.45, 0.7]).view(3, 1, 1) * (0.6 + 0.4 * torch.rand(1, 32, 32))
    jitter = HEDJitter()
    changes = []
    for _ in range(20):
        out = jitter(image)
        assert out.min() >= 0 and out.max() <= 1
        changes.append(float((out - image).abs().mean()))
    assert 0.0 < max(changes) < 0.08


@pytest.mark.parametrize("sigma", [0.4, 1.3])
def test_gaussian_blur_matches_torchvision(sigma: float) -> None:
    image = torch.rand(3, 20, 20)
    ours = GaussianBlur((sigma, sigma))(image)
    kernel = 2 * math.ceil(3 * sigma) + 1
    reference = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"global_scale": (0.6, 0.2)}, "global_scale"),
        ({"local_scale": (0.0, 0.4)}, "local_scale"),
        ({"color_jitter_p": 1.5}, "color_jitter_p"),
        ({"n_local_crops": -1}, "n_local_crops"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
    ],
)
def test_invalid_options_raise_naming_the_option(options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        MultiCropAugmentation(**options)


@pytest.mark.parametrize(
    "tile",
    [
        np.zeros((16, 16, 4), dtype=np.uint8),
        np.zeros((16, 16, 3), dtype=np.float32),
        np.zeros((16, 16), dtype=np.uint8),
    ],
)
def test_bad_tile_raises(tile: np.ndarray) -> None:
    with pytest.raises(MilkitError, match=r"\(H, W, 3\) uint8"):
        MultiCropAugmentation(global_size_px=8, local_size_px=8)(tile)


def test_collate_stacks_crop_by_crop() -> None:
    aug = MultiCropAugmentation(global_size_px=16, local_size_px=8, n_local_crops=2)
    samples = [aug(_tile(seed=i)) for i in range(3)]
    batch = collate_crops(samples)
    assert [tuple(b.shape) for b in batch] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    for crop_index, stacked in enumerate(batch):
        for tile_index, sample in enumerate(samples):
            assert torch.equal(stacked[tile_index], sample[crop_index])


def test_collate_rejects_empty_and_ragged_batches() -> None:
    with pytest.raises(MilkitError, match="empty"):
        collate_crops([])
    crop = torch.zeros(3, 8, 8)
    with pytest.raises(MilkitError, match="different numbers of crops"):
        collate_crops([[crop, crop, crop], [crop, crop]])


def test_augmentation_pickles_for_dataloader_workers() -> None:
    aug = MultiCropAugmentation(global_size_px=16, local_size_px=8, n_local_crops=1)
    clone = pickle.loads(pickle.dumps(aug))
    assert [tuple(c.shape) for c in clone(_tile())] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
