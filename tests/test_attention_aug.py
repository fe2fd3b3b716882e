"""Attention-guided crop and drop: shapes, exact masks and boxes, and a per-sample loop reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fd2_core.attention_aug import attention_crop_drop, crop_and_resize, mask_boxes, select_attention_maps

SIZE = 32


def coordinate_images(batch: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column: a crop reveals its own box."""
    rows = torch.arange(SIZE, dtype=torch.float32).view(SIZE, 1).expand(SIZE, SIZE)
    cols = rows.T
    image = torch.stack([rows, cols, torch.ones(SIZE, SIZE)])
    return image.expand(batch, 3, SIZE, SIZE).clone()


def hot_spot(batch: int, rows: slice, cols: slice, side: int = SIZE) -> torch.Tensor:
    attention = torch.zeros(batch, 1, side, side)
    attention[:, :, rows, cols] = 1.0
    return attention


def test_shapes_and_determinism():
    images = torch.randn(5, 3, SIZE, SIZE)
    attention = torch.rand(5, 4, 4, 4)
    crops, drops = attention_crop_drop(images, attention, torch.Generator().manual_seed(0))
    assert crops.shape == drops.shape == images.shape
    again = attention_crop_drop(images, attention, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again[0]) and torch.equal(drops, again[1])


def test_drop_zeroes_exactly_the_thresholded_region():
    images = torch.rand(2, 3, SIZE, SIZE) + 0.5
    attention = hot_spot(2, slice(10, 16), slice(20, 26))
    _, drops = attention_crop_drop(images, attention, torch.Generator().manual_seed(0))
    dropped = drops == 0
    expected = (attention > 0).expand_as(images)
    assert torch.equal(dropped, expected)
    assert torch.equal(drops[~expected], images[~expected])


def test_drop_of_low_resolution_map_follows_upsampled_threshold():
    images = torch.rand(3, 3, SIZE, SIZE) + 0.5
    attention = torch.rand(3, 1, 4, 4)
    _, drops = attention_crop_drop(
        images, attention, torch.Generator().manual_seed(1), drop_threshold=(0.3, 0.3)
    )
    for b in range(3):
        upsampled = F.interpolate(
            attention[b : b + 1], size=(SIZE, SIZE), mode="bilinear", align_corners=True
        )[0, 0]
        expected_zero = upsampled >= 0.3 * attention[b].max()
        assert torch.equal(drops[b, 0] == 0, expected_zero)


def test_crop_box_is_the_hot_spot_plus_padding():
    images = coordinate_images(2)
    attention = hot_spot(2, slice(10, 16), slice(20, 26))
    crops, _ = attention_crop_drop(images, attention, torch.Generator().manual_seed(0), padding=0.0)
    for b in range(2):
        assert (crops[b, 0].min().item(), crops[b, 0].max().item()) == pytest.approx((10, 15))
        assert (crops[b, 1].min().item(), crops[b, 1].max().item()) == pytest.approx((20, 25))
    padded, _ = attention_crop_drop(images, attention, torch.Generator().manual_seed(0))
    pad = int(0.1 * SIZE)
    assert (padded[0, 0].min().item(), padded[0, 0].max().item()) == pytest.approx((10 - pad, 15 + pad))
    assert (padded[0, 1].min().item(), padded[0, 1].max().item()) == pytest.approx(
        (20 - pad, min(25 + pad, 31))
    )


def test_crop_and_resize_matches_per_sample_interpolation():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 30], [10, 0, 11, 17], [7, 7, 29, 12]])
    got = crop_and_resize(images, boxes)
    for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        crop = images[b : b + 1, :, y0:y1, x0:x1]
        expected = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        assert torch.allclose(got[b : b + 1], expected, atol=1e-4)


def test_mask_boxes_matches_loop_reference_and_handles_empty_masks():
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(6, 12, 12, generator=gen) > 0.93
    masks[0] = False
    boxes = mask_boxes(masks, padding=0.1)
    for b in range(6):
        points = masks[b].nonzero().tolist()
        if not points:
            assert boxes[b].tolist() == [0, 0, 12, 12]
            continue
        ys, xs = [p[0] for p in points], [p[1] for p in points]
        expected = [max(min(ys) - 1, 0), max(min(xs) - 1, 0), min(max(ys) + 2, 12), min(max(xs) + 2, 12)]
        assert boxes[b].tolist() == expected


def test_first_map_is_drawn_with_probability_proportional_to_sqrt_of_its_sum():
    attention = torch.zeros(4000, 3, 2, 2)
    attention[:, 0] = 1.0  # sum 4 -> weight 2
    attention[:, 1] = 4.0  # sum 16 -> weight 4
    picks = select_attention_maps(attention, torch.Generator().manual_seed(4))
    assert (picks[:, 0] != picks[:, 1]).all()
    assert (picks != 2).all()  # an empty map is (practically) never drawn
    share_of_first_map = (picks[:, 0] == 0).float().mean().item()
    assert share_of_first_map == pytest.approx(2 / 6, abs=0.03)


def test_gradient_flows_through_crop_and_drop():
    images = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    crops, drops = attention_crop_drop(images, torch.rand(2, 3, 4, 4), torch.Generator().manual_seed(5))
    (crops.sum() + drops.sum()).backward()
    assert images.grad.abs().sum().item() > 0
