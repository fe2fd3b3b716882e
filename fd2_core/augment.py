"""Batched, replayable image augmentations.

Every random choice is drawn as a tensor first (crop boxes, flips, CutMix parameters) and then applied to the
whole batch at once, so the relabel stage can store the choices and a student can replay them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .crops import resized_crop, sample_resized_crop_boxes

Resampling = Literal["resized_crop", "roi_align"]
RESIZED_CROP: Resampling = "resized_crop"  # torchvision's resized_crop, antialiased bilinear (`crops.resized_crop`)
ROI_ALIGN: Resampling = "roi_align"  # roi_align(sampling_ratio=2, aligned=True): soft-label formats v1–v3 only


class CropFlip(NamedTuple):
    boxes: torch.Tensor  # [B, 4] float32 (x1, y1, x2, y2) in pixels of the source image
    flips: torch.Tensor  # [B] bool
    resampling: Resampling = RESIZED_CROP  # how `apply_crop_flip` resamples the boxes (replay of older files)


class CutMix(NamedTuple):
    permutation: torch.Tensor  # [B] int64, index of the partner inside the batch
    lam: float  # share of the original image that is kept (after box clipping)
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) pasted from the partner


def sample_crop_flip(
    batch: int,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    per_image: bool = True,
) -> CropFlip:
    """RandomResizedCrop boxes of a `size`² image (torchvision's rule, `sample_resized_crop_boxes`) + flips p = ½.

    per_image=False draws ONE box and ONE flip for the whole batch, repeated to [B, 4] / [B]: the published
    distill step applies one torchvision transform to the whole 4-D batch.
    """
    draws = batch if per_image else 1
    boxes = sample_resized_crop_boxes(draws, size, size, generator, scale, ratio)
    flips = torch.rand(draws, generator=generator) < 0.5
    if not per_image:
        boxes, flips = boxes.expand(batch, 4).clone(), flips.expand(batch).clone()
    return CropFlip(boxes, flips)


def apply_crop_flip(images: torch.Tensor, params: CropFlip, out_size: int | None = None) -> torch.Tensor:
    """[B,C,H,W] → [B,C,out,out] (default out = H): each image cropped to its box, resized, then flipped.

    Resampled by the rule `params.resampling` names: torchvision's resized_crop (`crops.resized_crop`, the flip
    folded into its column weights; one matrix product for the whole batch when all boxes and flips agree), or
    for soft labels recorded before format v4 the roi_align of `apply_crop_flip_roi_align`. Differentiable
    w.r.t. `images`.
    """
    if params.resampling == ROI_ALIGN:
        return apply_crop_flip_roi_align(images, params, out_size)
    return resized_crop(images, params.boxes, out_size or images.shape[2], flips=params.flips)


def apply_crop_flip_roi_align(images: torch.Tensor, params: CropFlip, out_size: int | None = None) -> torch.Tensor:
    """The resampling of soft-label formats v1–v3, kept so their files replay exactly as recorded: every box
    by one roi_align(sampling_ratio=2, aligned=True) call, then the flip."""
    b, _, h, _ = images.shape
    out = out_size or h
    boxes = params.boxes.to(device=images.device, dtype=images.dtype)
    rois = torch.cat([torch.arange(b, device=images.device, dtype=images.dtype)[:, None], boxes], dim=1)
    cropped = roi_align(images, rois, output_size=(out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flips = params.flips.to(images.device)[:, None, None, None]
    return torch.where(flips, cropped.flip(-1), cropped)


def random_roll(images: torch.Tensor, jitter: int, generator: torch.Generator) -> torch.Tensor:
    """One random roll for the whole batch, as the published distill step does: randint(0, J) pixels per axis
    (J included, Python's random.randint), drawn from `generator`."""
    if jitter <= 0:
        return images
    dx, dy = torch.randint(0, jitter + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dx, dy), dims=(2, 3))


def sample_cutmix(batch: int, size: int, alpha: float, generator: torch.Generator) -> CutMix | None:
    """CutMix with Beta(α, α); returns None when disabled. λ is recomputed from the clipped box."""
    if alpha <= 0 or batch < 2:
        return None
    # torch's Beta takes no generator: draw a sub-seed from ours so the stream stays reproducible.
    sub_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(sub_seed).beta(alpha, alpha))
    perm = torch.randperm(batch, generator=generator)
    cut = math.sqrt(1.0 - lam)
    cw, ch = int(size * cut), int(size * cut)
    cx, cy = torch.randint(0, size, (2,), generator=generator).tolist()
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, size)
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, size)
    lam = 1.0 - (x2 - x1) * (y2 - y1) / (size * size)
    return CutMix(perm, lam, (x1, y1, x2, y2))


def apply_cutmix(images: torch.Tensor, params: CutMix | None) -> torch.Tensor:
    if params is None:
        return images
    x1, y1, x2, y2 = params.box
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = images[params.permutation.to(images.device), :, y1:y2, x1:x2]
    return mixed


def sample_shift_flip(batch: int, size: int, generator: torch.Generator, max_shift: float) -> CropFlip:
    """Whole-image boxes shifted by an integer offset in [−⌊max_shift⌋, ⌊max_shift⌋] per axis, plus flips.

    At scale 1 `resized_crop` copies pixels exactly: the image moves by whole pixels with zero padding
    outside, no resampling and no blur.
    """
    reach = int(max_shift)
    offsets = torch.randint(-reach, reach + 1, (batch, 2), generator=generator).float()
    boxes = torch.cat([offsets, offsets + size], dim=1)
    flips = torch.rand(batch, generator=generator) < 0.5
    return CropFlip(boxes, flips)


PretrainAugment = Literal["auto", "published", "shift-flip", "resized-crop"]

# Published pretraining script: RandomHorizontalFlip, ColorJitter(0.2, 0.2, 0.2, 0.1), RandomRotation(15).
PUBLISHED_JITTER: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.1)  # brightness, contrast, saturation, hue
PUBLISHED_DEGREES = 15.0
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")  # codes 0-3, torchvision's numbering


class PublishedParams(NamedTuple):
    """Per-sample parameters of the published pretraining augmentation."""

    flips: torch.Tensor  # [B] bool
    jitter_order: torch.Tensor  # [B, 4] int64: per sample, the order of the JITTER_OPS codes
    jitter_factors: torch.Tensor  # [B, 4] float32: brightness, contrast, saturation factor, hue shift
    angles: torch.Tensor  # [B] float32 degrees, counter-clockwise (torchvision's sign)


def sample_published(
    batch: int,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = PUBLISHED_JITTER,
    degrees: float = PUBLISHED_DEGREES,
) -> PublishedParams:
    """Draw torchvision's distributions per sample: flip p = 0.5; ColorJitter factors U(max(0, 1−v), 1+v) and
    hue U(−h, h) in a uniformly random order; RandomRotation angle U(−degrees, degrees)."""
    b, c, s, h = jitter
    flips = torch.rand(batch, generator=generator) < 0.5
    order = torch.rand(batch, 4, generator=generator).argsort(dim=1)  # a uniform permutation per row
    low = torch.tensor([max(0.0, 1.0 - b), max(0.0, 1.0 - c), max(0.0, 1.0 - s), -h])
    high = torch.tensor([1.0 + b, 1.0 + c, 1.0 + s, h])
    factors = low + (high - low) * torch.rand(batch, 4, generator=generator)
    angles = (torch.rand(batch, generator=generator) * 2.0 - 1.0) * degrees
    return PublishedParams(flips, order, factors, angles)


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B] parameters → [B, 1, 1, 1] on the images' device and dtype, to broadcast over C, H, W."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factors, images)
    return (f * images + (1.0 - f) * other).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0, 1] → [B,1,H,W] luma with torchvision's (ITU-R 601) weights."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness, as torchvision's adjust_brightness: scale by the factor, clamp to [0, 1]."""
    return (images * _per_sample(factors, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample contrast, as torchvision's adjust_contrast: blend with the image's mean grayscale value."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample saturation, as torchvision's adjust_saturation: blend with the grayscale image."""
    return _blend(images, grayscale(images), factors)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,3,H,W] RGB in [0, 1] → h, s, v, each [B,H,W] in [0, 1] (torchvision's and Pillow's conversion)."""
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    delta = maxc - minc
    flat = delta == 0  # gray pixels: h = s = 0, and no division by zero
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return (h / 6.0 + 1.0).remainder(1.0), s, maxc


# Per HSV sector i = floor(6h), which of (v, p, q, t) goes to R, G and B.
_HSV_SECTORS = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h, s, v [B,H,W] → RGB [B,3,H,W] (the inverse of _rgb_to_hsv, torchvision's formulas)."""
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * frac)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - frac))).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)  # [B,4,H,W]
    select = _HSV_SECTORS.to(h.device)[:, sector.long().remainder(6)]  # [3,B,H,W]
    return vpqt.gather(1, select.permute(1, 0, 2, 3))


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Per-sample hue, as torchvision's adjust_hue: shift h in HSV by the factor (a share of the colour wheel)."""
    h, s, v = _rgb_to_hsv(images.float())
    shift = shifts.to(device=images.device, dtype=torch.float32).view(-1, 1, 1)
    return _hsv_to_rgb((h + shift).remainder(1.0), s, v).to(images.dtype)


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter on [B,3,H,W] images in [0, 1], each sample with its own factors and its own op order.

    torchvision's ColorJitter draws a random order of the four ops per call; per sample here. At each of the
    four positions every op runs once on the samples that have it there (gathered by index), so the work is
    one pass of each op over the batch, with no loop over samples.
    """
    out = images.clone()
    order_cpu = order.cpu()
    factors = factors.to(images.device)
    for position in range(len(_JITTER_FUNCTIONS)):
        for code, op in enumerate(_JITTER_FUNCTIONS):
            rows = (order_cpu[:, position] == code).nonzero().flatten()
            if rows.numel() == 0:
                continue
            rows = rows.to(images.device)
            out.index_copy_(0, rows, op(out.index_select(0, rows), factors.index_select(0, rows)[:, code]))
    return out


def rotate(images: torch.Tensor, angles: torch.Tensor, interpolation: str = "nearest") -> torch.Tensor:
    """Rotate every image about its centre by its own angle (degrees, counter-clockwise), zero fill outside.

    The sampling grid is torchvision's rotate (pixel-centre coordinates, align_corners=False), built for the
    whole batch with affine_grid. Nearest is RandomRotation's default interpolation; for bilinear, torchvision's
    fill=0 also scales the border pixels by the resampled coverage, and so does this.
    """
    b, c, h, w = images.shape
    rad = angles.to(device=images.device, dtype=torch.float32).deg2rad()
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    # output pixel (x, y) from the centre reads input (cos·x − sin·y, sin·x + cos·y); in [-1, 1] units per axis
    theta = torch.stack(
        [torch.stack([cos, -sin * (h / w), zero], dim=1), torch.stack([sin * (w / h), cos, zero], dim=1)], dim=1
    ).to(images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    if interpolation == "nearest":
        return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if interpolation != "bilinear":
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    with_mask = torch.cat([images, images.new_ones(b, 1, h, w)], dim=1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :c] * out[:, c:]


def _channel_stat(values: torch.Tensor | Sequence[float], images: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)


def apply_published(
    images: torch.Tensor,
    params: PublishedParams,
    mean: torch.Tensor | Sequence[float],
    std: torch.Tensor | Sequence[float],
    interpolation: str = "nearest",
) -> torch.Tensor:
    """The published pretraining augmentation on normalised [B,3,S,S] images: flip, colour jitter, rotation.

    The published script applies them to [0, 1] images before normalising, in this order, so the ops run on
    the denormalised batch (colour jitter is defined on pixel values, and the rotation's zero fill is black,
    not the mean colour) and the result is normalised again. Float throughout, without the 8-bit rounding
    of Pillow between ops.
    """
    m, s = _channel_stat(mean, images), _channel_stat(std, images)
    x = (images * s + m).clamp(0.0, 1.0)
    x = torch.where(params.flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    x = color_jitter(x, params.jitter_order, params.jitter_factors)
    x = rotate(x, params.angles, interpolation)
    return (x - m) / s


def train_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    choice: PretrainAugment = "auto",
    *,
    mean: torch.Tensor | Sequence[float] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Teacher training augmentation of normalised [B,3,S,S] images, batched, per-sample random.

    - shift-flip: an integer shift of up to 1/16 of the side (zero padding, no resampling) + flip. A random
      resized crop at 32 px rescales or cuts away the few pixels that tell fine-grained classes apart.
    - resized-crop: torchvision's RandomResizedCrop(0.35–1) + flip (`crops`).
    - auto: shift-flip at ≤ 64 px, resized-crop above.
    - published: the published pretraining script's flip + ColorJitter(0.2, 0.2, 0.2, 0.1) + rotation ±15°
      (no crop); needs the normalisation `mean` and `std` (per channel) to work in pixel space.

    torchvision's transforms draw one parameter set per call from the global RNG and its functional ops take
    one factor per call, so per-sample parameters from `generator` would need a loop over samples; the
    batched ops above follow torchvision's definitions instead (tests compare them with torchvision).
    """
    size = images.shape[-1]
    if choice == "auto":
        choice = "shift-flip" if size <= 64 else "resized-crop"
    if choice == "shift-flip":
        return apply_crop_flip(images, sample_shift_flip(images.shape[0], size, generator, max_shift=size / 16))
    if choice == "resized-crop":
        return apply_crop_flip(images, sample_crop_flip(images.shape[0], size, generator, scale=(0.35, 1.0)))
    if choice == "published":
        if mean is None or std is None:
            raise ValueError("the published augmentation needs the normalisation mean and std")
        return apply_published(images, sample_published(images.shape[0], generator), mean, std)
    raise ValueError(f"unknown pretraining augmentation {choice!r}")
