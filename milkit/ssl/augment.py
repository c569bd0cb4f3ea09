"""Multi-crop augmentation of H&E tiles for DINO pretraining, batched.

A batch of tiles (uint8 RGB, ``(B, H, W, 3)`` as read) becomes 2 global crops followed by
``n_local_crops`` local crops, each a normalised float32 batch ``(B, 3, S, S)``. Every operation
is vectorised over the batch with per-tile random parameters, so the same code runs in
DataLoader workers (CPU) or on the training device after the transfer (GPU), where it costs a
fraction of a training step instead of bounding it. Random draws use torch's RNG on the
tiles' device, so DataLoader workers draw different crops.

Defaults follow DINO (Caron et al. 2021) with histology changes: flips and 90° rotations (the
dihedral group, label-preserving for tissue), milder colour jitter, an H&E stain jitter in
optical-density space, hue jitter and grayscale/solarisation off (DINO used hue 0.1 and 0.2
each for grayscale/solarisation on ImageNet). Normalisation defaults to the ImageNet mean/std,
the usual choice for ViTs on H&E; the exported backbone records the values used, so feature
extraction normalises the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.ops import roi_align

from milkit.errors import ConfigError, MilkitError

__all__ = [
    "AugmentingCollate",
    "MultiCropAugmentation",
    "ViewAugmentation",
    "collate_tiles",
    "gaussian_blur",
    "hed_jitter",
    "random_resized_crop",
]

# Pixels of value 0 would have infinite optical density; skimage's rgb2hed clamps the same way.
_MIN_INTENSITY = 1e-6
# ITU-R 601 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
# RandomResizedCrop's aspect-ratio range and number of draws before its fallback
_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10


def _uniform(low: float, high: float, n: int, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def _identity_unless(apply: Tensor, values: Tensor, identity: float) -> Tensor:
    """``values`` where ``apply``, else ``identity``: a skipped op becomes a no-op."""
    return torch.where(apply.view(-1, *[1] * (values.ndim - 1)), values, identity)


def _luma(images: Tensor) -> Tensor:
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights)[:, None]


def random_resized_crop(
    images: Tensor,
    size_px: int,
    scale: tuple[float, float],
    *,
    dihedral: bool = True,
) -> Tensor:
    """One random crop per image, resized, then flipped and rotated.

    Boxes follow torchvision's RandomResizedCrop (area fraction uniform in ``scale``, aspect
    ratio log-uniform in [3/4, 4/3], 10 draws, else the whole image) with sub-pixel corners.
    The resampling is RoIAlign's: bilinear samples averaged over each output pixel (as many as
    the box has input pixels per output pixel), so shrinking a crop antialiases, like the
    resize of feature extraction. The symmetry is a uniform draw from the 8 of the square.

    Args:
        images: ``(B, C, H, W)`` float images.
        size_px: Side of the output crops.
        scale: ``(low, high)`` area fraction of the image a crop covers.
        dihedral: Apply a random flip and 90° rotation.

    Returns:
        ``(B, C, size_px, size_px)`` crops.
    """
    n, _, height, width = images.shape
    device = images.device
    area = torch.empty(n, _CROP_TRIES, device=device).uniform_(*scale) * (height * width)
    log_ratio = torch.empty(n, _CROP_TRIES, device=device).uniform_(*map(math.log, _RATIO))
    box_w = torch.sqrt(area * log_ratio.exp())
    box_h = torch.sqrt(area / log_ratio.exp())
    fits = (box_w <= width) & (box_h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # first draw that fits (0 if none)
    any_fit = fits.any(dim=1)
    box_w = torch.where(any_fit, box_w.gather(1, first)[:, 0], float(width))
    box_h = torch.where(any_fit, box_h.gather(1, first)[:, 0], float(height))
    left = torch.rand(n, device=device) * (width - box_w)
    top = torch.rand(n, device=device) * (height - box_h)
    boxes = torch.stack(
        [torch.arange(n, device=device, dtype=left.dtype), left, top, left + box_w, top + box_h],
        dim=1,
    )
    crops = roi_align(images, boxes.to(images.dtype), size_px, aligned=True, sampling_ratio=-1)
    if not dihedral:
        return crops
    flip = torch.rand(n, device=device) < 0.5
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    turns = torch.randint(4, (n,), device=device)
    for k in (1, 2, 3):
        chosen = turns == k
        crops[chosen] = torch.rot90(crops[chosen], k, dims=(-2, -1))
    return crops


def hed_jitter(images: Tensor, factor: Tensor, shift: Tensor) -> Tensor:
    """Scale and shift haematoxylin, eosin and DAB amounts by colour deconvolution.

    RGB becomes optical density ``-ln(rgb)``, is unmixed with scikit-image's HED stain matrix,
    each stain ``s`` becomes ``s·factor + shift``, and the result is mixed back.

    Args:
        images: ``(B, 3, H, W)`` float RGB in [0, 1].
        factor: ``(B, 3)`` multiplicative change per image and stain.
        shift: ``(B, 3)`` additive change per image and stain, in optical density.

    Returns:
        ``(B, 3, H, W)`` float RGB in [0, 1].
    """
    to_hed = torch.tensor(hed_from_rgb, device=images.device, dtype=images.dtype)
    to_rgb = torch.tensor(rgb_from_hed, device=images.device, dtype=images.dtype)
    density = -torch.log(images.clamp(min=_MIN_INTENSITY))
    stains = torch.einsum("bchw,cs->bshw", density, to_hed)
    stains = stains * factor[:, :, None, None] + shift[:, :, None, None]
    return torch.exp(-torch.einsum("bshw,sc->bchw", stains, to_rgb)).clamp(0.0, 1.0)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with a sigma per image, as two 1-D passes (reflected borders).

    Kernels reach ``ceil(3·sigma)`` pixels of the largest sigma (torchvision's
    ``gaussian_blur`` with that kernel size gives the same result); sigma 0 leaves an image
    unchanged.

    Args:
        images: ``(B, C, H, W)`` float images.
        sigma: ``(B,)`` blur sigma in pixels, >= 0.

    Returns:
        ``(B, C, H, W)`` blurred images.
    """
    n, channels, height, width = images.shape
    top = float(sigma.max()) if n else 0.0
    if top <= 0:
        return images
    radius = max(1, min(math.ceil(3 * top), height - 1, width - 1))  # reflect needs < side
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigma.clamp(min=1e-6).to(images.dtype)[:, None]
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma 0: a delta, up to 1e-38 taps
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, 2r+1), one per channel
    # every channel of every image its own group: one convolution for the whole batch
    out = F.pad(images.reshape(1, n * channels, height, width), (radius,) * 4, mode="reflect")
    out = F.conv2d(out, kernel[:, None, None, :], groups=n * channels)
    out = F.conv2d(out, kernel[:, None, :, None], groups=n * channels)
    return out.view(n, channels, height, width)


def _check_unit_interval(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{owner}: {name}={value} must lie in [0, 1].")


def _check_scale(owner: str, name: str, value: tuple[float, float]) -> None:
    low, high = value
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(
            f"{owner}: {name}={value} must satisfy 0 < low <= high <= 1 "
            "(fractions of the tile area)."
        )


@dataclass(frozen=True)
class ViewAugmentation:
    """The random changes every DINO view gets besides its crop, drawn per tile and per view.

    Kept apart from `MultiCropAugmentation`'s crop geometry as one typed group so that configs
    merge key by key: a second ``--config`` that sets only ``data.augmentation.hed_scale`` keeps
    the first one's ``blur_sigma``.

    Args:
        dihedral: Random flips and 90° rotations.
        color_jitter_p: Probability of colour jitter.
        brightness: Colour-jitter brightness strength (factor uniform in 1 ± brightness).
        contrast: Colour-jitter contrast strength.
        saturation: Colour-jitter saturation strength.
        hue: Colour-jitter hue strength, a fraction of the colour circle (rotation of the
            chroma plane in YIQ space). Off by default: the stain jitter models H&E colour
            shifts more faithfully (0.02 is a mild value when wanted).
        hed_jitter_p: Probability of H&E stain jitter.
        hed_scale: Multiplicative stain jitter half-width (see `hed_jitter`).
        hed_bias: Additive stain jitter half-width in optical density.
        grayscale_p: Probability of converting a crop to grayscale.
        blur_sigma: Range of the Gaussian blur sigma in pixels.
        global_blur_p: Blur probabilities of the first and the second global crop.
        local_blur_p: Blur probability of each local crop.
        solarize_p: Solarisation probability of the second global crop.

    Raises:
        ConfigError: If a probability, strength or sigma range is invalid.
    """

    dihedral: bool = True
    color_jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.0
    hed_jitter_p: float = 0.5
    hed_scale: float = 0.05
    hed_bias: float = 0.02
    grayscale_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_blur_p: tuple[float, float] = (1.0, 0.1)
    local_blur_p: float = 0.5
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in [
            "color_jitter_p",
            "hed_jitter_p",
            "grayscale_p",
            "local_blur_p",
            "solarize_p",
            "brightness",
            "contrast",
            "saturation",
        ]:
            _check_unit_interval(owner, name, getattr(self, name))
        for index, p in enumerate(self.global_blur_p):
            _check_unit_interval(owner, f"global_blur_p[{index}]", p)
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"{owner}: hue={self.hue} must lie in [0, 0.5].")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"{owner}: blur_sigma={self.blur_sigma} needs 0 < low <= high.")


class MultiCropAugmentation:
    """DINO multi-crop views of a batch of H&E tiles.

    The first two crops are global (``global_size_px``, ``global_scale``), the remaining
    ``n_local_crops`` local. As in DINO the two global views are asymmetric: the first is
    blurred with probability ``views.global_blur_p[0]``, the second with
    ``views.global_blur_p[1]``, and only the second may be solarised. Each view applies, per
    tile: crop, flip/rotation, colour jitter (brightness, contrast, saturation, hue, in that
    order), stain jitter, grayscale, blur, solarisation and normalisation.

    Args:
        global_size_px: Side of a global crop in pixels.
        local_size_px: Side of a local crop in pixels.
        n_local_crops: Number of local crops (0 disables them).
        global_scale: Area fraction range of the tile a global crop covers.
        local_scale: Area fraction range of the tile a local crop covers.
        views: The random changes of every view (flips, colour, stain, blur ...).
        mean: Per-channel normalisation mean (RGB, of [0, 1] intensities).
        std: Per-channel normalisation standard deviation.

    Raises:
        ConfigError: If a size, count, scale range or std is invalid.
    """

    def __init__(
        self,
        *,
        global_size_px: int = 224,
        local_size_px: int = 96,
        n_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        views: ViewAugmentation = ViewAugmentation(),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        owner = type(self).__name__
        if global_size_px < 1 or local_size_px < 1:
            raise ConfigError(
                f"{owner}: crop sizes must be positive, got "
                f"global_size_px={global_size_px}, local_size_px={local_size_px}."
            )
        if n_local_crops < 0:
            raise ConfigError(f"{owner}: n_local_crops={n_local_crops} must be >= 0.")
        _check_scale(owner, "global_scale", global_scale)
        _check_scale(owner, "local_scale", local_scale)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"{owner}: mean={mean} and std={std} need 3 values each, std > 0.")
        self.global_size_px = global_size_px
        self.local_size_px = local_size_px
        self.n_local_crops = n_local_crops
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.views = views
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def n_crops(self) -> int:
        """Number of crops per tile: 2 global plus the local ones."""
        return 2 + self.n_local_crops

    def __call__(self, tiles: Tensor | np.ndarray) -> list[Tensor]:
        """Make the crops of a batch of tiles.

        Args:
            tiles: ``(B, H, W, 3)`` uint8 RGB tiles (as `collate_tiles` stacks them), on the
                device the augmentation should run on.

        Returns:
            ``n_crops`` float32 batches on that device: 2 of ``(B, 3, global_size_px,
            global_size_px)`` then ``n_local_crops`` of ``(B, 3, local_size_px, local_size_px)``,
            normalised.

        Raises:
            MilkitError: If ``tiles`` is not a ``(B, H, W, 3)`` uint8 array.
        """
        if isinstance(tiles, np.ndarray):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles))
        if (
            not isinstance(tiles, Tensor)
            or tiles.dtype != torch.uint8
            or tiles.ndim != 4
            or tiles.shape[3] != 3
        ):
            shape, dtype = getattr(tiles, "shape", ""), getattr(tiles, "dtype", "")
            got = f"{type(tiles).__name__} {shape} {dtype}"
            raise MilkitError(
                f"MultiCropAugmentation expects a (B, H, W, 3) uint8 RGB batch of tiles, got "
                f"{got}; drop the alpha channel, convert to uint8 and stack (collate_tiles)."
            )
        images = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        views = self.views
        blur_p = [*views.global_blur_p, *[views.local_blur_p] * self.n_local_crops]
        solarize_p = [0.0, views.solarize_p, *[0.0] * self.n_local_crops]
        return [
            self._view(images, index, blur_p[index], solarize_p[index])
            for index in range(self.n_crops)
        ]

    def _view(self, images: Tensor, index: int, blur_p: float, solarize_p: float) -> Tensor:
        """One crop of every image: geometry, colour, blur, solarisation, normalisation."""
        is_global = index < 2
        size_px = self.global_size_px if is_global else self.local_size_px
        scale = self.global_scale if is_global else self.local_scale
        views = self.views
        crops = random_resized_crop(images, size_px, scale, dihedral=views.dihedral)
        n, device = len(crops), crops.device

        def chance(p: float) -> Tensor:
            return torch.rand(n, device=device) < p

        crops = self._colour_jitter(crops, chance(views.color_jitter_p))
        jitter = chance(views.hed_jitter_p)
        if jitter.any():
            factor = 1.0 + views.hed_scale * (2 * torch.rand(n, 3, device=device) - 1)
            shift = views.hed_bias * (2 * torch.rand(n, 3, device=device) - 1)
            crops = hed_jitter(
                crops, _identity_unless(jitter, factor, 1.0), _identity_unless(jitter, shift, 0.0)
            )
        gray = chance(views.grayscale_p)
        if gray.any():
            crops = torch.where(gray[:, None, None, None], _luma(crops).expand_as(crops), crops)
        blur = chance(blur_p)
        if blur.any():
            sigma = _uniform(*views.blur_sigma, n, device)
            crops = gaussian_blur(crops, _identity_unless(blur, sigma, 0.0))
        solarize = chance(solarize_p)
        if solarize.any():
            flipped = torch.where(crops >= 0.5, 1.0 - crops, crops)
            crops = torch.where(solarize[:, None, None, None], flipped, crops)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (crops - mean) / std

    def _colour_jitter(self, crops: Tensor, apply: Tensor) -> Tensor:
        """Brightness, contrast, saturation and hue changes of the images where ``apply``."""
        if not apply.any():
            return crops
        views = self.views
        n, device = len(crops), crops.device

        def factor(strength: float) -> Tensor:
            drawn = _uniform(1 - strength, 1 + strength, n, device)
            return _identity_unless(apply, drawn, 1.0).view(n, 1, 1, 1)

        crops = (crops * factor(views.brightness)).clamp(0.0, 1.0)
        grey_level = _luma(crops).mean(dim=(2, 3), keepdim=True)
        crops = (grey_level + factor(views.contrast) * (crops - grey_level)).clamp(0.0, 1.0)
        luma = _luma(crops)
        crops = (luma + factor(views.saturation) * (crops - luma)).clamp(0.0, 1.0)
        if views.hue > 0:
            turns = _uniform(-views.hue, views.hue, n, device)
            crops = _rotate_hue(crops, _identity_unless(apply, turns, 0))
        return crops


def _rotate_hue(images: Tensor, turns: Tensor) -> Tensor:
    """Rotate the chroma plane (I, Q of YIQ) by ``turns`` of a full circle per image."""
    to_yiq = torch.tensor(
        [_LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)],
        device=images.device,
        dtype=images.dtype,
    )
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(images), 3, 3, device=images.device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3) in RGB
    return torch.einsum("bij,bjhw->bihw", transform, images).clamp(0.0, 1.0)


def collate_tiles(samples: Sequence[np.ndarray | Tensor]) -> Tensor:
    """Stack tiles into one uint8 batch (a DataLoader ``collate_fn``).

    Args:
        samples: ``B`` tiles ``(H, W, 3)`` uint8.

    Returns:
        ``(B, H, W, 3)`` uint8 tensor.

    Raises:
        MilkitError: If ``samples`` is empty or the tiles differ in shape.
    """
    if not len(samples):
        raise MilkitError("collate_tiles got an empty batch; check the tile dataset is not empty.")
    shapes = {tuple(sample.shape) for sample in samples}
    if len(shapes) != 1:
        raise MilkitError(
            f"collate_tiles got tiles of different shapes {sorted(shapes)}; tile every slide "
            "with one tile size (milkit tile --tile-size)."
        )
    return torch.stack([torch.as_tensor(np.asarray(sample)) for sample in samples])


class AugmentingCollate:
    """``collate_fn`` that stacks tiles and makes their crops in the DataLoader worker.

    Args:
        augmentation: The multi-crop augmentation.
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.augmentation = augmentation

    def __call__(self, samples: Sequence[np.ndarray | Tensor]) -> list[Tensor]:
        """``n_crops`` batches ``(B, 3, S_i, S_i)``, global crops first."""
        return self.augmentation(collate_tiles(samples))
