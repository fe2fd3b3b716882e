"""Batched, replayable image augmentations.

Every random choice is drawn as a tensor first (crop boxes, flips, CutMix parameters) and then applied to the
whole batch at once, so the relabel stage can store the choices and a student can replay them exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import roi_align


class CropFlip(NamedTuple):
    boxes: torch.Tensor  # [B, 4] float32 (x1, y1, x2, y2) in pixels of the source image
    flips: torch.Tensor  # [B] bool


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
) -> CropFlip:
    """RandomResizedCrop boxes (torchvision's distribution, clipped instead of retried) plus flips."""
    area = size * size
    target = area * torch.empty(batch).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).clamp(1.0, size)
    h = torch.sqrt(target / aspect).clamp(1.0, size)
    x1 = torch.rand(batch, generator=generator) * (size - w)
    y1 = torch.rand(batch, generator=generator) * (size - h)
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    flips = torch.rand(batch, generator=generator) < 0.5
    return CropFlip(boxes.float(), flips)


def apply_crop_flip(images: torch.Tensor, params: CropFlip, out_size: int | None = None) -> torch.Tensor:
    """Crop every image to its box and resize, in one differentiable roi_align call; then flip."""
    b, _, h, _ = images.shape
    out = out_size or h
    boxes = params.boxes.to(device=images.device, dtype=images.dtype)
    rois = torch.cat([torch.arange(b, device=images.device, dtype=images.dtype)[:, None], boxes], dim=1)
    cropped = roi_align(images, rois, output_size=(out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flips = params.flips.to(images.device)[:, None, None, None]
    return torch.where(flips, cropped.flip(-1), cropped)


def random_roll(images: torch.Tensor, jitter: int, generator: torch.Generator) -> torch.Tensor:
    """One random shift for the whole batch (as the published recover step does)."""
    if jitter <= 0:
        return images
    dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
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
    """Full-size boxes shifted by up to `max_shift` pixels (zero padding outside) plus flips."""
    offsets = (torch.rand(batch, 2, generator=generator) * 2 - 1) * max_shift
    boxes = torch.cat([offsets, offsets + size], dim=1)
    flips = torch.rand(batch, generator=generator) < 0.5
    return CropFlip(boxes.float(), flips)


def train_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Teacher training augmentation, batched.

    Small images (≤ 64 px) get a shift of up to 1/16 of the side + flip: a random resized crop at 32 px
    rescales or cuts away the few pixels that tell fine-grained classes apart. Larger images get the usual
    RandomResizedCrop(0.35–1) + flip.
    """
    size = images.shape[-1]
    if size <= 64:
        params = sample_shift_flip(images.shape[0], size, generator, max_shift=size / 16)
    else:
        params = sample_crop_flip(images.shape[0], size, generator, scale=(0.35, 1.0))
    return apply_crop_flip(images, params)
