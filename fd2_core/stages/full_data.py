"""The full-data student: the evaluation's student network trained with
hard labels on every real train image.

It is the reference of hard-label recovery, `HLR = acc(full real train set, hard labels) −
acc(distilled set, hard labels)` (DD-Ranking, Li et al., 2025; see fd2_core.metrics), and the
quality benchmark's upper bound.
A student's own recipe (AdamW at eval_lr on a few images) is calibrated for tiny sets,
so on the full data it gets the recipe calibrated for full real data, the teacher's:
the spec's pretrain optimiser (pretrain_optimizer, pretrain_lr, pretrain_momentum,
pretrain_weight_decay), cosine `lr·0.5·(1 + cos(π·t/T))` over all T steps,
`pretrain_epochs` epochs at `pretrain_batch_size` (last partial batch dropped) and the
teacher's training augmentation (`train_augment` with `pretrain_augment`).
The validation share the teacher holds out is trained on too: no checkpoint is selected (the last
epoch counts), so nothing needs held-out data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..augment import train_augment
from ..metrics import StudentResult
from ..models import build_model
from ..runtime import generator, scaled_step, to_device
from .context import RunContext
from .teacher import correctness, teacher_optimizer


def full_data_steps(ctx: RunContext) -> int:
    """Optimiser steps of `train_full_data_student` (for progress): epochs
    × full batches per epoch."""
    return ctx.spec.pretrain_epochs * max(1, ctx.data.train_images.shape[0] // ctx.spec.pretrain_batch_size)


def train_full_data_student(ctx: RunContext, *, reporter=None, done_before: int = 0) -> StudentResult:
    """Train a fresh student with CE on every real train image; its top-1
    on the real test split, per image.

    Seeded by (seed, "student-init", "full-real") for the weights and (seed, "full-real", epoch) for
    the order and augmentation of each epoch, so a rerun gives the same student.
    """
    spec, data = ctx.spec, ctx.data
    torch.manual_seed(int(generator(spec.seed, "student-init", "full-real").initial_seed() & 0x7FFFFFFF))
    student = build_model(spec.student, ctx.num_classes, spec.image_size, cal=False, width=spec.model_width)
    student = to_device(student, ctx.device, channels_last=ctx.amp)
    student.train()
    optimizer, scaler = teacher_optimizer(ctx, student.parameters()), ctx.grad_scaler()
    total = full_data_steps(ctx)
    step = 0
    for epoch in range(spec.pretrain_epochs):
        g = generator(spec.seed, "full-real", epoch)
        for x, y in ctx.iterate(data.train_images, data.train_labels, spec.pretrain_batch_size, g, drop_last=True):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * spec.pretrain_lr * (1.0 + math.cos(math.pi * step / max(total, 1)))
            x = train_augment(x, g, spec.pretrain_augment, mean=ctx.mean, std=ctx.std)
            with ctx.autocast():
                logits = student(x).logits.float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaled_step(loss, optimizer, scaler)
            step += 1
            if reporter is not None:
                reporter.step(done_before + step, {"full_data_loss": loss.detach()})
    return StudentResult.from_correct(correctness(student, ctx, data.test_images, data.test_labels))


__all__ = ["full_data_steps", "train_full_data_student"]
