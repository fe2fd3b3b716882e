"""Attention-guided crop and drop: shapes, exact masks and boxes, and a per-sample loop reference written as
the published FD² code does it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fd2_core.attention_aug import (
    attention_crop_drop,
    crop_and_resize,
    crop_boxes,
    drop_regions,
    mask_boxes,
    select_attention_maps,
)

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


@pytest.mark.parametrize("align_corners", [False, True], ids=["published", "cal-code"])
def test_drop_of_low_resolution_map_follows_upsampled_threshold(align_corners: bool):
    images = torch.rand(3, 3, SIZE, SIZE) + 0.5
    attention = torch.rand(3, 1, 4, 4)
    _, drops = attention_crop_drop(
        images, attention, torch.Generator().manual_seed(1), drop_threshold=(0.3, 0.3), align_corners=align_corners
    )
    for b in range(3):
        upsampled = F.interpolate(
            attention[b : b + 1], size=(SIZE, SIZE), mode="bilinear", align_corners=align_corners
        )[0, 0]
        expected_zero = upsampled >= 0.3 * attention[b].max()
        assert torch.equal(drops[b, 0] == 0, expected_zero)


def test_cal_code_upsamples_with_aligned_corners_and_differs_from_published():
    images = torch.rand(4, 3, SIZE, SIZE) + 0.5
    attention = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(6))
    runs = {
        corners: attention_crop_drop(
            images, attention, torch.Generator().manual_seed(7), drop_threshold=(0.4, 0.4), align_corners=corners
        )[1]
        for corners in (False, True)
    }
    aligned = F.interpolate(attention, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    expected_zero = aligned >= 0.4 * attention.amax(dim=(2, 3), keepdim=True)
    assert torch.equal(runs[True][:, :1] == 0, expected_zero)
    assert not torch.equal(runs[True], runs[False])


def test_crop_box_is_the_hot_spot_plus_padding():
    images = coordinate_images(2)
    attention = hot_spot(2, slice(10, 16), slice(20, 26))
    crops, _ = attention_crop_drop(images, attention, torch.Generator().manual_seed(0), padding=0.0)
    for b in range(2):  # int(max + 0) is the end, exclusive: the last hot row and column fall outside
        assert (crops[b, 0].min().item(), crops[b, 0].max().item()) == pytest.approx((10, 14))
        assert (crops[b, 1].min().item(), crops[b, 1].max().item()) == pytest.approx((20, 24))
    padded, _ = attention_crop_drop(images, attention, torch.Generator().manual_seed(0))
    # 0.1·32 = 3.2: rows int(10 − 3.2) = 6 to int(15 + 3.2) = 18 (exclusive), columns 16 to 28 (exclusive)
    assert (padded[0, 0].min().item(), padded[0, 0].max().item()) == pytest.approx((6, 17))
    assert (padded[0, 1].min().item(), padded[0, 1].max().item()) == pytest.approx((16, 27))


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
        expected = [
            max(int(min(ys) - 0.1 * 12), 0),
            max(int(min(xs) - 0.1 * 12), 0),
            min(int(max(ys) + 0.1 * 12), 12),
            min(int(max(xs) + 0.1 * 12), 12),
        ]
        assert boxes[b].tolist() == expected


def test_maps_are_drawn_with_probability_proportional_to_sqrt_of_their_sum():
    attention = torch.zeros(4000, 3, 2, 2)
    attention[:, 0] = 1.0  # sum 4 -> weight 2
    attention[:, 1] = 4.0  # sum 16 -> weight 4
    picks = select_attention_maps(attention, torch.Generator().manual_seed(4))
    assert (picks != 2).all()  # an empty map is (practically) never drawn
    for column in (0, 1):  # with replacement, each pick alone follows the weights
        assert (picks[:, column] == 0).float().mean().item() == pytest.approx(2 / 6, abs=0.03)


def test_both_picks_are_drawn_with_replacement():
    """M = 2 maps of equal weight: with replacement the crop and drop maps coincide half of the time."""
    picks = select_attention_maps(torch.ones(20000, 2, 3, 3), torch.Generator().manual_seed(8))
    assert (picks[:, 0] == picks[:, 1]).float().mean().item() == pytest.approx(0.5, abs=0.02)
    one_map = select_attention_maps(torch.rand(5, 1, 3, 3), torch.Generator().manual_seed(9))
    assert torch.equal(one_map, torch.zeros(5, 2, dtype=torch.long))


def test_gradient_flows_through_crop_and_drop():
    images = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    crops, drops = attention_crop_drop(images, torch.rand(2, 3, 4, 4), torch.Generator().manual_seed(5))
    (crops.sum() + drops.sum()).backward()
    assert images.grad.abs().sum().item() > 0


def published_crop_drop(
    images: torch.Tensor,
    crop_maps: torch.Tensor,
    drop_maps: torch.Tensor,
    crop_theta: torch.Tensor,
    drop_theta: torch.Tensor,
    align_corners: bool = False,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """The published rule, one sample at a time: (boxes, crops, drops) for maps [B, h, w], thresholds [B]."""
    _, _, height, width = images.shape
    boxes, crops, drops = [], [], []
    for b in range(images.shape[0]):
        up = F.interpolate(crop_maps[b][None, None], size=(height, width), mode="bilinear", align_corners=align_corners)
        points = torch.nonzero(up[0, 0] >= crop_theta[b])
        if points.numel():
            y0 = max(int(points[:, 0].min().item() - 0.1 * height), 0)
            y1 = min(int(points[:, 0].max().item() + 0.1 * height), height)
            x0 = max(int(points[:, 1].min().item() - 0.1 * width), 0)
            x1 = min(int(points[:, 1].max().item() + 0.1 * width), width)
        else:
            y0, x0, y1, x1 = 0, 0, height, width
        boxes.append([y0, x0, y1, x1])
        crop = images[b : b + 1, :, y0:y1, x0:x1]
        crops.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=True))
        up = F.interpolate(drop_maps[b][None, None], size=(height, width), mode="bilinear", align_corners=align_corners)
        drops.append(images[b : b + 1] * (up < drop_theta[b]).float())
    return boxes, torch.cat(crops), torch.cat(drops)


@pytest.mark.parametrize("align_corners", [False, True], ids=["published", "cal-code"])
def test_boxes_crops_and_drops_match_the_published_loop(align_corners: bool):
    """Non-square 36×44 images (0.1·side = 3.6 and 4.4: truncation matters), 7×7 maps, one empty crop mask."""
    gen = torch.Generator().manual_seed(10)
    height, width, batch = 36, 44, 12
    images = torch.randn(batch, 3, height, width, generator=gen)
    # weak noise plus one hot cell per map, so that the boxes cover different parts of the image
    maps = 0.3 * torch.rand(batch, 2, 49, generator=gen)
    maps.scatter_add_(2, torch.randint(0, 49, (batch, 2, 1), generator=gen), torch.ones(batch, 2, 1))
    crop_maps, drop_maps = maps.view(batch, 2, 7, 7).unbind(dim=1)
    crop_theta = (0.4 + 0.2 * torch.rand(batch, generator=gen)) * crop_maps.amax(dim=(1, 2))
    drop_theta = (0.2 + 0.3 * torch.rand(batch, generator=gen)) * drop_maps.amax(dim=(1, 2))
    crop_theta[3] = 2.0  # above every value: an empty mask keeps the whole image
    boxes = crop_boxes(crop_maps, crop_theta, (height, width), 0.1, align_corners)
    crops = crop_and_resize(images, boxes)
    drops = drop_regions(images, drop_maps, drop_theta, align_corners)
    ref_boxes, ref_crops, ref_drops = published_crop_drop(
        images, crop_maps, drop_maps, crop_theta, drop_theta, align_corners
    )
    assert boxes.tolist() == ref_boxes
    assert ref_boxes[3] == [0, 0, height, width]
    assert len({tuple(box) for box in ref_boxes}) > batch // 2  # the boxes really differ between samples
    assert torch.allclose(crops, ref_crops, atol=1e-6, rtol=0)
    assert torch.equal(drops, ref_drops)


def test_attention_crop_drop_matches_the_published_loop_with_one_map():
    """One map per sample (both picks are map 0) and fixed threshold factors: the whole function equals the loop."""
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(6, 3, 40, 40, generator=gen)
    attention = torch.rand(6, 1, 7, 7, generator=gen)
    crops, drops = attention_crop_drop(
        images, attention, torch.Generator().manual_seed(12), crop_threshold=(0.5, 0.5), drop_threshold=(0.3, 0.3)
    )
    peaks = attention.amax(dim=(1, 2, 3))
    _, ref_crops, ref_drops = published_crop_drop(
        images, attention[:, 0], attention[:, 0], 0.5 * peaks, 0.3 * peaks
    )
    assert torch.allclose(crops, ref_crops, atol=1e-6, rtol=0)
    assert torch.equal(drops, ref_drops)
