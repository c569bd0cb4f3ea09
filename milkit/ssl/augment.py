"""Multi-crop augmentation of H&E tiles for DINO pretraining.

A tile (uint8 RGB, ``(H, W, 3)``) becomes 2 global crops followed by ``n_local_crops`` local
crops, each a normalised float32 tensor ``(3, S, S)``. Geometry runs on uint8 (cheap), colour on
float in [0, 1]; everything uses torch's RNG so DataLoader workers draw different crops.

Defaults follow DINO (Caron et al. 2021) with histology changes: flips and 90° rotations (the
dihedral group, label-preserving for tissue), milder colour jitter, an H&E stain jitter in
optical-density space, hue jitter and grayscale/solarisation off (DINO used hue 0.1 and 0.2
each for grayscale/solarisation on ImageNet).
Normalisation defaults to the ImageNet mean/std, the usual choice for ViTs on H&E; the
exported backbone records the values used, so feature extraction normalises the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2

from milkit.errors import ConfigError, MilkitError

__all__ = [
    "GaussianBlur",
    "HEDJitter",
    "MultiCropAugmentation",
    "RandomDihedral",
    "collate_crops",
]

# Pixels of value 0 would have infinite optical density; skimage's rgb2hed clamps the same way.
_MIN_INTENSITY = 1e-6


class RandomDihedral(nn.Module):
    """Random flip and 90° rotation: a uniform draw from the 8 symmetries of the square.

    Only moves pixels, so the multiset of pixel values is unchanged.
    """

    def forward(self, image: Tensor) -> Tensor:
        """Transform one image.

        Args:
            image: ``(..., C, H, W)`` tensor of any dtype; square if a rotation must keep its shape.

        Returns:
            The flipped (p = 0.5) and rotated (k·90°, k uniform in 0..3) image.
        """
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        k = int(torch.randint(4, ()))
        return torch.rot90(image, k, dims=(-2, -1))


class HEDJitter(nn.Module):
    """Perturb haematoxylin, eosin and DAB amounts by colour deconvolution.

    RGB is turned into optical density ``-ln(rgb)``, unmixed with scikit-image's HED stain
    matrix, each stain channel ``s`` becomes ``s·a + b`` with ``a ~ U(1 − scale, 1 + scale)`` and
    ``b ~ U(−bias, bias)`` (bias in optical-density units), and the result is mixed back.

    Args:
        scale: Half-width of the multiplicative jitter per stain.
        bias: Half-width of the additive jitter per stain, in optical density.
    """

    def __init__(self, scale: float = 0.05, bias: float = 0.02) -> None:
        super().__init__()
        self.scale = scale
        self.bias = bias
        self.register_buffer("hed_from_rgb", torch.tensor(hed_from_rgb, dtype=torch.float32))
        self.register_buffer("rgb_from_hed", torch.tensor(rgb_from_hed, dtype=torch.float32))

    def forward(self, image: Tensor) -> Tensor:
        """Jitter one image.

        Args:
            image: ``(3, H, W)`` float RGB in [0, 1].

        Returns:
            ``(3, H, W)`` float RGB in [0, 1].
        """
        density = -torch.log(image.clamp(min=_MIN_INTENSITY))
        stains = torch.einsum("chw,cs->shw", density, self.hed_from_rgb)
        factor = 1.0 + (2.0 * torch.rand(3, 1, 1) - 1.0) * self.scale
        shift = (2.0 * torch.rand(3, 1, 1) - 1.0) * self.bias
        density = torch.einsum("shw,sc->chw", stains * factor + shift, self.rgb_from_hed)
        return torch.exp(-density).clamp(0.0, 1.0)


class GaussianBlur(nn.Module):
    """Gaussian blur with a random sigma, as two 1-D passes.

    Separable and sized to the drawn sigma (radius ``ceil(3·sigma)``), so it costs a fraction of
    torchvision's fixed-size 2-D kernel on CPU workers.

    Args:
        sigma: ``(low, high)`` range of the blur sigma in pixels; drawn uniformly per call.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, image: Tensor) -> Tensor:
        """Blur one image.

        Args:
            image: ``(C, H, W)`` float image.

        Returns:
            ``(C, H, W)`` blurred image (reflected borders).
        """
        low, high = self.sigma
        sigma = low + (high - low) * float(torch.rand(()))
        # reflect padding needs the radius below the image side
        radius = max(1, min(math.ceil(3 * sigma), min(image.shape[-2:]) - 1))
        offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        # channels as batch: one single-channel convolution is faster than a grouped one
        out = F.pad(image[:, None], (radius,) * 4, mode="reflect")
        out = F.conv2d(out, kernel.view(1, 1, 1, -1))
        out = F.conv2d(out, kernel.view(1, 1, -1, 1))
        return out[:, 0]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"MultiCropAugmentation: {name}={value} must lie in [0, 1].")


def _check_scale(name: str, value: tuple[float, float]) -> None:
    low, high = value
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(
            f"MultiCropAugmentation: {name}={value} must satisfy 0 < low <= high <= 1 "
            "(fractions of the tile area)."
        )


class MultiCropAugmentation:
    """DINO multi-crop views of one H&E tile.

    The first two crops are global (``global_size_px``, ``global_scale``), the remaining
    ``n_local_crops`` local. As in DINO the two global views are asymmetric: the first is
    blurred with probability ``global_blur_p[0]``, the second with ``global_blur_p[1]``, and only
    the second may be solarised.

    Args:
        global_size_px: Side of a global crop in pixels.
        local_size_px: Side of a local crop in pixels.
        n_local_crops: Number of local crops (0 disables them).
        global_scale: Area fraction range of the tile a global crop covers.
        local_scale: Area fraction range of the tile a local crop covers.
        dihedral: Random flips and 90° rotations.
        color_jitter_p: Probability of colour jitter.
        brightness: Colour-jitter brightness strength.
        contrast: Colour-jitter contrast strength.
        saturation: Colour-jitter saturation strength.
        hue: Colour-jitter hue strength. Off by default: the stain jitter models H&E colour
            shifts more faithfully, and the HSV round trip costs ~40% of the augmentation time
            (0.02 is a mild value when wanted).
        hed_jitter_p: Probability of H&E stain jitter.
        hed_scale: Multiplicative stain jitter half-width (see `HEDJitter`).
        hed_bias: Additive stain jitter half-width in optical density.
        grayscale_p: Probability of converting a crop to grayscale.
        blur_sigma: Range of the Gaussian blur sigma in pixels.
        global_blur_p: Blur probabilities of the first and the second global crop.
        local_blur_p: Blur probability of each local crop.
        solarize_p: Solarisation probability of the second global crop.
        mean: Per-channel normalisation mean (RGB, of [0, 1] intensities).
        std: Per-channel normalisation standard deviation.

    Raises:
        ConfigError: If a size, count, scale range, probability or std is invalid.
    """

    def __init__(
        self,
        *,
        global_size_px: int = 224,
        local_size_px: int = 96,
        n_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        dihedral: bool = True,
        color_jitter_p: float = 0.8,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.1,
        hue: float = 0.0,
        hed_jitter_p: float = 0.5,
        hed_scale: float = 0.05,
        hed_bias: float = 0.02,
        grayscale_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        global_blur_p: tuple[float, float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        solarize_p: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if global_size_px < 1 or local_size_px < 1:
            raise ConfigError(
                f"MultiCropAugmentation: crop sizes must be positive, got "
                f"global_size_px={global_size_px}, local_size_px={local_size_px}."
            )
        if n_local_crops < 0:
            raise ConfigError(f"MultiCropAugmentation: n_local_crops={n_local_crops} must be >= 0.")
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        for name, value in [
            ("color_jitter_p", color_jitter_p),
            ("hed_jitter_p", hed_jitter_p),
            ("grayscale_p", grayscale_p),
            ("global_blur_p[0]", global_blur_p[0]),
            ("global_blur_p[1]", global_blur_p[1]),
            ("local_blur_p", local_blur_p),
            ("solarize_p", solarize_p),
        ]:
            _check_probability(name, value)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(
                f"MultiCropAugmentation: mean={mean} and std={std} need 3 values each, std > 0."
            )
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ConfigError(
                f"MultiCropAugmentation: blur_sigma={blur_sigma} needs 0 < low <= high."
            )
        self.n_local_crops = n_local_crops

        colour = [
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], color_jitter_p),
            v2.RandomApply([HEDJitter(hed_scale, hed_bias)], hed_jitter_p),
            v2.RandomGrayscale(grayscale_p),
        ]

        def view(
            size_px: int, scale: tuple[float, float], blur_p: float, sol_p: float
        ) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(
                        size_px,
                        scale=scale,
                        interpolation=InterpolationMode.BICUBIC,
                        antialias=True,
                    ),
                    *([RandomDihedral()] if dihedral else []),
                    *colour,
                    v2.RandomApply([GaussianBlur(blur_sigma)], blur_p),
                    v2.RandomSolarize(0.5, sol_p),
                    v2.Normalize(list(mean), list(std)),
                ]
            )

        self.global_views = [
            view(global_size_px, global_scale, global_blur_p[0], 0.0),
            view(global_size_px, global_scale, global_blur_p[1], solarize_p),
        ]
        self.local_view = view(local_size_px, local_scale, local_blur_p, 0.0)

    @property
    def n_crops(self) -> int:
        """Number of crops per tile: 2 global plus the local ones."""
        return 2 + self.n_local_crops

    def __call__(self, tile: np.ndarray) -> list[Tensor]:
        """Make the crops of one tile.

        Args:
            tile: ``(H, W, 3)`` uint8 RGB tile.

        Returns:
            ``n_crops`` float32 tensors: 2 of ``(3, global_size_px, global_size_px)`` then
            ``n_local_crops`` of ``(3, local_size_px, local_size_px)``, normalised.

        Raises:
            MilkitError: If the tile is not an ``(H, W, 3)`` uint8 array.
        """
        if (
            not isinstance(tile, np.ndarray)
            or tile.dtype != np.uint8
            or tile.ndim != 3
            or tile.shape[2] != 3
        ):
            got = f"{type(tile).__name__} {getattr(tile, 'shape', '')} {getattr(tile, 'dtype', '')}"
            raise MilkitError(
                f"MultiCropAugmentation expects an (H, W, 3) uint8 RGB tile, got {got}; "
                "drop the alpha channel and convert to uint8 first."
            )
        image = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)
        crops = [transform(image) for transform in self.global_views]
        crops.extend(self.local_view(image) for _ in range(self.n_local_crops))
        return crops


def collate_crops(samples: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Stack the crops of several tiles crop by crop (a DataLoader ``collate_fn``).

    Args:
        samples: ``B`` lists of ``n_crops`` tensors as returned by `MultiCropAugmentation`.

    Returns:
        ``n_crops`` tensors ``(B, 3, S_i, S_i)``, global crops first.

    Raises:
        MilkitError: If ``samples`` is empty or the tiles have different numbers of crops.
    """
    if not samples:
        raise MilkitError("collate_crops got an empty batch; check the tile dataset is not empty.")
    counts = {len(sample) for sample in samples}
    if len(counts) != 1:
        raise MilkitError(
            f"collate_crops got tiles with different numbers of crops {sorted(counts)}; "
            "use one MultiCropAugmentation for the whole dataset."
        )
    return [torch.stack(crops) for crops in zip(*samples, strict=True)]
