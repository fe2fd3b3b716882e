"""The distill step's augmentation as published: one crop box and flip for
the whole batch (`distill_crop:
batch`) or one per image (`image`), then one roll of randint(0, J) per axis; SC's references cropped
per image without a roll (docs/DATA_PATH.md, "The distill step")."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec

from fd2_core.data.dataset import load_dataset
from fd2_core.progress import ProgressTracker
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages import synthesis
from fd2_core.stages.context import RunContext
from fd2_core.stages.synthesis import distill_augment, previous_attention
from fd2_core.stages.teacher import new_teacher


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _ctx(tmp_path, data, **overrides) -> RunContext:
    spec = resolve_spec(tiny_spec(**overrides))
    return RunContext(spec, data, tmp_path, torch.device("cpu"), ProgressTracker({}, None, None))


def _same_images(n: int = 6) -> torch.Tensor:
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return image.expand(n, -1, -1, -1).contiguous()


def test_batch_mode_gives_every_image_of_a_step_the_same_crop_flip_and_roll(tmp_path, data) -> None:
    ctx = _ctx(tmp_path, data, distill_crop="batch", jitter=4)
    outs = [distill_augment(ctx, _same_images(), torch.Generator().manual_seed(s)) for s in range(8)]
    for out in outs:
        # equal inputs stay equal: one box, flip and roll
        assert torch.equal(out, out[:1].expand_as(out))
    # steps still differ
    assert any(not torch.equal(a, b) for a, b in zip(outs, outs[1:], strict=False))


def test_image_mode_gives_each_image_its_own_crop(tmp_path, data) -> None:
    ctx = _ctx(tmp_path, data, distill_crop="image", jitter=4)
    out = distill_augment(ctx, _same_images(), torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 1


def test_the_roll_is_one_shift_of_zero_to_j_pixels(tmp_path, data, monkeypatch) -> None:
    ctx = _ctx(tmp_path, data, distill_crop="batch", jitter=3)
    seen = []
    original = torch.roll

    def spy(x, shifts, dims):
        seen.append(tuple(shifts))
        return original(x, shifts=shifts, dims=dims)

    monkeypatch.setattr(torch, "roll", spy)
    for s in range(200):
        distill_augment(ctx, _same_images(2), torch.Generator().manual_seed(s))
    values = {v for pair in seen for v in pair}
    assert len(seen) == 200 and values == {0, 1, 2, 3}  # J included, never negative


def test_sc_references_are_cropped_per_image_without_a_roll(tmp_path, data, monkeypatch) -> None:
    ctx = _ctx(tmp_path, data, distill_crop="batch", jitter=4)
    torch.manual_seed(0)
    teacher = new_teacher(ctx).eval()
    calls = []
    original = synthesis.sample_crop_flip
    monkeypatch.setattr(synthesis, "sample_crop_flip",
                        lambda *a, **k: calls.append(k["per_image"]) or original(*a, **k))
    monkeypatch.setattr(synthesis, "random_roll", lambda *a, **k: pytest.fail("SC references are not rolled"))
    maps = previous_attention(ctx, teacher, [_same_images(4), _same_images(4)], torch.Generator().manual_seed(0))
    assert calls == [True, True] and maps.shape[:2] == (2, 4)
    assert not torch.equal(maps[0, 0], maps[0, 1])  # equal images, their own crops
