"""Stage 4 — train a student only on a small labelled set and measure it on the real test split.

The student replays the recorded augmentations and learns from the stored teacher logits with
KL(student/T ‖ softmax(teacher/T)) (or plain CE on hard labels, for the hard-label comparison).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..augment import CutMix, apply_crop_flip, apply_cutmix
from ..models import build_model
from ..runtime import autocast, generator, to_device
from ..softlabels import SoftLabels
from .context import RunContext
from .teacher import accuracy


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), batch mean — the published relabel objective."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor, cutmix: CutMix | None) -> torch.Tensor:
    """CE on the true classes, mixed by CutMix's λ when the batch was mixed."""
    if cutmix is None:
        return F.cross_entropy(student_logits, labels)
    partner = labels[cutmix.permutation.to(labels.device)]
    return cutmix.lam * F.cross_entropy(student_logits, labels) + (1 - cutmix.lam) * F.cross_entropy(
        student_logits, partner
    )


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
) -> float:
    """Train a fresh student on the replayed batches; returns its top-1 accuracy on the real test split."""
    spec = ctx.spec
    torch.manual_seed(int(generator(spec.seed, "student-init", stream).initial_seed() & 0x7FFFFFFF))
    student = build_model(spec.student, ctx.num_classes, spec.image_size, cal=False, width=spec.model_width)
    student = to_device(student, ctx.device, channels_last=ctx.amp)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.eval_lr, weight_decay=spec.eval_weight_decay)
    images = ctx.normalize(images_u8).float()
    labels = labels.to(ctx.device)
    steps = len(soft)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = 0.5 * spec.eval_lr * (1 + math.cos(math.pi * step / steps))
        idx, crop, cutmix, target = soft.batch(step)
        idx = idx.to(ctx.device)
        x = apply_cutmix(apply_crop_flip(images[idx], crop), cutmix)
        with autocast(ctx.device, ctx.amp):
            logits = student(x).logits.float()
        if hard_labels:
            loss = hard_label_loss(logits, labels[idx], cutmix)
        else:
            loss = soft_label_loss(logits, target.to(ctx.device), spec.eval_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if reporter is not None:
            reporter.step(done_before + step + 1, {"student_loss": loss.detach()})
    return accuracy(student, ctx, ctx.data.test_images, ctx.data.test_labels)
