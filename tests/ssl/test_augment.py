"""Batched multi-crop augmentation of H&E tiles: crop geometry, invariants, colour, collation."""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from milkit.errors import ConfigError, MilkitError
from milkit.ssl.augment import (
    AugmentingCollate,
    MultiCropAugmentation,
    ViewAugmentation,
    collate_tiles,
    gaussian_blur,
    hed_jitter,
    random_resized_crop,
)

NO_COLOUR = dict(
    color_jitter_p=0.0,
    hed_jitter_p=0.0,
    grayscale_p=0.0,
    global_blur_p=(0.0, 0.0),
    local_blur_p=0.0,
    solarize_p=0.0,
)
GEOMETRY_ONLY = ViewAugmentation(**NO_COLOUR)


def _tile(height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _tiles(n: int = 4, height: int = 48, width: int = 40) -> torch.Tensor:
    return collate_tiles([_tile(height, width, seed=i) for i in range(n)])


def test_crops_have_sizes_dtypes_and_order() -> None:
    aug = MultiCropAugmentation(global_size_px=32, local_size_px=16, n_local_crops=3)
    crops = aug(_tiles(4))
    assert aug.n_crops == 5
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    # two local crops drawn independently almost surely differ
    assert not torch.equal(crops[2], crops[3])


def test_every_tile_of_a_batch_gets_its_own_draw() -> None:
    # one tile repeated: different crops (geometry and colour) per copy
    same = collate_tiles([_tile(seed=3)] * 6)
    first_view = MultiCropAugmentation(global_size_px=24, n_local_crops=0)(same)[0]
    assert len({crop.numpy().tobytes() for crop in first_view}) == 6


def test_no_local_crops() -> None:
    crops = MultiCropAugmentation(global_size_px=24, n_local_crops=0)(_tiles(2))
    assert [tuple(c.shape) for c in crops] == [(2, 3, 24, 24)] * 2


def test_normalisation_uses_mean_and_std() -> None:
    tile = np.full((32, 32, 3), 128, dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    aug = MultiCropAugmentation(
        global_size_px=16, local_size_px=8, n_local_crops=2, mean=mean, std=std, views=GEOMETRY_ONLY
    )
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    for crop in aug(tile[None]):
        torch.testing.assert_close(crop, expected.view(1, 3, 1, 1).expand_as(crop))


def test_full_tile_crops_only_move_pixels_and_reach_all_8_symmetries() -> None:
    # a full-tile crop at the tile's own size: the flips/rotations only permute pixels
    tile = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    crops = random_resized_crop(tile.float().repeat(200, 1, 1, 1), 8, (1.0, 1.0))
    pixels = crops.round().to(torch.uint8)
    expected = tile[0].flatten(1).sort().values
    seen = set()
    for crop in pixels:
        assert torch.equal(crop.flatten(1).sort().values, expected)
        seen.add(crop.numpy().tobytes())
    assert len(seen) == 8


def test_shrinking_crops_antialias() -> None:
    # a one-pixel checkerboard averages to grey when a crop shrinks it 4x, not to an alias
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    crops = random_resized_crop(checker.float().expand(4, 1, 64, 64), 16, (1.0, 1.0))
    torch.testing.assert_close(crops, torch.full_like(crops, 0.5), atol=1e-5, rtol=0)


def test_crop_box_covers_its_area_fraction() -> None:
    # a horizontal ramp: a crop's mean is the centre of its box, its range the box width
    ramp = torch.linspace(0, 1, 200).expand(1, 1, 200, 200).repeat(64, 1, 1, 1)
    crops = random_resized_crop(ramp, 50, (0.25, 0.25), dihedral=False)
    widths = crops.amax(dim=(1, 2, 3)) - crops.amin(dim=(1, 2, 3))
    # area 1/4 at aspect ratio 3/4..4/3: side 0.43..0.58 of the image
    assert widths.min() > 0.40 and widths.max() < 0.60


def test_geometry_only_pipeline_preserves_pixel_multiset() -> None:
    tile = _tile(24, 24)
    aug = MultiCropAugmentation(
        global_size_px=24,
        global_scale=(1.0, 1.0),
        n_local_crops=0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        views=GEOMETRY_ONLY,
    )
    torch.manual_seed(1)
    expected = np.sort(tile.reshape(-1, 3), axis=0)
    for crop in aug(collate_tiles([tile] * 3)):
        for image in crop:
            pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
            np.testing.assert_array_equal(np.sort(pixels.numpy(), axis=0), expected)


def test_hed_jitter_round_trip_is_identity_without_jitter() -> None:
    images = torch.rand(2, 3, 16, 16) * 0.9 + 0.05
    unchanged = hed_jitter(images, torch.ones(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(unchanged, images, atol=1e-5, rtol=0)


def test_hed_jitter_moves_the_chosen_stain() -> None:
    # an H&E-like pink/purple image; more haematoxylin in image 0 only: darker and bluer
    image = torch.tensor([0.85, 0.45, 0.7]).view(1, 3, 1, 1) * (0.6 + 0.4 * torch.rand(1, 1, 8, 8))
    images = image.repeat(2, 1, 1, 1)
    out = hed_jitter(images, torch.tensor([[1.3, 1.0, 1.0], [1.0, 1.0, 1.0]]), torch.zeros(2, 3))
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[1], images[1], atol=1e-5, rtol=0)
    assert out[0].mean() < images[0].mean()
    red_to_blue = (out[0, 0] / out[0, 2]).mean() / (images[0, 0] / images[0, 2]).mean()
    assert red_to_blue < 1


def test_default_stain_jitter_is_mild() -> None:
    torch.manual_seed(0)
    image = torch.tensor([0.85, 0.45, 0.7]).view(1, 3, 1, 1) * (
        0.6 + 0.4 * torch.rand(1, 1, 32, 32)
    )
    tiles = (image.repeat(16, 1, 1, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    views = ViewAugmentation(**{**NO_COLOUR, "hed_jitter_p": 1.0, "dihedral": False})
    aug = MultiCropAugmentation(global_size_px=32, global_scale=(1.0, 1.0), n_local_crops=0,
                                views=views, mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    change = (aug(tiles)[0] - tiles.permute(0, 3, 1, 2) / 255).abs().mean(dim=(1, 2, 3))
    assert 0.0 < change.max() < 0.08 and change.min() < change.max()


@pytest.mark.parametrize("sigma", [0.4, 1.3])
def test_gaussian_blur_matches_torchvision_per_image(sigma: float) -> None:
    images = torch.rand(3, 3, 20, 20)
    ours = gaussian_blur(images, torch.tensor([sigma, 0.0, sigma / 2]))
    kernel = 2 * math.ceil(3 * sigma) + 1  # the batch's largest sigma sets the kernel size
    for index, image_sigma in [(0, sigma), (2, sigma / 2)]:
        reference = TF.gaussian_blur(images[index], [kernel, kernel], [image_sigma] * 2)
        torch.testing.assert_close(ours[index], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], images[1])  # sigma 0: unchanged


def test_colour_jitter_keeps_range_and_grey_stays_grey() -> None:
    torch.manual_seed(0)
    grey = torch.full((8, 16, 16, 3), 100, dtype=torch.uint8)
    views = ViewAugmentation(**{**NO_COLOUR, "color_jitter_p": 1.0, "hue": 0.2})
    aug = MultiCropAugmentation(global_size_px=16, n_local_crops=0, views=views,
                                mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    crops = aug(grey)[0]
    assert crops.min() >= 0 and crops.max() <= 1
    # saturation and hue do not colour a grey image; brightness changes it per image
    torch.testing.assert_close(crops[:, 0], crops[:, 1], atol=2e-3, rtol=0)
    torch.testing.assert_close(crops[:, 1], crops[:, 2], atol=2e-3, rtol=0)
    assert crops.mean(dim=(1, 2, 3)).std() > 0.01


@pytest.mark.parametrize(
    ("make", "options", "named"),
    [
        (MultiCropAugmentation, {"global_scale": (0.6, 0.2)}, "global_scale"),
        (MultiCropAugmentation, {"local_scale": (0.0, 0.4)}, "local_scale"),
        (MultiCropAugmentation, {"n_local_crops": -1}, "n_local_crops"),
        (MultiCropAugmentation, {"std": (0.2, 0.0, 0.2)}, "std"),
        (ViewAugmentation, {"color_jitter_p": 1.5}, "color_jitter_p"),
        (ViewAugmentation, {"global_blur_p": (1.0, -0.1)}, re.escape("global_blur_p[1]")),
        (ViewAugmentation, {"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
        (ViewAugmentation, {"brightness": 1.5}, "brightness"),
        (ViewAugmentation, {"hue": 0.7}, "hue"),
    ],
)
def test_invalid_options_raise_naming_the_option(
    make: Callable[..., object], options: dict, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        make(**options)


@pytest.mark.parametrize(
    "tiles",
    [
        np.zeros((2, 16, 16, 4), dtype=np.uint8),
        np.zeros((2, 16, 16, 3), dtype=np.float32),
        np.zeros((16, 16, 3), dtype=np.uint8),
    ],
)
def test_bad_tiles_raise(tiles: np.ndarray) -> None:
    with pytest.raises(MilkitError, match=r"\(B, H, W, 3\) uint8"):
        MultiCropAugmentation(global_size_px=8, local_size_px=8)(tiles)


def test_collate_stacks_tiles_and_rejects_empty_and_ragged_batches() -> None:
    tiles = [_tile(seed=i) for i in range(3)]
    batch = collate_tiles(tiles)
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (3, 48, 40, 3)
    assert all(np.array_equal(batch[i].numpy(), tile) for i, tile in enumerate(tiles))
    with pytest.raises(MilkitError, match="empty"):
        collate_tiles([])
    with pytest.raises(MilkitError, match="different shapes"):
        collate_tiles([_tile(), _tile(32, 32)])


def test_augmenting_collate_pickles_for_dataloader_workers() -> None:
    aug = MultiCropAugmentation(global_size_px=16, local_size_px=8, n_local_crops=1)
    clone = pickle.loads(pickle.dumps(AugmentingCollate(aug)))
    crops = clone([_tile(seed=i) for i in range(2)])
    assert [tuple(c.shape) for c in crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)]
