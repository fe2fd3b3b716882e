"""Each FD² switch changes the distillation loss graph; no forward hooks survive a stage."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec

from fd2_core.data.dataset import load_dataset
from fd2_core.losses import BNStatMatcher
from fd2_core.progress import ProgressTracker
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.context import RunContext
from fd2_core.stages.distill import distill
from fd2_core.stages.patches import patch_init
from fd2_core.stages.synthesis import distill_loss
from fd2_core.stages.teacher import new_teacher


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _ctx(tmp_path, data, **overrides):
    spec = resolve_spec(tiny_spec(**overrides))
    return RunContext(spec, data, tmp_path, torch.device("cpu"), ProgressTracker({}, None, None))


def _loss(ctx, teacher, prev=None):
    torch.manual_seed(0)
    x = torch.randn(ctx.num_classes, 3, 32, 32, requires_grad=True)
    y = torch.arange(ctx.num_classes)
    teacher.eval()
    with BNStatMatcher(teacher.bn_layers(), ctx.spec.first_bn_multiplier) as bn:
        loss, parts = distill_loss(ctx, teacher, x, y, prev, bn)
    loss.backward()
    return loss, parts, x.grad


def _prev_maps(teacher, ctx):
    with torch.no_grad():
        out = teacher(torch.randn(ctx.num_classes, 3, 32, 32))
    return out.cal.attention[None]


def test_fc_switch_adds_the_prototype_term(tmp_path, data):
    on = _ctx(tmp_path, data)
    off = _ctx(tmp_path, data, fc=False)
    torch.manual_seed(0)
    teacher = new_teacher(on)
    teacher.cal_head.prototypes.normal_()
    loss_on, parts_on, grad_on = _loss(on, teacher)
    loss_off, parts_off, _ = _loss(off, teacher)
    assert "fc" in parts_on and "fc" not in parts_off
    assert loss_on.item() == pytest.approx(loss_off.item() + on.spec.lambda_fc * float(parts_on["fc"]), rel=1e-4)
    assert grad_on.abs().sum() > 0


def test_fc_prototypes_normalized_measures_distances_to_unit_prototypes(tmp_path, data):
    raw = _ctx(tmp_path, data)
    normalized = _ctx(tmp_path, data, fc_prototypes="normalized")
    torch.manual_seed(0)
    teacher = new_teacher(raw)
    teacher.cal_head.prototypes.normal_().mul_(0.05)
    _, parts_raw, grad_raw = _loss(raw, teacher)
    _, parts_normalized, grad_normalized = _loss(normalized, teacher)
    teacher.cal_head.prototypes.div_(teacher.cal_head.prototypes.norm(dim=1, keepdim=True))
    _, parts_unit, grad_unit = _loss(raw, teacher)
    assert float(parts_normalized["fc"]) == pytest.approx(float(parts_unit["fc"]), rel=1e-5)
    assert torch.allclose(grad_normalized, grad_unit, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(grad_normalized, grad_raw, rtol=1e-3, atol=1e-8)


def test_sc_switch_adds_the_attention_term_only_with_previous_images(tmp_path, data):
    on = _ctx(tmp_path, data)
    off = _ctx(tmp_path, data, sc=False)
    torch.manual_seed(0)
    teacher = new_teacher(on)
    prev = _prev_maps(teacher, on)
    loss_on, parts_on, _ = _loss(on, teacher, prev)
    loss_off, parts_off, _ = _loss(off, teacher, prev)
    _, parts_first, _ = _loss(on, teacher, None)
    assert "sc" in parts_on and "sc" not in parts_off and "sc" not in parts_first
    assert loss_on.item() == pytest.approx(loss_off.item() + on.spec.lambda_sc * float(parts_on["sc"]), rel=1e-4)


def test_sc_threshold_tau_drops_the_term_below_it(tmp_path, data):
    ctx = _ctx(tmp_path, data, sc_tau=1.0)
    base = _ctx(tmp_path, data, sc=False)
    torch.manual_seed(0)
    teacher = new_teacher(ctx)
    prev = _prev_maps(teacher, ctx)
    loss_tau, parts, _ = _loss(ctx, teacher, prev)
    loss_base, _, _ = _loss(base, teacher, prev)
    assert float(parts["sc"]) < 1.0
    assert loss_tau.item() == pytest.approx(loss_base.item(), rel=1e-5)


def test_cal_switch_changes_the_teacher_and_the_ce_mix(tmp_path, data):
    with_cal = _ctx(tmp_path, data)
    without = _ctx(tmp_path, data, cal=False, fc=False, sc=False)
    assert new_teacher(with_cal).cal_head is not None
    assert new_teacher(without).cal_head is None
    base = _ctx(tmp_path, data, method="sre2l++")
    assert not base.spec.uses_cal and new_teacher(base).cal_head is None


def test_init_switch_patches_are_built_from_real_crops(tmp_path, data):
    ctx = _ctx(tmp_path, data)
    teacher = new_teacher(ctx).eval()
    x = patch_init(ctx, teacher, torch.arange(ctx.num_classes), 0)
    assert x.shape == (ctx.num_classes, 3, 32, 32)
    lo, hi = ctx.pixel_bounds()
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()  # real pixels, unlike N(0, 1) noise
    gaussian = _ctx(tmp_path / "g", data, init="gaussian")
    torch.manual_seed(0)
    teacher_g = new_teacher(gaussian)
    images = distill(gaussian, teacher_g)
    assert images.shape == (1, ctx.num_classes, 3, 32, 32)


def test_no_forward_hooks_left_after_distill(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=2)
    teacher = new_teacher(ctx)
    distill(ctx, teacher)
    for module in teacher.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
