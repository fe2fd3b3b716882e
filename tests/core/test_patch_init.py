"""RDED patch initialisation against a plain loop reference, plus the init-drift report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import TINY_DATA, tiny_spec
from torchvision.transforms.functional import resized_crop as tv_resized_crop

from fd2_core.atomic import load_tensors, save_tensors
from fd2_core.data.dataset import load_dataset
from fd2_core.pipeline import run
from fd2_core.progress import ProgressTracker
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.context import RunContext
from fd2_core.stages.distill import distill
from fd2_core.stages.distill_files import ipc_path
from fd2_core.stages.drift import init_drift, psnr_db
from fd2_core.stages.package import json_safe
from fd2_core.stages.patches import patch_factor, patch_init, patch_ranking, sample_patch_pool, select_patches
from fd2_core.stages.teacher import new_teacher


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)  # 4 classes × 16 train images, 32 px


def _ctx(path, data, events=None, **overrides):
    spec = resolve_spec(tiny_spec(**overrides))
    tracker = ProgressTracker({}, events.append if events is not None else None, None)
    return RunContext(spec, data, path, torch.device("cpu"), tracker)


def _teacher(ctx):
    torch.manual_seed(0)
    return new_teacher(ctx).eval()


def _reference_init(ctx, teacher, classes, index, pool) -> torch.Tensor:
    """The RDED rule, one view at a time: score padded views, keep each
    image's best, rank, stitch."""
    size = ctx.spec.image_size
    factor = patch_factor(ctx.spec)
    side = size // factor
    lo = (size - side) // 2
    out = []
    for ci, c in enumerate(classes.tolist()):
        ranked = []  # (ce, view) per real image of the pool
        for p in range(pool.images.shape[1]):
            if not pool.valid[ci, p]:
                continue
            image = ctx.normalize(ctx.data.train_images[pool.images[ci, p]][None])
            best = None
            for v in range(pool.boxes.shape[2]):
                # torchvision: the reference crop
                x1, y1, x2, y2 = (int(c) for c in pool.boxes[ci, p, v])
                view = tv_resized_crop(image, y1, x1, y2 - y1, x2 - x1, [side, side], antialias=True)
                canvas = torch.zeros(1, 3, size, size)
                canvas[:, :, lo : lo + side, lo : lo + side] = view
                with torch.no_grad():
                    ce = F.cross_entropy(teacher(canvas).logits.float(), torch.tensor([c])).item()
                if best is None or ce < best[0]:
                    best = (ce, view[0])
            ranked.append(best)
        ranked.sort(key=lambda item: item[0])
        image = torch.zeros(3, size, size)
        for cell in range(factor * factor):
            rank = (index * factor * factor + cell) % len(ranked)
            row, col = divmod(cell, factor)
            image[:, row * side : (row + 1) * side, col * side : (col + 1) * side] = ranked[rank][1]
        out.append(image)
    return torch.stack(out)


@pytest.mark.parametrize("factor", [1, 2])
def test_patch_init_matches_the_loop_reference(tmp_path, data, factor):
    # pool 5 < ipc·f² at factor 2, so the reference also checks the wrap-around order
    ctx = _ctx(tmp_path, data, ipc=3, patch_pool=5, patch_candidates=3, patch_factor=factor)
    teacher = _teacher(ctx)
    classes = torch.tensor([1, 3])
    pool = sample_patch_pool(ctx, classes)
    assert pool.images.shape == (2, 5) and pool.boxes.shape == (2, 5, 3, 4)
    assert (ctx.data.train_labels[pool.images] == classes[:, None]).all()
    widths = pool.boxes[..., 2] - pool.boxes[..., 0]
    assert torch.allclose(widths, pool.boxes[..., 3] - pool.boxes[..., 1])  # square views
    for index in range(3):
        x = patch_init(ctx, teacher, classes, index)
        assert x.shape == (2, 3, 32, 32)
        assert torch.allclose(x, _reference_init(ctx, teacher, classes, index, pool), atol=1e-6)


def test_pool_and_views_do_not_depend_on_the_class_chunk(tmp_path, data):
    ctx = _ctx(tmp_path, data, patch_pool=6)
    whole = sample_patch_pool(ctx, torch.arange(4))
    part = sample_patch_pool(ctx, torch.tensor([2, 3]))
    assert torch.equal(whole.images[2:], part.images) and torch.equal(whole.boxes[2:], part.boxes)


def test_ipc_one_is_a_prefix_of_ipc_three(tmp_path, data):
    inits = []
    for ipc in (1, 3):
        ctx = _ctx(tmp_path / f"ipc{ipc}", data, ipc=ipc, distill_iterations=1, patch_factor=2)
        distill(ctx, _teacher(ctx))
        inits.append(load_tensors(ipc_path(ctx, 0)))
    assert torch.equal(inits[0]["init"], inits[1]["init"])


def test_no_image_repeats_across_indices(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=4, patch_factor=2)  # 4 · 2² = 16 = the whole class
    teacher = _teacher(ctx)
    classes = torch.arange(4)
    ranking = patch_ranking(ctx, teacher, classes)
    picked = torch.cat([select_patches(ranking, j, 2)[0] for j in range(4)], dim=1)  # [K, 16]
    for row, c in zip(picked, classes, strict=True):
        assert row.unique().numel() == 16
        assert (ctx.data.train_labels[row] == c).all()


def test_factor_auto_is_one_at_32_px_and_two_at_128_px():
    assert patch_factor(resolve_spec(tiny_spec(image_size=32))) == 1
    assert patch_factor(resolve_spec(tiny_spec(image_size=64))) == 1
    assert patch_factor(resolve_spec(tiny_spec(image_size=128))) == 2
    assert patch_factor(resolve_spec(tiny_spec(image_size=32, patch_factor=2))) == 2


def test_small_pool_wraps_in_ranked_order_and_says_so_once(tmp_path, data):
    events = []
    ctx = _ctx(tmp_path, data, events, ipc=3, patch_pool=2, distill_iterations=1)
    teacher = _teacher(ctx)
    classes = torch.arange(4)
    assert torch.equal(patch_init(ctx, teacher, classes, 2), patch_init(ctx, teacher, classes, 0))
    assert not torch.equal(patch_init(ctx, teacher, classes, 1), patch_init(ctx, teacher, classes, 0))
    distill(ctx, teacher)
    notes = [e.message for e in events if "reused in ranked order" in (e.message or "")]
    assert len(notes) == 1 and "4 of 4 classes" in notes[0]


def test_no_wrap_note_when_the_pool_is_large_enough(tmp_path, data):
    events = []
    ctx = _ctx(tmp_path, data, events, ipc=2, distill_iterations=1)
    distill(ctx, _teacher(ctx))
    assert not [e for e in events if "reused in ranked order" in (e.message or "")]


def _write_index(ctx, index, images_u8, init_u8):
    tensors = {"images": ctx.normalize(images_u8), "init": ctx.normalize(init_u8), "labels": torch.arange(4)}
    ipc_path(ctx, index).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(ipc_path(ctx, index), tensors)


def test_drift_of_a_known_shift_and_of_identical_images(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=2)
    g = torch.Generator().manual_seed(0)
    init = torch.randint(20, 230, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    _write_index(ctx, 0, init, init)
    _write_index(ctx, 1, init + 4, init)  # every pixel moved by 4/255
    drift = init_drift(ctx)
    assert drift["init"] == "patches"
    assert drift["init_psnr_db_per_index"][0] == math.inf
    assert drift["init_psnr_db_per_index"][1] == pytest.approx(20 * math.log10(255 / 4), rel=1e-4)
    # pooled MSE
    assert drift["init_psnr_db"] == pytest.approx(10 * math.log10(2 * 255**2 / 16), rel=1e-4)
    assert drift["init_mean_abs_change"] == pytest.approx(2 / 255, rel=1e-4)
    assert psnr_db(0.0) == math.inf and psnr_db(0.01) == pytest.approx(20.0)
    _write_index(ctx, 1, init, init)
    assert json_safe(init_drift(ctx))["init_psnr_db"] is None  # JSON has no inf


def test_drift_is_none_without_an_initialisation(tmp_path, data):
    assert init_drift(_ctx(tmp_path / "r", data, method="random")) is None
    assert init_drift(_ctx(tmp_path / "empty", data)) is None


def test_distill_saves_the_init_and_reports_its_drift(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=2, distill_iterations=2)
    images = distill(ctx, _teacher(ctx))
    drift = init_drift(ctx)
    assert images.shape == (2, 4, 3, 32, 32) and len(drift["init_psnr_db_per_index"]) == 2
    assert 0.0 < drift["init_mean_abs_change"] < 0.1 and drift["init_psnr_db"] > 20.0


def test_class_chunks_give_the_same_init(tmp_path, data):
    inits = []
    for chunk in (0, 3):
        ctx = _ctx(tmp_path / f"chunk{chunk}", data, distill_iterations=1, distill_batch_classes=chunk)
        distill(ctx, _teacher(ctx))
        inits.append(load_tensors(ipc_path(ctx, 0))["init"])
    assert torch.equal(inits[0], inits[1])


def test_report_carries_the_drift(tmp_path, data):
    report = run(tiny_spec(evaluate=False), data, tmp_path / "fd2").report
    assert report["distill"]["init"] == "patches" and report["distill"]["init_psnr_db"] > 0.0
    assert run(tiny_spec(method="random", evaluate=False), data, tmp_path / "random").report["distill"] is None
