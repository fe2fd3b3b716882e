"""torchvision's RandomResizedCrop, drawn and resampled per sample for a whole batch at once.

`sample_resized_crop_boxes` draws boxes by `torchvision.transforms.RandomResizedCrop.get_params`'s rule and
`resized_crop` resamples them as `torchvision.transforms.functional.resized_crop(..., antialias=True)` does on
tensors (the antialiased bilinear filter of `torch.nn.functional.interpolate`); both agree with torchvision to
float precision (tests/core/test_crops.py). They are our own code because torchvision's transform draws one box per
call from the global RNG, per-sample boxes would need a Python loop over samples, and `resized_crop`'s
intermediate crop has a box-dependent shape, so it cannot be batched. Here a crop + resize is two per-sample
weight matrices applied as batched matrix products: static shapes, any box, differentiable w.r.t. the pixels.
"""

from __future__ import annotations

import math

import torch


def _pick_first_valid(values: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, A] values, [B, 1] attempt index → [B] value of that attempt."""
    return values.gather(1, first).squeeze(1)


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of get_params's centre crop after 10 failed attempts: the whole image, clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def sample_resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """[B, 4] float32 boxes (x1, y1, x2, y2), integer-valued, end exclusive, always inside the image.

    get_params's rule for every sample at once: `attempts` target areas U(scale)·H·W and log-uniform aspect
    ratios; w = round(√(area·ar)), h = round(√(area/ar)) (half to even, as Python's round); the first attempt
    with 0 < w ≤ W and 0 < h ≤ H wins, and with none the centre crop of the whole image clamped to `ratio`;
    the top-left corner is uniform over the integer positions that keep the box inside. All draws come from
    `generator` (CPU), a fixed number per call. Raises RuntimeError (from torch) when scale or ratio is
    reversed (low > high).
    """
    area = height * width
    target = area * torch.empty(batch, attempts, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(batch, attempts, dtype=torch.float64).uniform_(*log_ratio, generator=generator).exp()
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    found = valid.any(dim=1)
    fallback_h, fallback_w = _fallback_size(height, width, ratio)
    w = torch.where(found, _pick_first_valid(w, first), float(fallback_w))
    h = torch.where(found, _pick_first_valid(h, first), float(fallback_h))
    corner = torch.rand(batch, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(corner[:, 0] * (height - h + 1)), float((height - fallback_h) // 2))
    left = torch.where(found, torch.floor(corner[:, 1] * (width - w + 1)), float((width - fallback_w) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _checked_boxes(boxes: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, 4] or [1, 4] boxes; raises ValueError for any other shape."""
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] not in (1, batch):
        raise ValueError(f"boxes must be [{batch}, 4] or [1, 4], got {list(boxes.shape)}")
    return boxes


def _axis_weights(
    start: torch.Tensor, stop: torch.Tensor, length: int, out: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[n, out, length] resampling weights along one axis: output i of box [start, stop) reads image pixel y.

    interpolate's antialiased bilinear filter on the cropped box: scale s = side/out, support max(s, 1),
    centre s·(i + 0.5) in box coordinates, weight tri((j + 0.5 − centre)/max(s, 1)) for box pixel j,
    normalised over the box's pixels. Box pixels outside the image are the zero padding of torchvision's crop:
    they count in the normaliser and are then dropped. Built over the union of the image and all boxes, so
    `start`/`stop` ([n], integer-valued, on the CPU as drawn; elsewhere this costs one device sync) may leave it.
    """
    lo, hi = min(0, int(start.min())), max(length, int(stop.max()))
    start = start.to(device=device, dtype=dtype)[:, None, None]
    stop = stop.to(device=device, dtype=dtype)[:, None, None]
    side = stop - start
    scale = side / out
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out, device=device, dtype=dtype)[None, :, None] + 0.5)  # in box coordinates
    j = torch.arange(lo, hi, device=device, dtype=dtype)[None, None, :] - start  # exact: integer-valued
    taps = (1.0 - ((j + 0.5 - centre) / support).abs()).clamp(min=0.0)
    taps = taps * ((j >= 0) & (j < side))
    weights = taps / taps.sum(dim=2, keepdim=True)
    return weights[:, :, -lo : length - lo]


def _resample(images: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] images, [B|1, oh, H] rows and [B|1, ow, W] columns → [B,C,oh,ow] = Wy · image · Wxᵀ per sample.

    One shared box is two plain matrix products over the whole batch; per-sample boxes are one bmm over
    (channel, row) then one broadcast matmul over channels.
    """
    if wy.shape[0] == 1:
        return wy[0] @ (images @ wx[0].T)
    b, c, h, w = images.shape
    rows = torch.bmm(images.reshape(b, c * h, w), wx.transpose(1, 2)).view(b, c, h, wx.shape[1])
    return wy[:, None] @ rows


def _shared(boxes: torch.Tensor, flips: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boxes (and flips) collapsed to one row when every row is the same (CPU tensors only: no device sync)."""
    if boxes.shape[0] == 1 or boxes.device.type != "cpu" or not bool((boxes == boxes[:1]).all()):
        return boxes, flips
    if flips is None:
        return boxes[:1], None
    if flips.device.type != "cpu" or not bool((flips == flips[:1]).all()):
        return boxes, flips
    return boxes[:1], flips[:1]


def _whole_image(boxes: torch.Tensor, height: int, width: int, out: tuple[int, int]) -> bool:
    """True when every box is the whole image at its own size (CPU boxes only): the crop is the identity."""
    if out != (height, width) or boxes.device.type != "cpu":
        return False
    return bool((boxes == torch.tensor([0.0, 0.0, width, height], dtype=boxes.dtype)).all())


def resized_crop(
    images: torch.Tensor,
    boxes: torch.Tensor,
    out_size: int | tuple[int, int],
    *,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each of [B,C,H,W] `images` to its box and resize to `out_size`: [B,C,oh,ow], images' dtype/device.

    `boxes` [B, 4] (one per image) or [1, 4] (one for the batch) hold integer-valued (x1, y1, x2, y2), end
    exclusive, sides ≥ 1, as `sample_resized_crop_boxes` draws them; an int `out_size` is a square (RandomResizedCrop's
    size, not resize's shorter side). The result equals
    `torchvision.transforms.functional.resized_crop(img, y1, x1, y2 − y1, x2 − x1, [oh, ow],
    InterpolationMode.BILINEAR, antialias=True)` on each float image to float precision, including a box
    reaching outside the image (zero padding, as torchvision's crop pads); a whole-image box at the image's own
    size returns the images unchanged. `flips` ([B] or [1] bool) mirrors those outputs horizontally at no
    cost (the column weights are reversed). Differentiable w.r.t. `images`. Raises ValueError for boxes of
    another shape.
    """
    b, _, h, w = images.shape
    out = _pair(out_size)
    boxes, flips = _shared(_checked_boxes(boxes, b), flips)
    if _whole_image(boxes, h, w, out):
        if flips is None:
            return images
        return torch.where(flips.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    wy = _axis_weights(boxes[:, 1], boxes[:, 3], h, out[0], images.device, dtype)
    wx = _axis_weights(boxes[:, 0], boxes[:, 2], w, out[1], images.device, dtype)
    if flips is not None:
        mirrored = flips.to(images.device).view(-1, 1, 1)
        wx = torch.where(mirrored, wx.flip(1), wx)  # broadcasts one box over per-sample flips and back
        wy = wy.expand(wx.shape[0], -1, -1)
    return _resample(images, wy.to(images.dtype), wx.to(images.dtype))
