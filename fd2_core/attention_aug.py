"""Attention-guided crop and drop augmentation of CAL pretraining, batched over samples.

Per sample two attention maps are drawn, with replacement, with probability ∝ sqrt(map sum) (both may be the
same map): the first decides a crop, the second a drop. The crop box covers the upsampled map's pixels at or
above U(0.4, 0.6)·max, grown by 10 % of the side: rows from int(min − 0.1·H) to int(max + 0.1·H), end exclusive,
clipped to the image (likewise for columns); the crop is resized back to the full size bilinearly with aligned
corners. The drop zeroes the pixels where the upsampled map ≥ U(0.2, 0.5)·max. Thresholds use the maximum of
the low-resolution map. Source: the published FD² code, which upsamples the maps bilinearly with
align_corners=False; the CAL paper's code upsamples them with aligned corners (`align_corners=True`, spec
`cal_crop_drop: cal-code`).
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
    """Indices [B, 2] (crop map, drop map) per sample of CAL maps [B, M, h, w], drawn with replacement with
    probability ∝ sqrt(map sum), as the published code's `np.random.choice(M, 2, p=…)` (replace defaults to
    True): both picks may be the same map."""
    weights = torch.sqrt(attention.detach().float().sum(dim=(2, 3)).clamp_min(0.0) + _WEIGHT_EPS)
    probabilities = weights / weights.sum(dim=1, keepdim=True)
    picks = torch.multinomial(
        probabilities.to(_generator_device(generator, attention.device)), 2, replacement=True, generator=generator
    )
    return picks.to(attention.device)


def upsample_maps(maps: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """[B, K, h, w] → [B, K, H, W], bilinear. align_corners=False is the published FD² code (`F.interpolate`'s
    default); True is the CAL code's `F.upsample_bilinear`."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=align_corners)


def _padded_bounds(first: Tensor, last: Tensor, padding: float, side: int) -> tuple[Tensor, Tensor]:
    """Published bounds [B] of one axis: (max(int(first − padding·side), 0), min(int(last + padding·side), side)).

    Computed in float64 and truncated toward zero as Python's int() of the published code's float. The end is
    kept at least one past the start: the published code would slice an empty crop there (only possible when
    padding·side < 1)."""
    pad = padding * side
    start = (first.double() - pad).trunc().long().clamp_min(0)
    end = (last.double() + pad).trunc().long().clamp_max(side)
    return start, torch.maximum(end, start + 1)


def mask_boxes(mask: Tensor, padding: float) -> Tensor:
    """Crop boxes [B, 4] = (y0, x0, y1, x1), end exclusive, of boolean masks [B, H, W] (the published rule):
    y0 = max(int(min_row − padding·H), 0), y1 = min(int(max_row + padding·H), H), likewise for columns. An empty
    mask gives the whole image."""
    height, width = mask.shape[-2:]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    first_row, first_col = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    last_row = height - 1 - rows.int().flip(1).argmax(dim=1)
    last_col = width - 1 - cols.int().flip(1).argmax(dim=1)
    y0, y1 = _padded_bounds(first_row, last_row, padding, height)
    x0, x1 = _padded_bounds(first_col, last_col, padding, width)
    boxes = torch.stack([y0, x0, y1, x1], dim=1)
    whole = torch.tensor([0, 0, height, width], device=mask.device)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, whole)


def crop_boxes(
    maps: Tensor, thresholds: Tensor, size: tuple[int, int], padding: float = 0.1, align_corners: bool = False
) -> Tensor:
    """Crop boxes [B, 4] (y0, x0, y1, x1; end exclusive, pixels of `size`) of maps [B, h, w] upsampled to
    `size`, from the pixels at or above each sample's absolute threshold (`thresholds` [B])."""
    upsampled = upsample_maps(maps.unsqueeze(1), size, align_corners)[:, 0]
    return mask_boxes(upsampled >= thresholds.view(-1, 1, 1), padding)


def drop_regions(images: Tensor, maps: Tensor, thresholds: Tensor, align_corners: bool = False) -> Tensor:
    """`images` [B, C, H, W] with the pixels zeroed where the maps [B, h, w], upsampled to H×W, are at or above
    each sample's absolute threshold (`thresholds` [B])."""
    batch, size = images.shape[0], (images.shape[-2], images.shape[-1])
    upsampled = upsample_maps(maps.unsqueeze(1), size, align_corners)
    keep = upsampled < thresholds.view(batch, 1, 1, 1)
    return images * keep.to(images.dtype)


def _resize_axis(start: Tensor, end: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights [B, size] that resize the span [start, end) [B] of one axis to `size` pixels
    bilinearly with aligned corners, as `F.interpolate(..., align_corners=True)` computes them: scale
    (n − 1)/(size − 1) in float32, source position scale·i, lower index floor(position) (at most n − 1), the
    upper one the next index inside the span, weights (1 − λ, λ) with λ = position − lower."""
    length = (end - start).view(-1, 1)
    scale = (length - 1).float() / max(size - 1, 1)
    position = scale * torch.arange(size, device=start.device, dtype=torch.float32)
    lower = torch.minimum(position.floor().long(), length - 1)
    lam = (position - lower.float()).clamp(0.0, 1.0)
    upper = lower + (lower < length - 1).long()
    offset = start.view(-1, 1)
    return offset + lower, offset + upper, 1.0 - lam, lam


def crop_and_resize(images: Tensor, boxes: Tensor) -> Tensor:
    """Crop each image [B, C, H, W] to its box [B, 4] (y0, x0, y1, x1; end exclusive) and resize it back to H×W.

    Bilinear with aligned corners, as the published code's `F.upsample_bilinear` of each sliced crop: the same
    source indices and weights (`_resize_axis`), gathered for the whole batch at once (so it agrees with the
    per-sample resize to float rounding and passes gradients to `images`).
    """
    batch, channels, height, width = images.shape
    boxes = boxes.to(images.device, torch.long)
    y_low, y_high, wy_low, wy_high = _resize_axis(boxes[:, 0], boxes[:, 2], height)
    x_low, x_high, wx_low, wx_high = _resize_axis(boxes[:, 1], boxes[:, 3], width)

    def rows(index: Tensor) -> Tensor:
        return images.gather(2, index.view(batch, 1, height, 1).expand(batch, channels, height, width))

    def cols(source: Tensor, index: Tensor) -> Tensor:
        return source.gather(3, index.view(batch, 1, 1, width).expand(batch, channels, height, width))

    wx_low, wx_high = (w.to(images.dtype).view(batch, 1, 1, width) for w in (wx_low, wx_high))
    wy_low, wy_high = (w.to(images.dtype).view(batch, 1, height, 1) for w in (wy_low, wy_high))
    top, bottom = rows(y_low), rows(y_high)
    top = cols(top, x_low) * wx_low + cols(top, x_high) * wx_high
    bottom = cols(bottom, x_low) * wx_low + cols(bottom, x_high) * wx_high
    return top * wy_low + bottom * wy_high


def attention_crop_drop(
    images: Tensor,
    attention: Tensor,
    generator: torch.Generator | None = None,
    crop_threshold: tuple[float, float] = (0.4, 0.6),
    drop_threshold: tuple[float, float] = (0.2, 0.5),
    padding: float = 0.1,
    align_corners: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention-cropped and attention-dropped copies of `images` [B, 3, H, W] given CAL maps [B, M, h, w].

    Draws from `generator`: the two maps per sample (`select_attention_maps`), then the crop thresholds, then
    the drop thresholds. `align_corners` chooses the maps' upsampling (False: published FD² code; True: CAL code).
    """
    batch = images.shape[0]
    size = (images.shape[-2], images.shape[-1])
    attention = attention.detach().float()
    picks = select_attention_maps(attention, generator)
    chosen = attention[torch.arange(batch, device=attention.device).unsqueeze(1), picks]  # [B, 2, h, w]
    peaks = chosen.amax(dim=(2, 3))  # [B, 2]
    crop_theta = uniform_thresholds(batch, crop_threshold, generator, attention.device) * peaks[:, 0]
    drop_theta = uniform_thresholds(batch, drop_threshold, generator, attention.device) * peaks[:, 1]
    boxes = crop_boxes(chosen[:, 0], crop_theta, size, padding, align_corners)
    crops = crop_and_resize(images, boxes)
    drops = drop_regions(images, chosen[:, 1], drop_theta, align_corners)
    return crops, drops
