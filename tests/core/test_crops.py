"""Every crop is torchvision's RandomResizedCrop: boxes drawn by get_params's rule, resampled as
torchvision.transforms.functional.resized_crop(antialias=True) does, for a whole batch at once; soft-label
files recorded before format v4 still replay with the roi_align they were recorded with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from fd2_core.augment import (
    RESIZED_CROP,
    ROI_ALIGN,
    CropFlip,
    apply_crop_flip,
    apply_cutmix,
    random_roll,
    sample_crop_flip,
)
from fd2_core.crops import resized_crop, sample_resized_crop_boxes
from fd2_core.label_formats import FULL
from fd2_core.relabel_choices import AugmentationStream
from fd2_core.soft_label_compaction import stored_choices
from fd2_core.softlabels import (
    FORMAT,
    FORMAT_V3,
    FORMAT_V4,
    PART_FORMAT,
    PART_FORMAT_V3,
    PART_FORMAT_V4,
    SoftLabelPart,
    SoftLabels,
    join_soft_label_parts,
    record_soft_labels,
    replay,
    save_soft_label_part,
    save_soft_labels,
)

DRAWS = 20_000
PROTOCOL = {"soft_label_source": "backbone", "relabel_bn_mode": "eval", "forward_splits": 1}


def _sides(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 4] (x1, y1, x2, y2) → widths, heights as float64."""
    boxes = boxes.double()
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def _torchvision_boxes(n: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    """n boxes from RandomResizedCrop.get_params, global RNG seeded, as [n, 4] (x1, y1, x2, y2)."""
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    params = [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]
    top, left, h, w = torch.tensor(params, dtype=torch.float64).T
    return torch.stack([left, top, left + w, top + h], dim=1)


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (24, 40, (0.08, 1.0), (1 / 4, 4.0))],  # the second redraws often
)
def test_box_distribution_matches_torchvision(height, width, scale, ratio) -> None:
    """Mean area, share of boxes with a full side, mean log-aspect and the (w, h) histogram agree within
    sampling error (bounds of four standard errors of the difference of two samples of DRAWS)."""
    ours = sample_resized_crop_boxes(DRAWS, height, width, torch.Generator().manual_seed(1), scale, ratio)
    theirs = _torchvision_boxes(DRAWS, height, width, scale, ratio)
    (w, h), (tw, th) = _sides(ours), _sides(theirs)
    area, t_area = w * h / (height * width), tw * th / (height * width)
    assert abs(area.mean() - t_area.mean()) < 0.01
    full, t_full = ((w == width) | (h == height)).double().mean(), ((tw == width) | (th == height)).double().mean()
    assert abs(full - t_full) < 4 * math.sqrt(2 * t_full * (1 - t_full) / DRAWS)  # ≈ 1 pp at a 7 % share
    log_aspect, t_log_aspect = torch.log(w / h), torch.log(tw / th)
    assert abs(log_aspect.mean() - t_log_aspect.mean()) < 4 * math.sqrt(2 / DRAWS) * t_log_aspect.std()
    counts = torch.zeros(2, height + 1, width + 1)
    for k, (ws, hs) in enumerate(((w, h), (tw, th))):
        counts[k].index_put_((hs.long(), ws.long()), torch.ones(DRAWS), accumulate=True)
    seen = counts.sum(0) > 0
    chi2 = ((counts[0] - counts[1]) ** 2 / counts.sum(0))[seen].sum()
    dof = int(seen.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # two samples of one distribution


def test_boxes_are_integer_and_inside_the_image() -> None:
    for height, width, ratio in ((32, 32, (3 / 4, 4 / 3)), (24, 40, (1 / 4, 4.0)), (7, 5, (1.0, 1.0))):
        boxes = sample_resized_crop_boxes(DRAWS, height, width, torch.Generator().manual_seed(2), ratio=ratio)
        assert boxes.dtype == torch.float32 and boxes.shape == (DRAWS, 4)
        assert torch.equal(boxes, boxes.round())
        w, h = _sides(boxes)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (w >= 1).all() and (h >= 1).all()


def test_no_valid_attempt_falls_back_to_torchvisions_centre_crop() -> None:
    """A 20×40 image at scale 1 never fits a ratio in [3/4, 4/3]: every box is get_params's clamped centre crop."""
    boxes = sample_resized_crop_boxes(5, 20, 40, torch.Generator().manual_seed(0), scale=(1.0, 1.0))
    top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, 20, 40), [1.0, 1.0], [3 / 4, 4 / 3])
    assert torch.equal(boxes, torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32).expand(5, 4))


def test_boxes_follow_the_generator_only() -> None:
    torch.manual_seed(123)
    a = sample_resized_crop_boxes(64, 32, 32, torch.Generator().manual_seed(5))
    torch.manual_seed(456)
    b = sample_resized_crop_boxes(64, 32, 32, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def _torchvision_crops(images: torch.Tensor, boxes: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
    """resized_crop of each float image by torchvision, one call per sample."""
    rows = []
    for image, (x1, y1, x2, y2) in zip(images, boxes.long().tolist(), strict=True):
        rows.append(TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, list(out), InterpolationMode.BILINEAR,
                                    antialias=True))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("side", "out", "boxes"),
    [
        (32, (32, 32), [[0, 0, 12, 12], [3, 5, 30, 17], [10, 1, 15, 31], [20, 20, 32, 32], [0, 0, 1, 1]]),
        (224, (112, 112), [[12, 12, 212, 212], [0, 24, 200, 224], [5, 0, 205, 200], [30, 40, 130, 190]]),
        (224, (56, 56), [[0, 0, 224, 224], [7, 3, 211, 160], [100, 50, 224, 224], [0, 0, 56, 56]]),
        (40, (24, 37), [[2, 3, 30, 33], [0, 0, 40, 40], [9, 1, 17, 40]]),  # non-square output
    ],
)
def test_resized_crop_matches_torchvision(side, out, boxes) -> None:
    """Upscaled (boxes under 32 px to 32 px) and downscaled (200 px of 224 to 112, 224 to 56) crops equal
    torchvision's resized_crop to float precision."""
    images = torch.rand(len(boxes), 3, side, side, generator=torch.Generator().manual_seed(side))
    boxes = torch.tensor(boxes, dtype=torch.float32)
    ours = resized_crop(images, boxes, out)
    assert ours.shape == (len(boxes), 3, *out) and ours.dtype == images.dtype
    torch.testing.assert_close(ours, _torchvision_crops(images, boxes, out), rtol=1e-5, atol=1e-6)


def test_random_boxes_match_torchvision_in_both_directions() -> None:
    g = torch.Generator().manual_seed(7)
    images = torch.rand(16, 3, 64, 64, generator=g)
    boxes = sample_resized_crop_boxes(16, 64, 64, g)
    for out in ((40, 40), (96, 96), (50, 70)):
        torch.testing.assert_close(resized_crop(images, boxes, out), _torchvision_crops(images, boxes, out),
                                   rtol=1e-5, atol=1e-6)


def test_a_box_outside_the_image_is_zero_padded_as_torchvision_crops() -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[-3.0, 2.0, 29.0, 34.0], [-8.0, -8.0, 40.0, 40.0], [4.0, -6.0, 24.0, 20.0]])
    torch.testing.assert_close(resized_crop(images, boxes, 32), _torchvision_crops(images, boxes, (32, 32)),
                               rtol=1e-5, atol=1e-6)
    shifted = resized_crop(images[:1], boxes[:1], 32)  # scale 1: an exact pixel copy
    expected = torch.zeros_like(images[:1])
    expected[..., :30, 3:] = images[:1, :, 2:, :29]
    assert torch.equal(shifted, expected)


def test_the_whole_image_comes_back_unchanged() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    assert torch.equal(resized_crop(images, full, 32), images)
    mixed = torch.tensor([[0.0, 0.0, 32.0, 32.0], [1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 32.0, 32.0], [0, 0, 8, 8]])
    assert torch.equal(resized_crop(images, mixed, 32)[::2], images[::2])  # identity weights are exact too


def test_uint8_images_agree_with_torchvisions_pil_path_within_one_level() -> None:
    """The published relabel and students crop PIL uint8 images: torchvision's RandomResizedCrop on PIL is
    Pillow's bilinear resize with its reducing support, in 8-bit fixed point. We implement the float
    resized_crop on the uint8 image's float values (no rounding to 8 bits); it is within one 8-bit level of
    Pillow's result, up- and downscaled."""
    g = torch.Generator().manual_seed(8)
    pixels = torch.randint(0, 256, (3, 96, 96), generator=g, dtype=torch.uint8)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    for (x1, y1, x2, y2), out in (((5, 9, 30, 40), 64), ((0, 4, 90, 96), 32), ((10, 10, 86, 86), 76)):
        ours = resized_crop(pixels[None].float() / 255.0, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), out)
        reference = TF.resized_crop(pil, y1, x1, y2 - y1, x2 - x1, [out, out], InterpolationMode.BILINEAR)
        theirs = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float()
        assert (ours[0] * 255.0 - theirs).abs().max() <= 1.0 + 1e-3


def test_gradients_reach_the_pixels() -> None:
    g = torch.Generator().manual_seed(9)
    images = torch.rand(5, 3, 32, 32, generator=g, requires_grad=True)
    params = sample_crop_flip(5, 32, g)
    apply_crop_flip(images, params, 24).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # the gradient of a sum is each pixel's total weight: rows of a weight matrix sum to one
    images.grad = None
    apply_crop_flip(images, CropFlip(torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 5), params.flips), 16).sum().backward()
    torch.testing.assert_close(images.grad.sum(), torch.tensor(5 * 3 * 16 * 16.0))


def test_one_box_and_one_flip_for_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(10)
    images = torch.rand(6, 3, 32, 32, generator=g)
    seen_flips = set()
    for _ in range(8):
        params = sample_crop_flip(6, 32, g, per_image=False)
        assert params.boxes.shape == (6, 4) and params.flips.shape == (6,)
        assert torch.equal(params.boxes, params.boxes[:1].expand(6, 4)) and params.flips.unique().numel() == 1
        seen_flips.add(bool(params.flips[0]))
        out = apply_crop_flip(images, params, 24)
        one = resized_crop(images, params.boxes[:1], 24)
        expected = one.flip(-1) if bool(params.flips[0]) else one
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert seen_flips == {True, False}


def test_per_image_flips_mirror_each_crop() -> None:
    g = torch.Generator().manual_seed(11)
    images = torch.rand(8, 3, 32, 32, generator=g)
    params = sample_crop_flip(8, 32, g)
    assert 0 < int(params.flips.sum()) < 8
    crops = resized_crop(images, params.boxes, 32)
    expected = torch.where(params.flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    torch.testing.assert_close(apply_crop_flip(images, params), expected, rtol=0, atol=1e-6)
    one = resized_crop(images, params.boxes[:1], 32)  # one box for the batch, a flip per image
    expected = torch.where(params.flips.view(-1, 1, 1, 1), one.flip(-1), one)
    torch.testing.assert_close(resized_crop(images, params.boxes[:1], 32, flips=params.flips), expected,
                               rtol=0, atol=1e-6)


def test_roll_is_drawn_from_zero_to_jitter_inclusive() -> None:
    """The published roll: randint(0, J) pixels per axis, J included, never negative."""
    g = torch.Generator().manual_seed(12)
    dot = torch.zeros(1, 1, 16, 16)
    dot[..., 0, 0] = 1.0
    shifts = set()
    for _ in range(200):
        y, x = divmod(int(random_roll(dot, 3, g).flatten().argmax()), 16)
        shifts.add((y, x))
    assert {y for y, _ in shifts} == {0, 1, 2, 3} and {x for _, x in shifts} == {0, 1, 2, 3}
    assert torch.equal(random_roll(dot, 0, g), dot)


def _teacher(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3)) * 10.0  # [B, 3] "logits", enough to record


def _stream(rule: str = "torchvision") -> AugmentationStream:
    resampling = ROI_ALIGN if rule == "clamped" else RESIZED_CROP
    return AugmentationStream(20, "relabel", 7, 16, 3, 1.0, 0.08, rule, resampling)


def _v5_meta(stream: AugmentationStream, epochs: int) -> dict[str, object]:
    return {"batch_size": 3, "num_classes": 3, "epochs": epochs, **PROTOCOL, "augmentations": stream.as_metadata(),
            "label_encoding": FULL.as_metadata(), "epochs_kept": list(range(epochs))}


def _old_layout(images: torch.Tensor, stream: AugmentationStream, epochs: int = 2) -> dict[str, torch.Tensor]:
    """The tensors of a v3/v4 file: the walk's choices stored, with their logits."""
    logits = record_soft_labels(_teacher, images, epochs=epochs, stream=stream)["logits"]
    return {**stored_choices(stream, epochs), "logits": logits}


def test_a_v5_file_regenerates_exactly_what_was_recorded(tmp_path) -> None:
    images = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    seen: list[torch.Tensor] = []

    def teacher(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return _teacher(x)

    stream = _stream()
    tensors = record_soft_labels(teacher, images, epochs=2, stream=stream)
    path = save_soft_labels(tmp_path / "v5.safetensors", tensors, _v5_meta(stream, 2))
    soft = SoftLabels.load(path)
    assert soft.metadata["format"] == FORMAT and soft.format_version == 5 and soft.resampling == "resized_crop"
    assert torch.equal(soft.choices(0).boxes, soft.choices(0).boxes.round())  # torchvision's integer boxes
    replayed = [x for x, _ in replay(images, soft)]
    assert len(replayed) == len(seen) == 6
    for x, recorded in zip(replayed, seen, strict=True):
        assert torch.equal(x, recorded)  # bit for bit
    # the same walk stored as a v4 file replays the same images
    old = _old_layout(images, stream)
    save_file(old, str(tmp_path / "v4.safetensors"), metadata={
        "batch_size": "3", "num_classes": "3", "format": FORMAT_V4, **{k: str(v) for k, v in PROTOCOL.items()}})
    v4 = SoftLabels.load(tmp_path / "v4.safetensors")
    assert v4.format_version == 4
    for x, recorded in zip((x for x, _ in replay(images, v4)), seen, strict=True):
        assert torch.equal(x, recorded)


def test_a_v3_file_replays_with_roi_align_bit_for_bit(tmp_path) -> None:
    """A file of format v3 (clamped, fractional boxes) replays with roi_align(sampling_ratio=2, aligned=True)
    exactly as it was recorded, through every reader's apply_crop_flip."""
    images = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    tensors = _old_layout(images, _stream("clamped"))
    assert not torch.equal(tensors["boxes"], tensors["boxes"].round())  # not integers
    meta = {"batch_size": "3", "num_classes": "3", "format": FORMAT_V3,
            **{k: str(v) for k, v in PROTOCOL.items()}}
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=meta)
    soft = SoftLabels.load(tmp_path / "v3.safetensors")
    assert soft.format_version == 3 and soft.resampling == ROI_ALIGN
    for step, (x, _) in enumerate(replay(images, soft)):
        idx, crop, cutmix, _ = soft.batch(step)
        assert crop.resampling == ROI_ALIGN
        rois = torch.cat([torch.arange(idx.numel(), dtype=torch.float32)[:, None], crop.boxes], dim=1)
        cropped = roi_align(images[idx], rois, output_size=(16, 16), spatial_scale=1.0, sampling_ratio=2,
                            aligned=True)
        expected = apply_cutmix(torch.where(crop.flips[:, None, None, None], cropped.flip(-1), cropped), cutmix)
        assert torch.equal(x, expected)


def test_parts_of_older_formats_never_join(tmp_path) -> None:
    images = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(16))
    stream = _stream()
    meta = _v5_meta(stream, 4)
    first = record_soft_labels(_teacher, images, epochs=range(0, 2), stream=stream)
    second = record_soft_labels(_teacher, images, epochs=range(2, 4), stream=stream)
    save_soft_label_part(tmp_path / "new.safetensors", second, meta, range(2, 4))
    old_tensors = {k: v[:2] for k, v in _old_layout(images, stream, 4).items()}
    for old_format in (PART_FORMAT_V3, PART_FORMAT_V4):
        old = {"batch_size": "3", "num_classes": "3", "format": old_format, "part_epochs": "[0, 2]",
               **{k: str(v) for k, v in PROTOCOL.items()}}
        save_file(old_tensors, str(tmp_path / "old.safetensors"), metadata=old)
        new_part = SoftLabelPart.load(tmp_path / "new.safetensors")
        old_part = SoftLabelPart.load(tmp_path / "old.safetensors")
        assert (new_part.format, old_part.format) == (PART_FORMAT, old_format)
        with pytest.raises(ValueError, match="another layout"):
            join_soft_label_parts([old_part, new_part], 4)
    save_soft_label_part(tmp_path / "first.safetensors", first, meta, range(0, 2))
    joined, _ = join_soft_label_parts([SoftLabelPart.load(tmp_path / "first.safetensors"), new_part], 4)
    whole = record_soft_labels(_teacher, images, epochs=4, stream=stream)
    assert all(torch.equal(joined[k], whole[k]) for k in whole)
