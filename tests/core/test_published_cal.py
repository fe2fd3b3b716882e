"""Published FD² pretraining and student optimiser details: the teacher's lr decay
(continuous lr·γ^(epoch/2) as the FD² script, stepped lr·γ^⌊epoch/2⌋ as the CAL
code's StepLR), CAL's crop/drop mode taken from the spec, and the student's AdamW
groups (weight decay on conv/linear weights only, as SRe²L's `get_parameters`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from torch import nn

from fd2_core.data.dataset import load_dataset
from fd2_core.models import build_model
from fd2_core.progress import ProgressTracker
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages import pretrain as stage
from fd2_core.stages.context import RunContext
from fd2_core.stages.evaluate import train_student, weight_decay_groups
from fd2_core.stages.relabel import relabel_all_epochs
from fd2_core.stages.teacher import new_teacher

EPOCHS = range(6)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("continuous", [1e-3 * 0.9 ** (e / 2) for e in EPOCHS]),
        ("stepped", [1e-3, 1e-3, 9e-4, 9e-4, 8.1e-4, 8.1e-4]),
    ],
)
def test_pretrain_lr_decay_of_the_paper_presets(mode: str, expected: list[float]) -> None:
    spec = resolve_spec({"preset": "paper-cub", "pretrain_lr_decay_mode": mode})
    assert (spec.pretrain_lr, spec.pretrain_lr_decay) == (1e-3, 0.9)
    ctx = SimpleNamespace(spec=spec)
    got = [stage.teacher_lr_at(ctx, epoch, 0, 10) for epoch in EPOCHS]
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(stage.teacher_lr_at(ctx, epoch, 9, 10) == lr for epoch, lr in zip(EPOCHS, got, strict=True))


def test_continuous_decay_is_the_default_and_lies_between_the_steps() -> None:
    spec = resolve_spec({"preset": "paper-cub"})
    assert spec.pretrain_lr_decay_mode == "continuous"
    assert stage.teacher_lr_at(SimpleNamespace(spec=spec), 1, 0, 10) == pytest.approx(1e-3 * 0.9**0.5)
    stepped = [stage.decayed_lr(1.0, 0.9, epoch, "stepped") for epoch in (3, 4)]
    assert stepped[1] < stage.decayed_lr(1.0, 0.9, 3) < stepped[0]
    with pytest.raises(ValueError, match="unknown"):
        stage.decayed_lr(1.0, 0.9, 3, "linear")


def test_without_decay_the_teacher_lr_is_cosine_over_all_steps() -> None:
    spec = resolve_spec(tiny_spec(pretrain_epochs=4, pretrain_lr=0.01))
    assert spec.pretrain_lr_decay == 0.0
    ctx = SimpleNamespace(spec=spec)
    assert stage.teacher_lr_at(ctx, 0, 0, 5) == pytest.approx(0.01)
    assert stage.teacher_lr_at(ctx, 2, 0, 5) == pytest.approx(0.005)


@pytest.mark.parametrize(("mode", "aligned"), [("published", False), ("cal-code", True)])
def test_cal_loss_passes_the_specs_crop_drop_mode(monkeypatch: pytest.MonkeyPatch, mode: str, aligned: bool) -> None:
    seen: list[bool] = []

    def recording(images, attention, generator=None, **kwargs):
        seen.append(kwargs["align_corners"])
        return images, images

    monkeypatch.setattr(stage, "attention_crop_drop", recording)
    torch.manual_seed(0)
    model = build_model("convnet", 4, 32, cal=True, num_attention_maps=2, width=16).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, _, _ = stage.cal_loss(model, x, y, 0.5, torch.Generator().manual_seed(0), mode)
    assert seen == [aligned] and torch.isfinite(loss)


def _named(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]}


@pytest.mark.parametrize("backbone", ["convnet", "resnet18"])
def test_weight_decay_groups_decay_only_conv_and_linear_weights(backbone: str) -> None:
    model = build_model(backbone, 5, 32, cal=False, width=16)
    groups = weight_decay_groups(model, 1e-5)
    assert [g["weight_decay"] for g in groups] == [1e-5, 0.0]
    decayed, free = _named(model, groups)
    every = {n for n, _ in model.named_parameters()}
    assert decayed | free == every and not decayed & free
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert f"{prefix}weight" in decayed
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert {f"{prefix}weight", f"{prefix}bias"} <= free
        if getattr(module, "bias", None) is not None:
            assert f"{prefix}bias" in free
    assert any(".bias" in n for n in free) and any(p.dim() > 1 for p in groups[0]["params"])
    # SRe²L's rule (multi-dimensional weights) agrees
    assert all(p.dim() == 1 for p in groups[1]["params"])


def test_weight_decay_groups_leave_layer_norm_and_frozen_parameters_out_of_decay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6),
                          nn.Linear(4 * 6 * 6, 3, bias=False))
    model[0].bias.requires_grad_(False)
    decayed, free = _named(model, weight_decay_groups(model, 0.1))
    assert decayed == {"0.weight", "4.weight"}
    assert free == {"1.weight", "1.bias", "3.weight", "3.bias"}


def test_the_student_optimiser_uses_the_groups_and_sets_every_groups_lr(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_dataset(TINY_DATA, 32, seed=0)
    spec = resolve_spec(tiny_spec(method="fd2", relabel_epochs=2, relabel_batch_size=4, eval_weight_decay=0.01))
    ctx = RunContext(spec, data, tmp_path, torch.device("cpu"), ProgressTracker({}, None, None))
    torch.manual_seed(0)
    images, labels = data.train_images[:7], data.train_labels[:7]
    soft = relabel_all_epochs(ctx, new_teacher(ctx).eval(), images, labels, tmp_path / "soft.safetensors")
    seen: list[list[tuple[float, float, int]]] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([(g["weight_decay"], g["lr"], len(g["params"])) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_student(ctx, images, labels, soft, stream="s")
    assert len(seen) == len(soft)
    for groups in seen:
        (wd_on, lr_on, n_on), (wd_off, lr_off, n_off) = groups
        assert (wd_on, wd_off) == (0.01, 0.0) and lr_on == lr_off and n_on > 0 and n_off > 0
    assert seen[0][0][1] != seen[-1][0][1]  # the schedule reaches every group


@pytest.mark.parametrize("mode", ["published", "cal-code"])
def test_a_cal_teacher_pretrains_under_each_crop_drop_mode(tmp_path, monkeypatch: pytest.MonkeyPatch, mode: str):
    seen: list[bool] = []
    real = stage.attention_crop_drop

    def recording(images, attention, generator=None, **kwargs):
        seen.append(kwargs["align_corners"])
        return real(images, attention, generator, **kwargs)

    monkeypatch.setattr(stage, "attention_crop_drop", recording)
    spec = resolve_spec(tiny_spec(method="fd2", cal_crop_drop=mode, pretrain_lr_decay=0.9))
    ctx = RunContext(spec, load_dataset(TINY_DATA, 32, seed=0), tmp_path, torch.device("cpu"),
                     ProgressTracker({"pretrain": 1.0}, None, None))
    committee = stage.pretrain(ctx)
    assert seen and set(seen) == {mode == "cal-code"}
    assert committee.members[0].model.cal_head is not None
