"""Relabel and student follow the published protocol (docs: FD² paper;
published relabel and validation scripts).

Relabel: logits of the chosen source, BatchNorm with the statistics of each
forwarded part (train mode) or the running statistics (eval), the teacher's
stored statistics untouched, the protocol in the file's metadata.
Student: lr per epoch (half-cosine ends at half the lr), each replayed batch as micro-batches with
accumulated gradients and one optimizer step.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from old_soft_labels import write_old_format
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors.torch import save_file
from torch.nn.modules.batchnorm import _BatchNorm

from fd2_core.augment import apply_crop_flip, apply_cutmix
from fd2_core.data.dataset import load_dataset
from fd2_core.distilled import DistilledSet, SoftLabelReplay
from fd2_core.progress import ProgressTracker
from fd2_core.softlabels import FORMAT, PROTOCOL_KEYS, SoftLabels, forward_parts
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages import evaluate
from fd2_core.stages.context import RunContext
from fd2_core.stages.evaluate import StudentResult, accumulate, soft_label_loss, student_lr, train_student
from fd2_core.stages.relabel import relabel_all_epochs
from fd2_core.stages.teacher import new_teacher

N_IMAGES = 7  # batches of 4 and 3: forwarded as parts of 2 + 2 and 2 + 1


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _ctx(tmp_path, data, **overrides) -> RunContext:
    spec = resolve_spec(tiny_spec(**{"method": "fd2", "relabel_epochs": 2, "relabel_batch_size": 4, **overrides}))
    return RunContext(spec, data, tmp_path, torch.device("cpu"), ProgressTracker({}, None, None))


def _teacher(ctx: RunContext) -> torch.nn.Module:
    """A CAL teacher whose running statistics are far from any batch's, so
    train and eval mode differ."""
    torch.manual_seed(0)
    teacher = new_teacher(ctx)
    g = torch.Generator().manual_seed(1)
    for bn in teacher.modules():
        if isinstance(bn, _BatchNorm):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 3 + 0.5)
            bn.num_batches_tracked.fill_(11)
    return teacher.eval()


def _relabel(ctx, teacher, tmp_path, name="soft.safetensors") -> SoftLabels:
    images, labels = ctx.data.train_images[:N_IMAGES], ctx.data.train_labels[:N_IMAGES]
    return relabel_all_epochs(ctx, teacher, images, labels, tmp_path / name)


def _pick(out, source: str, r: float) -> torch.Tensor:
    if source == "backbone":
        return out.logits
    if source == "cal":
        return out.cal.logits
    return (1 - r) * out.logits + r * out.cal.logits


def _reference(ctx, teacher, soft: SoftLabels, source: str, train: bool, halves: bool) -> list[torch.Tensor]:
    """Plain replay: a copy of the teacher in train (or eval) mode, each recorded batch forwarded as
    its first ceil(b/2) and remaining images (or whole), logits of `source` per batch."""
    model = copy.deepcopy(teacher).train(train)
    images = ctx.normalize(ctx.data.train_images[:N_IMAGES]).float()
    out = []
    for step in range(len(soft)):
        idx, crop, cutmix, _ = soft.batch(step)
        x = apply_cutmix(apply_crop_flip(images[idx], crop), cutmix)
        chunks = x.split(math.ceil(x.shape[0] / 2)) if halves else [x]
        with torch.no_grad():
            out.append(torch.cat([_pick(model(c), source, ctx.spec.cal_ratio).float() for c in chunks]))
    return out


def _assert_fp16_close(stored: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)


def _far(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) > 0.1


@pytest.mark.parametrize("source", ["backbone", "cal", "mixed"])
def test_train_mode_stores_the_logits_of_each_forwarded_half(tmp_path, data, source):
    ctx = _ctx(tmp_path, data, soft_label_source=source)
    teacher = _teacher(ctx)
    soft = _relabel(ctx, teacher, tmp_path)
    stored = [soft.batch(step)[3] for step in range(len(soft))]
    expected = _reference(ctx, teacher, soft, source, train=True, halves=True)
    for got, want in zip(stored, expected, strict=True):
        _assert_fp16_close(got, want)
    # the check has teeth: eval logits and unsplit train-mode logits are
    # both far from what was stored
    assert _far(stored, _reference(ctx, teacher, soft, source, train=False, halves=True))
    assert _far(stored, _reference(ctx, teacher, soft, source, train=True, halves=False))


@pytest.mark.parametrize("source", ["backbone", "mixed"])
def test_eval_mode_stores_the_running_statistics_logits(tmp_path, data, source):
    ctx = _ctx(tmp_path, data, soft_label_source=source, relabel_bn_mode="eval")
    teacher = _teacher(ctx)
    soft = _relabel(ctx, teacher, tmp_path)
    expected = _reference(ctx, teacher, soft, source, train=False, halves=False)
    for step, want in enumerate(expected):
        _assert_fp16_close(soft.batch(step)[3], want)


def test_sources_differ_from_each_other(tmp_path, data):
    logits = {}
    for source in ("backbone", "cal", "mixed"):
        ctx = _ctx(tmp_path, data, soft_label_source=source)
        logits[source] = _relabel(ctx, _teacher(ctx), tmp_path, f"{source}.safetensors").tensors["logits"].float()
    r = ctx.spec.cal_ratio
    _assert_fp16_close(logits["mixed"], (1 - r) * logits["backbone"] + r * logits["cal"])
    assert not torch.allclose(logits["backbone"], logits["cal"], atol=0.1)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_teacher_running_statistics_and_modes_are_unchanged(tmp_path, data, bn_mode):
    ctx = _ctx(tmp_path, data, relabel_bn_mode=bn_mode)
    teacher = _teacher(ctx)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in teacher.modules()]
    grads = [p.requires_grad for p in teacher.parameters()]
    _relabel(ctx, teacher, tmp_path)
    after = teacher.state_dict()
    assert set(after) == set(before)
    bn_buffers = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_buffers) == 3 * len(teacher.bn_layers())
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert flags == [(m.training, getattr(m, "track_running_stats", None)) for m in teacher.modules()]
    assert grads == [p.requires_grad for p in teacher.parameters()]


def _positional(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images in the ipc-major order of a distilled set: position
    i = j·K + c holds class c."""
    k = len(data.classes)
    picks = [int(torch.nonzero(data.train_labels == i % k)[i // k]) for i in range(N_IMAGES)]
    return data.train_images[picks], data.train_labels[picks]


def _replay(data, images, labels, soft: SoftLabels) -> SoftLabelReplay:
    """SoftLabelReplay over a set described as a download would (images/<class>/<class>_<j>.png)."""
    k = len(data.classes)
    files = [f"images/{data.classes[int(c)]}/{data.classes[int(c)]}_{i // k}.png" for i, c in enumerate(labels)]
    return SoftLabelReplay(DistilledSet(images, labels, list(data.classes), files, {}), soft)


def test_metadata_records_the_protocol_and_replay_reads_it(tmp_path, data):
    ctx = _ctx(tmp_path, data, soft_label_source="cal", relabel_forward_splits=3)
    images, labels = _positional(data)
    soft = relabel_all_epochs(ctx, _teacher(ctx), images, labels, tmp_path / "soft.safetensors")
    meta = soft.metadata
    assert meta["format"] == FORMAT == "fd2.soft_labels.v5"
    recorded = (meta["soft_label_source"], meta["relabel_bn_mode"], json.loads(meta["forward_splits"]))
    assert recorded == ("cal", "train", 3)
    assert "r*cal_head" not in meta["teacher_logits"] and "CAL head" in meta["teacher_logits"]
    assert (soft.format_version, soft.soft_label_source, soft.bn_mode, soft.forward_splits) == (5, "cal", "train", 3)

    replay = _replay(data, images, labels, soft)
    assert (replay.soft_label_source, replay.bn_mode, replay.forward_splits) == ("cal", "train", 3)
    x, logits = replay[0]
    parts = replay.split((x, logits))
    assert [p[0].shape[0] for p in parts] == [2, 1, 1]  # a batch of 4 in 3 parts
    assert torch.equal(torch.cat([p[1] for p in parts]), logits) and torch.equal(torch.cat([p[0] for p in parts]), x)


def _write_v1(path, soft: SoftLabels, teacher_logits: str | None) -> None:
    write_old_format(path, soft, "fd2.soft_labels.v1", drop=(*PROTOCOL_KEYS, "teacher_logits"))
    if teacher_logits is not None:
        old = SoftLabels.load(path)
        save_file(old.tensors, str(path), metadata={**old.metadata, "teacher_logits": teacher_logits})


@pytest.mark.parametrize(
    ("recorded", "source"), [("(1-r)*backbone + r*cal_head", "mixed"), ("backbone", "backbone"), (None, "unknown")]
)
def test_v1_files_load_with_their_old_meaning(tmp_path, data, recorded, source):
    ctx = _ctx(tmp_path, data)
    images, labels = _positional(data)
    v3 = relabel_all_epochs(ctx, _teacher(ctx), images, labels, tmp_path / "v3.safetensors")
    _write_v1(tmp_path / "v1.safetensors", v3, recorded)
    v1 = SoftLabels.load(tmp_path / "v1.safetensors")
    assert (v1.format_version, v1.soft_label_source, v1.bn_mode, v1.forward_splits) == (1, source, "eval", 1)
    assert [len(range(4)[p]) for p in v1.parts(0)] == [4]
    replay = _replay(data, images, labels, v1)
    assert replay.forward_splits == 1 and len(replay.split(replay[0])) == 1


def test_relabel_records_again_over_a_file_of_another_protocol(tmp_path, data):
    ctx = _ctx(tmp_path, data)
    teacher = _teacher(ctx)
    first = _relabel(ctx, teacher, tmp_path)
    _write_v1(tmp_path / "soft.safetensors", first, "(1-r)*backbone + r*cal_head")
    again = _relabel(ctx, teacher, tmp_path)
    assert again.format_version == 5 and torch.equal(again.tensors["logits"], first.tensors["logits"])
    written = (tmp_path / "soft.safetensors").stat().st_mtime_ns
    _relabel(ctx, teacher, tmp_path)  # same protocol: reused, not written again
    assert (tmp_path / "soft.safetensors").stat().st_mtime_ns == written


def test_relabel_records_again_over_a_file_of_an_older_format(tmp_path, data):
    """A v3 file is another augmentation stream (clamped boxes, roi_align):
    never reused for a new recording."""
    ctx = _ctx(tmp_path, data)
    teacher = _teacher(ctx)
    first = _relabel(ctx, teacher, tmp_path)
    write_old_format(tmp_path / "soft.safetensors", first, "fd2.soft_labels.v3")
    assert SoftLabels.load(tmp_path / "soft.safetensors").format_version == 3
    again = _relabel(ctx, teacher, tmp_path)
    assert again.format_version == 5 and torch.equal(again.tensors["logits"], first.tensors["logits"])


def test_relabel_records_again_when_the_spec_asks_for_another_encoding(tmp_path, data):
    """The protocol check includes the encoding: a resumed job asking for int8 top-k records again."""
    ctx = _ctx(tmp_path, data)
    teacher = _teacher(ctx)
    first = _relabel(ctx, teacher, tmp_path)
    assert first.encoding.name == "fp16"
    compact = _ctx(tmp_path, data, soft_label_values="int8", topk=2)
    again = _relabel(compact, teacher, tmp_path)
    assert again.encoding.name == "top2-int8" and set(again.tensors) >= {"q_logits", "q_scale", "topk_indices"}
    assert torch.equal(again.tensors["topk_indices"].long(), first.tensors["logits"].float().topk(2, -1).indices)


def test_forward_parts_are_consecutive_and_balanced():
    assert forward_parts(20, 2) == [slice(0, 10), slice(10, 20)]
    assert forward_parts(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert forward_parts(1, 2) == [slice(0, 1)]
    assert forward_parts(5, 1) == [slice(0, 5)]


def test_student_lr_is_per_epoch_and_half_cosine_ends_at_half():
    lr, epochs = 0.01, 400
    assert student_lr(lr, 0, epochs) == lr
    assert student_lr(lr, epochs, epochs) == pytest.approx(lr / 2)
    assert lr / 2 < student_lr(lr, epochs - 1, epochs) < lr / 2 * 1.01
    assert student_lr(lr, 200, epochs) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert student_lr(lr, epochs, epochs, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert student_lr(lr, 200, epochs, "cosine") == pytest.approx(lr / 2)
    with pytest.raises(ValueError):
        student_lr(lr, 0, epochs, "linear")


def test_accumulated_gradient_equals_the_full_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5)).eval()
    x, t = torch.randn(10, 12), torch.randn(10, 5) * 3

    def loss_of(part: slice) -> torch.Tensor:
        return soft_label_loss(model(x[part]), t[part], 4.0)

    total = accumulate(loss_of, forward_parts(10, 2))
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = loss_of(slice(None))
    full.backward()
    for got, want in zip(accumulated, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, full.detach())


@pytest.mark.parametrize(("schedule", "splits"), [("half-cosine", 2), ("cosine", 1)])
def test_student_steps_once_per_batch_on_the_teachers_parts(tmp_path, data, monkeypatch, schedule, splits):
    ctx = _ctx(tmp_path, data, relabel_epochs=3, eval_lr=0.01, eval_schedule=schedule, relabel_forward_splits=splits)
    soft = _relabel(ctx, _teacher(ctx), tmp_path)
    lrs, events, students = [], [], []
    real_step, real_build = torch.optim.AdamW.step, evaluate.build_model

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        events.append("step")
        return real_step(self, *args, **kwargs)

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: events.append(inp[0].shape[0]) if m.training else None)
        students.append(model)
        return model

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(evaluate, "build_model", build)
    result = train_student(ctx, ctx.data.train_images[:N_IMAGES], ctx.data.train_labels[:N_IMAGES], soft, stream="s")

    assert len(lrs) == len(soft) == 3 * 2  # one optimizer step per replayed batch
    expected = [student_lr(0.01, s // soft.batches_per_epoch, 3, schedule) for s in range(len(soft))]
    assert lrs == expected and lrs[0] == lrs[1] != lrs[2]  # set once per epoch
    teacher_parts = [[p.stop - p.start for p in soft.parts(s)] for s in range(len(soft))]
    assert teacher_parts == ([[2, 2], [2, 1]] if splits == 2 else [[4], [3]]) * 3
    assert _micro_batches(events) == teacher_parts
    _check_result(result, students[0], ctx)


def _micro_batches(events: list) -> list[list[int]]:
    """Student forward sizes grouped by optimizer step (events: ints =
    forwards, "step" = an optimizer step)."""
    batches: list[list[int]] = [[]]
    for event in events:
        if event == "step":
            batches.append([])
        else:
            batches[-1].append(event)
    return batches[:-1]


def _check_result(result: StudentResult, student: torch.nn.Module, ctx) -> None:
    n_test = ctx.data.test_images.shape[0]
    assert result.correct.dtype == torch.bool and result.correct.shape == (n_test,)
    assert result.accuracy == float(result.correct.double().mean())
    with torch.no_grad():
        predicted = student.eval()(ctx.normalize(ctx.data.test_images)).logits.argmax(1)
    assert torch.equal(result.correct, predicted == ctx.data.test_labels)  # test-split order


def test_hard_label_student_accumulates_over_cutmix_parts(tmp_path, data):
    ctx = _ctx(tmp_path, data)
    soft = _relabel(ctx, _teacher(ctx), tmp_path)
    result = train_student(
        ctx, ctx.data.train_images[:N_IMAGES], ctx.data.train_labels[:N_IMAGES], soft, stream="s", hard_labels=True
    )
    assert isinstance(result, StudentResult) and 0.0 <= result.accuracy <= 1.0


def test_evaluate_reports_each_student_s_loss_under_its_own_term(tmp_path, data, monkeypatch):
    """The students run one after another in one stage; their own loss
    terms keep the console's curves apart."""
    from fd2_core import progress

    monkeypatch.setattr(progress, "EVENT_INTERVAL_S", 0.0)  # an event per step
    seen: list = []
    ctx = _ctx(tmp_path, data, eval_random_baseline=True, eval_hlr=False)
    ctx = RunContext(ctx.spec, ctx.data, tmp_path, ctx.device, ProgressTracker({"evaluate": 1.0}, seen.append, None))
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    teacher = _teacher(ctx)
    soft = _relabel(ctx, teacher, tmp_path)
    evaluate.evaluate(ctx, teacher, ctx.data.train_images[:N_IMAGES], ctx.data.train_labels[:N_IMAGES], soft)
    progress_events = [e for e in seen if e.stage == "evaluate" and e.kind == "progress"]
    terms = [next(iter(e.losses)) for e in progress_events if e.losses]
    first = terms.count("student_loss")
    assert first == len(soft) and terms[:first] == ["student_loss"] * first
    assert terms[first:] and set(terms[first:]) == {"random_baseline_loss"}
    fractions = [e.stage_progress for e in progress_events]
    # one rising x: the term, not the x, tells the students apart
    assert fractions == sorted(fractions)


def _rewrite_walk(path, **walk_fields) -> None:
    """The file at `path` with fields of its `augmentations` metadata replaced (digests untouched)."""
    soft = SoftLabels.load(path)
    walk = {**json.loads(soft.metadata["augmentations"]), **walk_fields}
    save_file(soft.tensors, str(path), metadata={**soft.metadata, "augmentations": json.dumps(walk)})


def test_relabel_reuses_a_file_of_other_versions_only_when_its_walk_regenerates(tmp_path, data):
    ctx = _ctx(tmp_path, data)
    teacher = _teacher(ctx)
    path = tmp_path / "soft.safetensors"
    _relabel(ctx, teacher, tmp_path)
    _rewrite_walk(path, torch="1.0.0")  # another torch whose stream happens to be the same: reused
    written = path.stat().st_mtime_ns
    assert _relabel(ctx, teacher, tmp_path).stream.torch_version == "1.0.0"
    assert path.stat().st_mtime_ns == written
    tampered = SoftLabels.load(path)
    tampered.tensors["augment_digests"][0, 0] ^= 1  # as if that torch had drawn another walk
    save_file(tampered.tensors, str(path), metadata=tampered.metadata)
    again = _relabel(ctx, teacher, tmp_path)
    assert again.stream.torch_version == torch.__version__  # recorded again, here
    again.verify_augmentations()


def test_relabel_records_again_over_a_file_of_another_walk(tmp_path, data):
    ctx = _ctx(tmp_path, data)
    teacher = _teacher(ctx)
    path = tmp_path / "soft.safetensors"
    first = _relabel(ctx, teacher, tmp_path)
    for changed in ({"seed": 99}, {"cutmix_alpha": 0.5}, {"rule": "clamped", "resampling": "roi_align"}):
        _rewrite_walk(path, **changed)
        written = path.stat().st_mtime_ns
        again = _relabel(ctx, teacher, tmp_path)
        assert path.stat().st_mtime_ns != written and json.loads(again.metadata["augmentations"]) == json.loads(
            first.metadata["augmentations"]), changed
    old = SoftLabels.load(path)
    save_file(old.tensors, str(path), metadata={**old.metadata, "epochs_kept": "[1]"})
    assert _relabel(ctx, teacher, tmp_path).recorded_epochs == [0, 1]


def test_a_top_k_that_keeps_every_class_is_recorded_and_named_without_it(tmp_path, data):
    ctx = _ctx(tmp_path, data, topk=len(data.classes), soft_label_values="int8")
    teacher = _teacher(ctx)
    first = _relabel(ctx, teacher, tmp_path)
    assert first.encoding.name == "int8" and "topk_indices" not in first.tensors
    written = (tmp_path / "soft.safetensors").stat().st_mtime_ns
    _relabel(ctx, teacher, tmp_path)  # the spec's top-k is that encoding: reused
    assert (tmp_path / "soft.safetensors").stat().st_mtime_ns == written
