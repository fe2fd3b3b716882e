"""The teacher's training augmentation: the published recipe (flip + ColorJitter(0.2, 0.2, 0.2, 0.1)
+ rotation ±15°, the published pretraining setting) is batched with per-sample parameters and must
agree, sample by sample, with torchvision's functional ops; `auto` keeps the earlier behaviour;
everything follows the given generator."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fd2_core.augment import (
    JITTER_OPS,
    PUBLISHED_DEGREES,
    PUBLISHED_JITTER,
    PublishedParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_crop_flip,
    apply_published,
    rotate,
    sample_crop_flip,
    sample_published,
    sample_shift_flip,
    train_augment,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TORCHVISION_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}
BATCHED_OPS = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}


def pixels(batch: int = 8, size: int = 36, seed: int = 0) -> torch.Tensor:
    """[B,3,S,S] in [0, 1] with gray, saturated and clipped pixels, so
    every HSV branch is exercised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    x[:, :, :4] = x[:, :1, :4]  # gray rows (h = s = 0)
    x[:, :, -4:] = (x[:, :, -4:] > 0.5).float()  # pure primaries, black and white
    x[0] = x[0] * 0.3 + 0.6  # a bright, low-contrast image
    return x


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def torchvision_reference(image: torch.Tensor, params: PublishedParams, i: int) -> torch.Tensor:
    """Sample i through torchvision's functional ops, one call per op, in the sampled order."""
    out = TF.horizontal_flip(image) if bool(params.flips[i]) else image
    for code in params.jitter_order[i].tolist():
        name = JITTER_OPS[code]
        out = TORCHVISION_OPS[name](out, float(params.jitter_factors[i, code]))
    return TF.rotate(out, float(params.angles[i]), interpolation=InterpolationMode.NEAREST, fill=0)


@pytest.mark.parametrize("name", JITTER_OPS)
def test_each_colour_op_matches_torchvision_per_sample(name: str) -> None:
    x = pixels()
    g = torch.Generator().manual_seed(1)
    if name == "hue":
        factors = (torch.rand(x.shape[0], generator=g) * 2 - 1) * 0.5
    else:
        # also beyond the published 0.8–1.2
        factors = torch.rand(x.shape[0], generator=g) * 1.6 + 0.2
    out = BATCHED_OPS[name](x, factors)
    for i in range(x.shape[0]):
        expected = TORCHVISION_OPS[name](x[i], float(factors[i]))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("interpolation", "mode", "atol"),
    [("nearest", InterpolationMode.NEAREST, 1e-6), ("bilinear", InterpolationMode.BILINEAR, 1e-4)],
)
def test_rotation_matches_torchvision_per_sample(interpolation: str, mode: InterpolationMode, atol: float) -> None:
    x = pixels()[:, :, :, :30]  # not square: the grid must scale each axis by its own side
    angles = torch.tensor([-15.0, -7.3, -0.4, 0.0, 2.5, 9.9, 14.99, 45.0])
    out = rotate(x, angles, interpolation)
    for i in range(x.shape[0]):
        expected = TF.rotate(x[i], float(angles[i]), interpolation=mode, fill=0)
        torch.testing.assert_close(out[i], expected, atol=atol, rtol=0)


def test_published_augmentation_matches_torchvision_composition() -> None:
    x = pixels(batch=12)
    params = sample_published(x.shape[0], torch.Generator().manual_seed(3))
    out = apply_published(normalised(x), params, MEAN, STD)
    assert out.shape == x.shape
    for i in range(x.shape[0]):
        expected = normalised(torchvision_reference(x[i], params, i)[None])[0]
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)


def test_published_parameters_follow_the_published_ranges() -> None:
    params = sample_published(4096, torch.Generator().manual_seed(0))
    b, c, s, h = PUBLISHED_JITTER
    factors = params.jitter_factors
    for col, v in enumerate((b, c, s)):
        assert factors[:, col].min() >= 1 - v and factors[:, col].max() <= 1 + v
    assert factors[:, 3].abs().max() <= h
    assert params.angles.abs().max() <= PUBLISHED_DEGREES and params.angles.abs().max() > 0.9 * PUBLISHED_DEGREES
    assert torch.equal(params.jitter_order.sort(dim=1).values, torch.arange(4).expand(4096, 4))
    assert len({tuple(row) for row in params.jitter_order.tolist()}) == 24  # every order occurs
    assert 0.45 < params.flips.float().mean() < 0.55


def test_flips_are_drawn_per_sample() -> None:
    x = pixels(batch=16)
    params = sample_published(16, torch.Generator().manual_seed(5), jitter=(0.0, 0.0, 0.0, 0.0), degrees=0.0)
    assert 0 < int(params.flips.sum()) < 16
    out = apply_published(normalised(x), params, MEAN, STD)
    expected = torch.where(params.flips.view(-1, 1, 1, 1), x.flip(-1), x)
    torch.testing.assert_close(out, normalised(expected), atol=1e-5, rtol=0)


def test_jitter_and_angles_differ_between_samples() -> None:
    params = sample_published(8, torch.Generator().manual_seed(2))
    assert params.jitter_factors.unique(dim=0).shape[0] == 8
    assert params.angles.unique().numel() == 8


def _previous_train_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The augmentation before the choice existed, written out: shift-flip
    at ≤ 64 px, resized crop above."""
    size = images.shape[-1]
    if size <= 64:
        params = sample_shift_flip(images.shape[0], size, generator, max_shift=size / 16)
    else:
        params = sample_crop_flip(images.shape[0], size, generator, scale=(0.35, 1.0))
    return apply_crop_flip(images, params)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_auto_reproduces_the_previous_augmentation(size: int) -> None:
    x = normalised(pixels(batch=6, size=size))
    expected = _previous_train_augment(x, torch.Generator().manual_seed(11))
    assert torch.equal(train_augment(x, torch.Generator().manual_seed(11)), expected)
    assert torch.equal(train_augment(x, torch.Generator().manual_seed(11), "auto"), expected)
    named = "shift-flip" if size <= 64 else "resized-crop"
    assert torch.equal(train_augment(x, torch.Generator().manual_seed(11), named), expected)


def test_shift_flip_moves_whole_pixels_with_zero_padding() -> None:
    """shift-flip: an integer offset in [−S/16, S/16] per axis, zero
    outside, then the flip; no resampling."""
    size = 32
    x = normalised(pixels(batch=64, size=size))
    out = train_augment(x, torch.Generator().manual_seed(4), "shift-flip")
    params = sample_shift_flip(64, size, torch.Generator().manual_seed(4), max_shift=size / 16)
    offsets = params.boxes[:, :2].long()
    assert set(offsets.flatten().tolist()) == {-2, -1, 0, 1, 2}
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (dx, dy) in enumerate(offsets.tolist()):
        expected = padded[i, :, 2 + dy : 2 + dy + size, 2 + dx : 2 + dx + size]
        assert torch.equal(out[i], expected.flip(-1) if bool(params.flips[i]) else expected)


@pytest.mark.parametrize("choice", ["auto", "shift-flip", "resized-crop", "published"])
def test_every_choice_is_determined_by_the_generator(choice: str) -> None:
    x = normalised(pixels(batch=6, size=48))

    def run(seed: int) -> torch.Tensor:
        return train_augment(x, torch.Generator().manual_seed(seed), choice, mean=MEAN, std=STD)

    first = run(7)
    assert first.shape == x.shape and torch.isfinite(first).all()
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


def test_published_accepts_plain_sequences_for_mean_and_std() -> None:
    x = normalised(pixels(batch=4))
    as_tensors = train_augment(x, torch.Generator().manual_seed(0), "published", mean=MEAN, std=STD)
    as_lists = train_augment(
        x, torch.Generator().manual_seed(0), "published", mean=MEAN.flatten().tolist(), std=STD.flatten().tolist()
    )
    torch.testing.assert_close(as_tensors, as_lists)


def test_published_needs_the_normalisation_and_unknown_choices_are_refused() -> None:
    x = normalised(pixels(batch=2))
    with pytest.raises(ValueError, match="mean and std"):
        train_augment(x, torch.Generator().manual_seed(0), "published")
    with pytest.raises(ValueError, match="unknown"):
        train_augment(x, torch.Generator().manual_seed(0), "mixup")  # type: ignore[arg-type]


def test_pretrain_passes_the_specs_choice_and_normalisation(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pipeline_helpers import TINY_DATA, tiny_spec

    from fd2_core.data.dataset import load_dataset
    from fd2_core.progress import ProgressTracker
    from fd2_core.spec_resolution import resolve_spec
    from fd2_core.stages import pretrain as stage
    from fd2_core.stages.context import RunContext

    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def recording(images, generator, choice="auto", *, mean=None, std=None):
        seen.append((choice, mean, std))
        return train_augment(images, generator, choice, mean=mean, std=std)

    monkeypatch.setattr(stage, "train_augment", recording)
    spec = resolve_spec(tiny_spec(pretrain_augment="published", method="sre2l++"))
    data = load_dataset(TINY_DATA, 32, seed=0)
    ctx = RunContext(spec=spec, data=data, workdir=tmp_path, device=torch.device("cpu"),
                     tracker=ProgressTracker({"pretrain": 1.0}, None, None))
    stage.pretrain(ctx)
    assert seen and all(choice == "published" for choice, _, _ in seen)
    torch.testing.assert_close(seen[0][1].flatten(), torch.tensor(data.mean, dtype=torch.float32))
    torch.testing.assert_close(seen[0][2].flatten(), torch.tensor(data.std, dtype=torch.float32))
