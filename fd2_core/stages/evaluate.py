"""Stage 4 — train a student only on a small labelled set and measure it on the real test split.

The student replays the recorded augmentations and learns from the stored teacher logits with
KL(softmax(teacher/T) ‖ softmax(student/T)) (or plain CE on hard labels, for the hard-label comparison), as the
published validation script does: AdamW, the lr set once per epoch (half-cosine by default), each replayed batch
split into micro-batches whose gradients are accumulated before one optimizer step, the last epoch's model
reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment import apply_crop_flip, apply_cutmix
from ..models import build_model
from ..runtime import autocast, generator, to_device
from ..softlabels import SoftLabels, forward_parts
from .context import RunContext
from .teacher import correctness

SCHEDULES = ("half-cosine", "cosine")


@dataclass(frozen=True)
class StudentResult:
    """Test result of a student: `correct` bool [N_test] in test-split order, `accuracy` its mean."""

    accuracy: float
    correct: torch.Tensor

    @classmethod
    def from_correct(cls, correct: torch.Tensor) -> StudentResult:
        """accuracy = correct.double().mean() (NaN for an empty test split)."""
        return cls(float(correct.double().mean()), correct)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), batch mean, no T² factor — the published validation objective."""
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

    half-cosine = lr·0.5·(1 + cos(π·e/(2E))), which only decays to half the lr; cosine = lr·0.5·(1 + cos(π·e/E)).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    span = 2 * epochs if schedule == "half-cosine" else epochs
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / span))


def micro_batches(soft: SoftLabels) -> int:
    """Micro-batches per replayed batch: the file's `forward_splits`.

    Published protocol: the student's micro-batches are exactly the parts the teacher forwarded (both split with
    `forward_parts`), so one setting (`relabel_forward_splits`) governs both and they cannot disagree.
    """
    return soft.forward_splits


def accumulate(loss_of: Callable[[slice], torch.Tensor], parts: list[slice]) -> torch.Tensor:
    """Backward loss_of(part) / len(parts) for each micro-batch slice; returns their sum, detached.

    Published validation script: the batch of 20 as 2 micro-batches of 10, one optimizer step afterwards; for
    equal parts the accumulated gradient is that of the full batch's mean loss.
    """
    total = torch.zeros(())
    for part in parts:
        loss = loss_of(part) / len(parts)
        loss.backward()
        total = loss.detach() + total.to(loss.device)  # stays on the device: no sync per micro-batch
    return total


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
) -> tuple[Callable[[slice], torch.Tensor], int]:
    """(loss of a batch-local slice of replayed batch `step`, batch size)."""
    idx, crop, cutmix, target = soft.batch(step)
    idx = idx.to(ctx.device)
    x = apply_cutmix(apply_crop_flip(images[idx], crop), cutmix)
    target, y = target.to(ctx.device), labels[idx]
    partner = None if cutmix is None else y[cutmix.permutation.to(ctx.device)]
    lam = 1.0 if cutmix is None else cutmix.lam

    def loss_of(part: slice) -> torch.Tensor:
        with autocast(ctx.device, ctx.amp):
            logits = student(x[part]).logits.float()
        if hard_labels:
            return hard_label_loss(logits, y[part], None if partner is None else partner[part], lam)
        return soft_label_loss(logits, target[part], ctx.spec.eval_temperature)

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
) -> StudentResult:
    """Train a fresh student on the replayed batches (one optimizer step each); test its last epoch's model.

    images_u8 uint8 [N,3,S,S] in the soft labels' order, labels [N]. Returns per-test-image correctness.
    """
    spec = ctx.spec
    student = _new_student(ctx, stream)
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.eval_lr, weight_decay=spec.eval_weight_decay)
    images = ctx.normalize(images_u8).float()
    labels = labels.to(ctx.device)
    splits = micro_batches(soft)
    for step in range(len(soft)):
        epoch = step // soft.batches_per_epoch
        optimizer.param_groups[0]["lr"] = student_lr(spec.eval_lr, epoch, soft.epochs, spec.eval_schedule)
        loss_of, size = _batch_loss(ctx, student, images, labels, soft, step, hard_labels)
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(loss_of, forward_parts(size, splits))
        optimizer.step()
        if reporter is not None:
            reporter.step(done_before + step + 1, {"student_loss": loss})
    return StudentResult.from_correct(correctness(student, ctx, ctx.data.test_images, ctx.data.test_labels))
