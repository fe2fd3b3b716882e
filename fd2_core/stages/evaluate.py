"""Stage 4 — train students only on small labelled sets, measure them on
the real test split, compare.

The student replays the recorded augmentations and learns from the stored teacher
logits with KL(softmax(teacher/T) ‖ softmax(student/T)) (or plain CE on hard labels,
for the hard-label comparison), as the published validation script does: AdamW
(weight decay on conv/linear weights only), the lr set once per epoch (half-cosine
by default), each replayed batch split into micro-batches whose gradients are
accumulated before one optimizer step, the last epoch's model reported.
`evaluate` trains the students the spec asks for and computes DD-Ranking's metrics
(fd2_core.metrics); `comparison` is the report's block built from them.
Each student (`student_names`) is also a unit of its own
(`evaluation_student`, one shard of `fd2_core.shards`): its per-test-image
correctness is saved, and `evaluate` reuses every saved student.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import load_tensors, read_json, save_tensors, write_json
from ..augment import apply_crop_flip, apply_cutmix
from ..metrics import BOOTSTRAP_RESAMPLES, CONFIDENCE, StudentResult, bootstrap_interval, hlr, verdict
from ..models import FD2Model, build_model
from ..progress import StageReporter
from ..runtime import derive_seed, generator, to_device
from ..softlabels import SoftLabels, TeacherLogits, forward_parts
from ..spec import JobSpec
from .committee import Committee
from .context import RunContext
from .full_data import full_data_steps, train_full_data_student
from .patches import random_real_indices
from .relabel import relabel_all_epochs, teacher_logits
from .teacher import correctness

SCHEDULES = ("half-cosine", "cosine")
# The students `evaluate` can train, in its order: on the set with its soft
# labels, on a random real subset of the same size (eval_random_baseline),
# on the set with hard labels and on the full real train set (eval_hlr).
STUDENTS = ("distilled", "random", "distilled_hard_labels", "full_data")


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), batch mean, no T² factor — the
    published validation objective."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def hard_label_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor | None = None, lam: float = 1.0
) -> torch.Tensor:
    """CE on the true classes [B]; with CutMix, λ·CE(labels) + (1 − λ)·CE(partner labels [B])."""
    if partner is None:
        return F.cross_entropy(student_logits, labels)
    return lam * F.cross_entropy(student_logits, labels) + (1 - lam) * F.cross_entropy(student_logits, partner)


def student_lr(base_lr: float, epoch: int, epochs: int, schedule: str = "half-cosine") -> float:
    """lr of epoch `epoch` (0..E−1), constant within it (published validation script).

    half-cosine = lr·0.5·(1 + cos(π·e/(2E))), which only decays to half the
    lr; cosine = lr·0.5·(1 + cos(π·e/E)).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    span = 2 * epochs if schedule == "half-cosine" else epochs
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / span))


def micro_batches(soft: SoftLabels) -> int:
    """Micro-batches per replayed batch: the file's `forward_splits`.

    Published protocol: the student's micro-batches are exactly the parts
    the teacher forwarded (both split with `forward_parts`), so one setting
    (`relabel_forward_splits`) governs both and they cannot disagree.
    """
    return soft.forward_splits


def accumulate(
    loss_of: Callable[[slice], torch.Tensor], parts: list[slice], scaler: torch.amp.GradScaler | None = None
) -> torch.Tensor:
    """Backward loss_of(part) / len(parts) for each micro-batch slice
    (through `scaler` when given); returns their sum, detached.

    Published validation script: the batch of 20 as 2 micro-batches of 10, one optimizer step
    afterwards; for equal parts the accumulated gradient is that of the full batch's mean loss.
    """
    total = torch.zeros(())
    for part in parts:
        loss = loss_of(part) / len(parts)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # stays on the device: no sync per micro-batch
        total = loss.detach() + total.to(loss.device)
    return total


_DECAYED_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups [decayed, not decayed] of `model`'s
    trainable parameters, each exactly once.

    Only the weights of convolution and linear layers get `weight_decay`; biases
    and the parameters of normalisation (BatchNorm, LayerNorm, …) and every other
    layer get 0, as the published student's optimiser groups its parameters
    (SRe²L's `get_parameters`: multi-dimensional weights decayed, the rest not)."""
    decayed: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, _DECAYED_LAYERS) and module.weight is not None and module.weight.requires_grad:
            decayed[id(module.weight)] = module.weight
    rest: dict[int, torch.nn.Parameter] = {}
    for param in model.parameters():
        if param.requires_grad and id(param) not in decayed:
            rest[id(param)] = param
    return [
        {"params": list(decayed.values()), "weight_decay": weight_decay},
        {"params": list(rest.values()), "weight_decay": 0.0},
    ]


def _new_student(ctx: RunContext, stream: str) -> torch.nn.Module:
    spec = ctx.spec
    torch.manual_seed(int(generator(spec.seed, "student-init", stream).initial_seed() & 0x7FFFFFFF))
    student = build_model(spec.student, ctx.num_classes, spec.image_size, cal=False, width=spec.model_width)
    return to_device(student, ctx.device, channels_last=ctx.amp).train()


def _batch_loss(
    ctx: RunContext,
    student: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    soft: SoftLabels,
    step: int,
    hard_labels: bool,
    teacher: TeacherLogits | None = None,
) -> tuple[Callable[[slice], torch.Tensor], int]:
    """(loss of a batch-local slice of replayed batch `step`, batch size). Online soft labels get
    their logits from `teacher` on the same slice: the parts the relabel would have forwarded."""
    idx, crop, cutmix, target = soft.batch(step)
    idx = idx.to(ctx.device)
    x = apply_cutmix(apply_crop_flip(images[idx], crop), cutmix)
    y = labels[idx]
    partner = None if cutmix is None else y[cutmix.permutation.to(ctx.device)]
    lam = 1.0 if cutmix is None else cutmix.lam
    if target is None and not hard_labels and teacher is None:
        raise ValueError("these soft labels are online: the student needs the teacher that computes them")

    def loss_of(part: slice) -> torch.Tensor:
        with ctx.autocast():
            logits = student(x[part]).logits.float()
        if hard_labels:
            return hard_label_loss(logits, y[part], None if partner is None else partner[part], lam)
        if target is None:
            assert teacher is not None
            with torch.no_grad():
                wanted = teacher(x[part]).float()
        else:
            wanted = target[part].to(ctx.device)
        return soft_label_loss(logits, wanted, ctx.spec.eval_temperature)

    return loss_of, int(x.shape[0])


def train_student(
    ctx: RunContext,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    soft: SoftLabels,
    *,
    stream: str,
    hard_labels: bool = False,
    reporter=None,
    done_before: int = 0,
    loss_name: str = "student_loss",
    teacher: TeacherLogits | None = None,
) -> StudentResult:
    """Train a fresh student on the replayed batches (one optimizer step
    each); test its last epoch's model.

    images_u8 uint8 [N,3,S,S] in the soft labels' order, labels [N].
    Returns per-test-image correctness. `teacher` computes the logits of online soft labels
    (`relabel.teacher_logits`); raises ValueError when they need it and it is missing.
    Its loss is reported as `loss_name`: evaluate's students run one after another, and a term of
    their own keeps their curves apart (one line each, not one saw-tooth).
    """
    spec = ctx.spec
    student = _new_student(ctx, stream)
    optimizer = torch.optim.AdamW(weight_decay_groups(student, spec.eval_weight_decay), lr=spec.eval_lr)
    images = ctx.normalize(images_u8).float()
    labels = labels.to(ctx.device)
    splits = micro_batches(soft)
    scaler = ctx.grad_scaler()
    for step in range(len(soft)):
        epoch = step // soft.batches_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = student_lr(spec.eval_lr, epoch, soft.epochs, spec.eval_schedule)
        loss_of, size = _batch_loss(ctx, student, images, labels, soft, step, hard_labels, teacher)
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(loss_of, forward_parts(size, splits), scaler)
        scaler.step(optimizer)
        scaler.update()
        if reporter is not None:
            reporter.step(done_before + step + 1, {loss_name: loss})
    return StudentResult.from_correct(correctness(student, ctx, ctx.data.test_images, ctx.data.test_labels))


def teacher_metrics(info: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics before any student: the pretrain stage's test and validation accuracies."""
    return {
        "teacher_accuracy": info.get("test_accuracy"),
        "teacher_val_accuracy": info.get("val_accuracy"),
        "teacher_backbone_accuracy": info.get("backbone_test_accuracy"),
    }


def student_names(spec: JobSpec) -> list[str]:
    """The students the spec asks for, in the order `evaluate` trains them
    (empty when evaluate is off)."""
    if not spec.evaluate:
        return []
    asked = {"distilled": True, "random": spec.eval_random_baseline, "distilled_hard_labels": spec.eval_hlr,
             "full_data": spec.eval_hlr}
    return [name for name in STUDENTS if asked[name]]


def student_file(stage_dir: Path, name: str) -> Path:
    """A trained student's per-test-image correctness: `correct` uint8 [N_test]."""
    return stage_dir / f"evaluate_{name}.safetensors"


def student_path(ctx: RunContext, name: str) -> Path:
    return student_file(ctx.stage_dir, name)


def student_steps(ctx: RunContext, name: str) -> int:
    """Optimizer steps of a student: one per replayed batch of the
    ipc·K-image set, or the full-data student's."""
    if name == "full_data":
        return full_data_steps(ctx)
    spec = ctx.spec
    return spec.relabel_epochs * math.ceil(spec.ipc * ctx.num_classes / spec.relabel_batch_size)


def _student(
    ctx: RunContext,
    name: str,
    reporter: StageReporter,
    done_before: int,
    units: int,
    train: Callable[[int], StudentResult],
) -> StudentResult:
    """Train one evaluation student (`train(done_before)`), or reuse it:
    each finished student's per-test-image correctness is kept, so a killed
    evaluation resumes after its last finished student."""
    path = student_path(ctx, name)
    if path.exists():
        reporter.log(f"student {name!r} already trained; reusing it", fraction=(done_before + units) / reporter.total)
        return StudentResult.from_correct(load_tensors(path)["correct"].bool())
    result = train(done_before)
    save_tensors(path, {"correct": result.correct.to(torch.uint8)})
    return result


@contextlib.contextmanager
def online_teacher(
    ctx: RunContext, teacher: FD2Model | Committee | None, soft: SoftLabels, hard_labels: bool
) -> Iterator[TeacherLogits | None]:
    """The relabel's logits function for a student of online soft labels; None when the file stores
    its logits or the student trains on hard labels. Raises ValueError without a teacher."""
    if not soft.needs_teacher or hard_labels:
        yield None
        return
    if teacher is None:
        raise ValueError("these soft labels are online: the student needs the teacher that computes them")
    with teacher_logits(ctx, teacher) as logits_of:
        yield logits_of


def evaluation_student(
    ctx: RunContext,
    name: str,
    teacher: FD2Model | Committee | None,
    images_u8: torch.Tensor | None,
    labels: torch.Tensor | None,
    soft: SoftLabels | None,
    reporter: StageReporter,
    done_before: int = 0,
) -> StudentResult:
    """Train (or reuse) student `name` of `STUDENTS`, saved at `student_path`.
    What each one reads: `distilled` and `distilled_hard_labels` the set
    (uint8 [N,3,S,S], labels [N]) and its soft labels; `random` the
    teacher, which relabels the random subset; `full_data` only the data.
    Progress counts from `done_before`."""
    spec = ctx.spec
    units = student_steps(ctx, name)
    if name in ("distilled", "distilled_hard_labels"):
        assert images_u8 is not None and labels is not None and soft is not None
        hard = name == "distilled_hard_labels"

        def train(before: int) -> StudentResult:
            with online_teacher(ctx, teacher, soft, hard) as logits_of:
                return train_student(ctx, images_u8, labels, soft, stream="student", hard_labels=hard,
                                     reporter=reporter, done_before=before,
                                     loss_name="hard_label_loss" if hard else "student_loss", teacher=logits_of)
    elif name == "random":
        assert teacher is not None
        idx = random_real_indices(ctx, spec.ipc, "baseline-subset").reshape(-1)
        real_u8, real_labels = ctx.data.train_images[idx], ctx.data.train_labels[idx]

        def train(before: int) -> StudentResult:
            baseline_soft = relabel_all_epochs(
                ctx, teacher, real_u8, real_labels, ctx.stage_dir / "baseline_soft_labels.safetensors",
                stream="baseline-relabel", parent=reporter,
            )
            with online_teacher(ctx, teacher, baseline_soft, False) as logits_of:
                return train_student(
                    ctx, real_u8, real_labels, baseline_soft, stream="student", reporter=reporter,
                    done_before=before, loss_name="random_baseline_loss", teacher=logits_of,
                )
    elif name == "full_data":

        def train(before: int) -> StudentResult:
            return train_full_data_student(ctx, reporter=reporter, done_before=before)
    else:
        raise ValueError(f"unknown student {name!r}; expected one of {STUDENTS}")
    return _student(ctx, name, reporter, done_before, units, train)


def evaluate(
    ctx: RunContext, teacher: FD2Model | Committee, images_u8: torch.Tensor, labels: torch.Tensor, soft: SoftLabels
) -> dict[str, Any]:
    """Students trained on the set (uint8 [N,3,S,S], labels [N], its soft labels) and tested on the
    real test split, and DD-Ranking's metrics (fd2_core.metrics); kept in `evaluate.json`, so a
    finished evaluation is reused.

    Always the student on the distilled set with its soft labels.
    With eval_random_baseline, the same protocol on a random real subset of the same size: IOR =
    distilled − random, its paired-bootstrap 95 % interval and the verdict (beats_random only when
    the whole interval is above 0).
    With eval_hlr, the same student with hard labels on the distilled set and the full-data student:
    HLR = full data − distilled (hard labels).
    """
    spec = ctx.spec
    path = ctx.stage_dir / "evaluate.json"
    reporter = ctx.tracker.stage("evaluate")
    if path.exists():
        reporter.begin(1)
        reporter.log("evaluation already finished; reusing it")
        reporter.end()
        return read_json(path)
    names = student_names(spec)
    reporter.begin(sum(student_steps(ctx, name) for name in names))
    done = 0

    def student(name: str) -> StudentResult:
        nonlocal done
        trained = evaluation_student(ctx, name, teacher, images_u8, labels, soft, reporter, done)
        done += student_steps(ctx, name)
        return trained

    result: dict[str, Any] = {}
    distilled = student("distilled")
    result["student_accuracy"] = distilled.accuracy
    if spec.eval_random_baseline:
        baseline = student("random")
        interval = bootstrap_interval(
            distilled.correct, baseline.correct, seed=derive_seed(spec.seed, "bootstrap", "ior")
        )
        judged = verdict(distilled.accuracy, baseline.accuracy, interval)
        result["random_baseline_accuracy"] = baseline.accuracy
        result["ior"] = judged.ior
        result["ior_ci95"] = list(interval)
        result["beats_random"] = judged.beats_random
        result["verdict"] = judged.status
        reporter.log(judged.message)
    if spec.eval_hlr:
        hard = student("distilled_hard_labels")
        full = student("full_data")
        result["hard_label_accuracy"] = hard.accuracy
        result["full_data_accuracy"] = full.accuracy
        result["hlr"] = hlr(full.accuracy, hard.accuracy)
        result["hlr_ci95"] = list(
            bootstrap_interval(full.correct, hard.correct, seed=derive_seed(spec.seed, "bootstrap", "hlr"))
        )
    write_json(path, result)
    reporter.end(f"student accuracy {result['student_accuracy']:.3f}")
    return result


def comparison(metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's comparison block: the set against a random real subset of
    the same size (IOR, its interval and the verdict, with both accuracies)
    and, when measured, hard-label recovery; definitions included."""
    block: dict[str, Any] = {
        "student_accuracy": metrics.get("student_accuracy"),
        "random_baseline_accuracy": metrics.get("random_baseline_accuracy"),
        "ior": metrics.get("ior"),
        "ior_ci95": metrics.get("ior_ci95"),
        "verdict": None,
        "protocol": "student trained only on the set from its stored soft labels; top-1 on the real "
        "test split; the random baseline is a random real subset of the same size, relabelled and "
        "trained identically",
        "definitions": {
            "ior": "improvement over random (DD-Ranking) = student_accuracy - random_baseline_accuracy",
            "ior_ci95": f"{100 * CONFIDENCE:.0f} % paired bootstrap interval of IOR over the test images "
            f"({BOOTSTRAP_RESAMPLES} resamples)",
            "hlr": "hard-label recovery (DD-Ranking) = full_data_accuracy - hard_label_accuracy: the student with "
            "hard labels on every real train image minus the same student with hard labels on the set",
        },
    }
    if metrics.get("ior_ci95") is not None:
        lo, hi = metrics["ior_ci95"]
        block["verdict"] = verdict(metrics["student_accuracy"], metrics["random_baseline_accuracy"], (lo, hi)).as_dict()
    if "hlr" in metrics:
        for key in ("hard_label_accuracy", "full_data_accuracy", "hlr", "hlr_ci95"):
            block[key] = metrics.get(key)
    return block
