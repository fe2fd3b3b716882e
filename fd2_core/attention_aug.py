"""Attention-guided crop and drop augmentation of CAL pretraining, batched over samples.

Per sample two attention maps are drawn with probability ∝ sqrt(map sum): the first decides a crop (bounding
box of the upsampled map above U(0.4, 0.6)·max, padded by 10 % of the side, resized back), the second a drop
(pixels where the upsampled map ≥ U(0.2, 0.5)·max are zeroed). Thresholds use the maximum of the
low-resolution map and maps are upsampled bilinearly with aligned corners, as in the published CAL code.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

_WEIGHT_EPS = 1e-12


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def uniform_thresholds(
    size: int, bounds: tuple[float, float], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """One U(low, high) draw per sample."""
    low, high = bounds
    draws = torch.rand(size, generator=generator, device=_generator_device(generator, device))
    return (low + (high - low) * draws).to(device)


def select_attention_maps(attention: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices [B, 2] of two maps per sample, drawn ∝ sqrt(map sum) (distinct when M ≥ 2)."""
    weights = torch.sqrt(attention.detach().float().sum(dim=(2, 3)).clamp_min(0.0) + _WEIGHT_EPS)
    probabilities = weights / weights.sum(dim=1, keepdim=True)
    picks = torch.multinomial(
        probabilities.to(_generator_device(generator, attention.device)),
        2,
        replacement=attention.shape[1] < 2,
        generator=generator,
    )
    return picks.to(attention.device)


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, K, h, w] → [B, K, H, W], bilinear with aligned corners."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def mask_boxes(mask: Tensor, padding: float) -> Tensor:
    """Bounding boxes [B, 4] = (y0, x0, y1, x1), end exclusive, of boolean masks [B, H, W], grown by
    `padding`·side on each side and clipped to the image; an empty mask gives the whole image."""
    height, width = mask.shape[-2:]
    rows, cols = mask.any(dim=2).int(), mask.any(dim=1).int()
    pad_y, pad_x = int(padding * height), int(padding * width)
    y0 = (rows.argmax(dim=1) - pad_y).clamp_min(0)
    x0 = (cols.argmax(dim=1) - pad_x).clamp_min(0)
    y1 = (height - rows.flip(1).argmax(dim=1) + pad_y).clamp_max(height)
    x1 = (width - cols.flip(1).argmax(dim=1) + pad_x).clamp_max(width)
    return torch.stack([y0, x0, y1, x1], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor) -> Tensor:
    """Crop each image to its box (y0, x0, y1, x1; end exclusive) and resize it back to the full size.

    One `grid_sample` over the batch with per-sample affine grids; equals bilinear resizing of the crop with
    aligned corners.
    """
    batch, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    y0, x0, y1, x1 = boxes.unbind(dim=1)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = (x1 - 1 - x0) / max(width - 1, 1)
    theta[:, 0, 2] = (x0 + x1 - 1) / max(width - 1, 1) - 1
    theta[:, 1, 1] = (y1 - 1 - y0) / max(height - 1, 1)
    theta[:, 1, 2] = (y0 + y1 - 1) / max(height - 1, 1) - 1
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=True)
    grid = grid.to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def attention_crop_drop(
    images: Tensor,
    attention: Tensor,
    generator: torch.Generator | None = None,
    crop_threshold: tuple[float, float] = (0.4, 0.6),
    drop_threshold: tuple[float, float] = (0.2, 0.5),
    padding: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Attention-cropped and attention-dropped copies of `images` [B, 3, H, W] given CAL maps [B, M, h, w]."""
    batch = images.shape[0]
    size = (images.shape[-2], images.shape[-1])
    attention = attention.detach().float()
    picks = select_attention_maps(attention, generator)
    chosen = attention[torch.arange(batch, device=attention.device).unsqueeze(1), picks]  # [B, 2, h, w]
    peaks = chosen.amax(dim=(2, 3))  # [B, 2]
    crop_theta = uniform_thresholds(batch, crop_threshold, generator, attention.device) * peaks[:, 0]
    drop_theta = uniform_thresholds(batch, drop_threshold, generator, attention.device) * peaks[:, 1]
    upsampled = upsample_maps(chosen, size)
    crop_mask = upsampled[:, 0] >= crop_theta.view(batch, 1, 1)
    keep_mask = upsampled[:, 1] < drop_theta.view(batch, 1, 1)
    crops = crop_and_resize(images, mask_boxes(crop_mask, padding))
    drops = images * keep_mask.unsqueeze(1).to(images.dtype)
    return crops, drops
