"""Teacher committees (docs/ARCHITECTURE.md; FD² paper, "Second base: FADRM+"):
the spec and presets, one member per step in turn or all of them weighted, the
relabel's weighted mean of the members' logits, the teacher artifact with every
member, per-member resume, and whole runs through the library and the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open
from torch.nn.modules.batchnorm import _BatchNorm

import fd2_core.stages.fadrm_phases as fadrm_phases
import fd2_core.stages.synthesis as synthesis
from fd2_core.atomic import load_tensors
from fd2_core.augment import apply_crop_flip, apply_cutmix
from fd2_core.cost import TRAIN_STEP_PASSES, DatasetSize, stage_image_passes
from fd2_core.data.dataset import load_dataset
from fd2_core.data.errors import DataError
from fd2_core.pipeline import run
from fd2_core.presets import PAPER_COMMITTEE, PRESETS
from fd2_core.progress import ProgressTracker
from fd2_core.spec import ValidationError
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.committee import Committee, TeacherMember, member_context
from fd2_core.stages.context import RunContext
from fd2_core.stages.pretrain import pretrain
from fd2_core.stages.relabel import relabel_all_epochs
from fd2_core.stages.teacher import new_teacher

ROOT = Path(__file__).resolve().parents[2]
TWO_CONVNETS = [{"backbone": "convnet", "model_width": 8}, {"backbone": "convnet", "model_width": 12, "weight": 3}]
PHASES = [2, 2, 3]


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _ctx(tmp_path: Path, data, **overrides) -> RunContext:
    spec = resolve_spec(tiny_spec(**overrides))
    return RunContext(spec, data, tmp_path, torch.device("cpu"), ProgressTracker({}, None, None))


# --- spec and presets -----------------------------------------------------------------------------


def test_members_take_the_published_m_and_r_of_their_own_backbone() -> None:
    spec = resolve_spec({"preset": "paper-cars", "committee": ["resnet18", "densenet121", {"backbone": "resnet50",
                                                                                             "cal_ratio": 0.9}]})
    assert [(m.backbone, m.num_attention_maps, m.cal_ratio) for m in spec.members] == [
        # a value the user sets wins
        ("resnet18", 8, 0.3), ("densenet121", 32, 0.4), ("resnet50", 32, 0.9),
    ]
    assert spec.member_spec(1).backbone == "densenet121" and spec.member_spec(1).num_attention_maps == 32
    assert spec.member_spec(1).committee is None
    # outside the paper presets a member takes the spec's own M, r and width
    small = resolve_spec({"committee": ["convnet", {"backbone": "convnet", "model_width": 48}], "cal_ratio": 0.4})
    assert [(m.model_width, m.num_attention_maps, m.cal_ratio) for m in small.members] == [(32, 8, 0.4), (48, 8, 0.4)]
    one = resolve_spec({})
    assert one.committee is None and [m.backbone for m in one.members] == ["convnet"]


@pytest.mark.parametrize(("raw", "round_robin"), [
    ({"committee": ["convnet", "convnet"]}, False),  # SRe²L++ committee: weighted sum
    ({"committee": ["convnet", "convnet"], "base": "fadrm+"}, True),  # FADRM+: one per step
    ({"committee": ["convnet", "convnet"], "base": "fadrm+", "committee_mode": "weighted-sum"}, False),
    ({"committee": ["convnet", "convnet"], "committee_mode": "round-robin"}, True),
])
def test_committee_mode_auto_follows_the_recipe(raw: dict, round_robin: bool) -> None:
    assert resolve_spec(raw).round_robin is round_robin


@pytest.mark.parametrize(("raw", "words"), [
    ({"committee_mode": "round-robin"}, ["committee_mode needs a committee"]),
    ({"committee": []}, ["at least 1"]),
    ({"committee": ["convnet"] * 9}, ["at most 8"]),
    ({"committee": ["vgg"]}, ["'convnet'", "'densenet121'"]),
    ({"committee": [{"backbone": "convnet", "weight": 0}]}, ["greater than 0"]),
])
def test_bad_committees_are_refused_with_the_field_named(raw: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        resolve_spec(raw)
    text = str(err.value)
    for word in words:
        assert word in text, text


@pytest.mark.parametrize("dataset", ["paper-cub", "paper-cars", "paper-aircraft"])
def test_fadrm_paper_presets_are_the_published_committee_run(dataset: str) -> None:
    spec = resolve_spec({"preset": f"{dataset}-fadrm"})
    plain = resolve_spec({"preset": dataset})
    assert (spec.method, spec.base, spec.round_robin) == ("fd2", "fadrm+", True)
    assert tuple(m.backbone for m in spec.members) == PAPER_COMMITTEE
    assert (spec.distill_lr, spec.eval_lr, spec.fadrm_phase_steps) == (0.1, 1e-2, [1500, 1500, 1500, 2000])
    assert spec.relabel_batch_size == plain.relabel_batch_size and spec.image_size == 224
    for member in spec.members:  # each member's own column of the published table
        assert (member.num_attention_maps, member.cal_ratio) == (
            resolve_spec({"preset": dataset, "backbone": member.backbone}).num_attention_maps,
            resolve_spec({"preset": dataset, "backbone": member.backbone}).cal_ratio,
        )
    alone = resolve_spec({"preset": f"{dataset}-fadrm", "method": "fadrm+"})  # the FADRM+ row
    assert alone.recipe == "fadrm+" and not alone.uses_cal and len(alone.members) == 4


def test_cpu_committee_preset_is_cpu_small_plus_the_committee() -> None:
    spec = resolve_spec({"preset": "cpu-small-fadrm"})
    base = resolve_spec({"preset": "cpu-small"})
    assert [m.model_width for m in spec.members] == [32, 48, 64] and spec.round_robin
    assert (spec.eval_lr, spec.eval_temperature, spec.distill_lr) == (base.eval_lr, base.eval_temperature,
                                                                      base.distill_lr)
    assert set(PRESETS["cpu-small-fadrm"]) - set(PRESETS["cpu-small"]) == {"method", "base", "committee"}


def test_cost_counts_every_member() -> None:
    size = DatasetSize(num_classes=10, train_images=400, test_images=100)
    # the ranked patch rule trains no patch scorer, so pretraining is the members alone
    ranked = {"patch_rule": "ranked"}
    one = stage_image_passes(resolve_spec({"base": "fadrm+", **ranked}), size)
    rr_spec = resolve_spec({"base": "fadrm+", "committee": ["convnet"] * 3, **ranked})
    rr = stage_image_passes(rr_spec, size)
    ws_spec = resolve_spec({"committee": ["convnet"] * 3, **ranked})
    ws = stage_image_passes(ws_spec, size)
    single_sre = stage_image_passes(resolve_spec(ranked), size)
    assert rr["pretrain"] == 3 * one["pretrain"] and rr["relabel"] == 3 * one["relabel"]
    # the published rule (cpu-small's default) adds one plain teacher, whatever the committee's size
    published = stage_image_passes(resolve_spec({"base": "fadrm+", "committee": ["convnet"] * 3}), size)
    # forward + backward, no CAL passes
    plain = rr_spec.pretrain_epochs * size.train_images * TRAIN_STEP_PASSES
    assert published["pretrain"] - rr["pretrain"] == plain
    # one member per step: the steps cost what one teacher's cost
    assert rr["distill"] == one["distill"]
    # every member every step: two more members' training steps; the patch
    # scoring (first member) is unchanged
    steps = ws_spec.ipc * ws_spec.distill_iterations * size.num_classes * 3.0
    assert ws["distill"] - single_sre["distill"] == 2 * steps


# --- distillation: round robin and weighted sum ---------------------------------------------------


def _spy_steps(monkeypatch) -> list[list[int]]:
    """Record, per distillation step, the widths of the models it used (the
    members are told apart by width)."""
    seen: list[list[int]] = []
    original = synthesis.committee_step

    def spy(ctx, models, *args):
        seen.append([m.teacher.backbone.feature_channels for m in models])
        if len(models) > 1:
            assert abs(sum(m.weight for m in models) - 1.0) < 1e-9  # normalised weights
        return original(ctx, models, *args)

    monkeypatch.setattr(synthesis, "committee_step", spy)  # the sre2l++ steps
    monkeypatch.setattr(fadrm_phases, "committee_step", spy)  # the FADRM+ phases' steps
    return seen


def test_fadrm_committee_takes_one_member_per_step_in_turn_across_phases(tmp_path, tiny_data, monkeypatch) -> None:
    seen = _spy_steps(monkeypatch)
    members = [{"backbone": "convnet", "model_width": w} for w in (8, 12, 16)]
    run(tiny_spec(base="fadrm+", fadrm_phase_steps=PHASES, committee=members, evaluate=False), tiny_data,
        tmp_path / "run")
    # the global step picks the member
    assert seen == [[[8], [12], [16]][t % 3] for t in range(sum(PHASES))]


def test_sre2l_committee_uses_every_member_every_step_weighted(tmp_path, tiny_data, monkeypatch) -> None:
    seen = _spy_steps(monkeypatch)
    run(tiny_spec(committee=TWO_CONVNETS, evaluate=False), tiny_data, tmp_path / "run")
    assert seen == [[8, 12]] * tiny_spec()["distill_iterations"]


def test_a_weighted_step_is_the_weighted_sum_of_the_members_losses(tmp_path, tiny_data) -> None:
    ctx = _ctx(tmp_path, tiny_data, committee=TWO_CONVNETS)
    torch.manual_seed(0)
    models = [new_teacher(member_context(ctx, i)).eval() for i in range(2)]
    x0 = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    grads = []
    for weights in ([0.25, 0.75], [1.0, 0.0], [0.0, 1.0]):
        x = x0.clone().requires_grad_(True)
        with synthesis.BNStatMatcher(models[0].bn_layers()) as bn0, \
                synthesis.BNStatMatcher(models[1].bn_layers()) as bn1:
            steps = [synthesis.StepModel(m, bn, None, None, member_context(ctx, i), w)
                     for i, (m, bn, w) in enumerate(zip(models, (bn0, bn1), weights, strict=True)) if w]
            optimizer = torch.optim.SGD([x], lr=0.0)
            synthesis.committee_step(ctx, steps, x, y, optimizer, torch.Generator().manual_seed(5),
                                     ctx.pixel_bounds())
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], 0.25 * grads[1] + 0.75 * grads[2], rtol=1e-4, atol=1e-6)


# --- relabel: the weighted mean of the members' logits --------------------------------------------


def _member(ctx: RunContext, index: int, weight: float) -> TeacherMember:
    member_ctx = member_context(ctx, index)
    torch.manual_seed(index)
    model = new_teacher(member_ctx)
    g = torch.Generator().manual_seed(10 + index)
    # running statistics far from any batch's, so the BatchNorm mode shows
    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 3 + 0.5)
    return TeacherMember(f"{index}-convnet", member_ctx, model.eval(), {}, weight)


@pytest.mark.parametrize("source", ["backbone", "mixed"])
def test_committee_soft_labels_are_the_weighted_sum_of_its_members_logits(tmp_path, tiny_data, source) -> None:
    ctx = _ctx(tmp_path, tiny_data, method="fd2", committee=TWO_CONVNETS, soft_label_source=source,
               cal_ratio=0.3)
    committee = Committee([_member(ctx, 0, 0.25), _member(ctx, 1, 0.75)])
    before = [{k: v.clone() for k, v in m.model.state_dict().items()} for m in committee.members]
    images, labels = ctx.data.train_images[:7], ctx.data.train_labels[:7]
    soft = relabel_all_epochs(ctx, committee, images, labels, tmp_path / "soft.safetensors")
    x_all = ctx.normalize(images).float()
    for step in range(len(soft)):
        idx, crop, cutmix, stored = soft.batch(step)
        x = apply_cutmix(apply_crop_flip(x_all[idx], crop), cutmix)
        halves = x.split((x.shape[0] + 1) // 2)
        expected = []
        # plain reference: each member in train mode on each half, weighted by hand
        for part in halves:
            total = 0
            for member in committee.members:
                model = copy.deepcopy(member.model).train()
                with torch.no_grad():
                    out = model(part)
                r = member.ctx.spec.cal_ratio
                logits = out.logits if source == "backbone" else (1 - r) * out.logits + r * out.cal.logits
                total = total + member.weight * logits
            expected.append(total)
        torch.testing.assert_close(stored.float(), torch.cat(expected), rtol=2e-3, atol=2e-3)
    # running statistics untouched
    for member, state in zip(committee.members, before, strict=True):
        for key, value in member.model.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert [m["weight"] for m in json.loads(soft.metadata["committee"])] == [0.25, 0.75]
    assert "weighted mean over a committee of 2 teachers" in soft.metadata["teacher_logits"]


# --- pretraining, the teacher artifact and resume -------------------------------------------------


def test_each_member_pretrains_and_resumes_on_its_own(tmp_path, tiny_data, monkeypatch) -> None:
    ctx = _ctx(tmp_path, tiny_data, method="fd2", committee=TWO_CONVNETS)
    calls: list[str] = []
    import fd2_core.stages.pretrain as pretrain_stage

    original = pretrain_stage.pretrain_teacher

    def killed_at_second(member_ctx):
        calls.append(member_ctx.workdir.name)
        if member_ctx.workdir.name == "1-convnet":
            raise KeyboardInterrupt("killed")
        return original(member_ctx)

    monkeypatch.setattr(pretrain_stage, "pretrain_teacher", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        pretrain(ctx)
    assert (tmp_path / "teachers" / "0-convnet" / "stages" / "teacher.safetensors").exists()
    monkeypatch.setattr(pretrain_stage, "pretrain_teacher", original)
    events = []
    ctx.tracker = ProgressTracker({"pretrain": 1.0}, events.append, None)
    committee = pretrain(ctx)
    logs = [e.message for e in events]
    assert any("teacher 1/2 (0-convnet): pretrain already finished" in m for m in logs), logs
    assert not any("teacher 2/2 (1-convnet): pretrain already finished" in m for m in logs), logs
    assert [e.kind for e in events].count("stage_start") == 1 and [e.kind for e in events].count("stage_end") == 1
    assert [m.weight for m in committee.members] == [0.25, 0.75]
    assert committee.info["members"][1]["model_width"] == 12
    assert 0.0 <= committee.info["test_accuracy"] <= 1.0


def test_teacher_artifact_holds_every_member_with_its_keys_prefixed(tmp_path, tiny_data) -> None:
    result = run(tiny_spec(method="fd2", committee=TWO_CONVNETS, evaluate=False), tiny_data, tmp_path / "run")
    path = result.artifacts["teacher.safetensors"]
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    members = json.loads(meta["members"])
    assert meta["format"] == "fd2.teacher.committee.v1" and meta["backbone"] == "convnet,convnet"
    assert [(m["name"], m["prefix"], m["model_width"], m["weight"]) for m in members] == [
        ("0-convnet", "members.0.", 8, 0.25), ("1-convnet", "members.1.", 12, 0.75)]
    stored = load_tensors(path)
    for i, name in enumerate(("0-convnet", "1-convnet")):
        own = load_tensors(tmp_path / "run" / "teachers" / name / "stages" / "teacher.safetensors")
        assert {k.removeprefix(f"members.{i}.") for k in keys if k.startswith(f"members.{i}.")} == set(own)
        for key, value in own.items():
            assert torch.equal(stored[f"members.{i}.{key}"], value)
    teacher = result.report["teacher"]
    assert [m["name"] for m in teacher["members"]] == ["0-convnet", "1-convnet"]


def test_a_committee_run_killed_mid_phase_resumes_to_the_same_images(tmp_path, tiny_data, monkeypatch) -> None:
    raw = tiny_spec(method="fd2", base="fadrm+", ipc=2, fadrm_phase_steps=PHASES, committee=TWO_CONVNETS,
                    evaluate=False)
    run(raw, tiny_data, tmp_path / "whole")
    original = fadrm_phases.run_phase
    calls = []

    def killed_in_third_phase_of_index_1(ctx, models, x, y, phase, g, total, on_step):
        calls.append(phase.first_step)
        if len(calls) == 6:  # index 1, phase 3
            raise KeyboardInterrupt("killed")
        return original(ctx, models, x, y, phase, g, total, on_step)

    monkeypatch.setattr(fadrm_phases, "run_phase", killed_in_third_phase_of_index_1)
    with pytest.raises(KeyboardInterrupt):
        run(raw, tiny_data, tmp_path / "resumed")
    monkeypatch.setattr(fadrm_phases, "run_phase", original)
    run(raw, tiny_data, tmp_path / "resumed")
    for j in range(2):
        name = f"ipc_{j:03d}.safetensors"
        whole = load_tensors(tmp_path / "whole" / "stages" / "distill" / name)["images"]
        again = load_tensors(tmp_path / "resumed" / "stages" / "distill" / name)["images"]
        torch.testing.assert_close(again, whole, rtol=0, atol=0)


def test_a_teacher_weights_file_with_a_committee_is_refused_before_writing(tmp_path, tiny_data) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(DataError) as err:
        run(tiny_spec(committee=TWO_CONVNETS), tiny_data, tmp_path / "run", teacher_weights=weights)
    assert err.value.code == "bad_teacher_weights" and "committee of 2" in str(err.value)
    assert not (tmp_path / "run").exists()


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_runs_a_fadrm_committee_end_to_end(tmp_path) -> None:
    out = tmp_path / "o"
    spec = tiny_spec(fadrm_phase_steps=PHASES)
    sets = [arg for key, value in spec.items() if key not in ("preset", "ipc", "method", "device")
            for arg in ("--set", f"{key}={json.dumps(value)}")]
    res = subprocess.run(
        [sys.executable, "-m", "fd2_core", "distill", "--data", TINY_DATA, "--preset", "cpu-small-fadrm",
         "--device", "cpu", "--out", str(out), *sets, "--set", 'committee=["convnet", "convnet"]'],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "artifacts" / "report.json").read_text())
    assert report["spec"]["base"] == "fadrm+" and len(report["spec"]["committee"]) == 2
    assert len(report["teacher"]["members"]) == 2
    assert 0.0 <= report["metrics"]["student_accuracy"] <= 1.0
