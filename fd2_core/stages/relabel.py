"""Stage 3 — record FKD-style soft labels for a set of images (distilled or random real)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import FD2Model
from ..progress import StageReporter
from ..runtime import autocast, frozen, generator
from ..softlabels import SoftLabels, record_soft_labels, save_soft_labels
from .context import RunContext
from .teacher import teacher_logits

SOFT_LABELS_FILE = "soft_labels.safetensors"


def relabel(
    ctx: RunContext,
    teacher: FD2Model,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    stream: str = "relabel",
    parent: StageReporter | None = None,
) -> SoftLabels:
    """Soft labels for `images_u8` (uint8 [N,3,S,S]); reuses the file when it already exists.

    Alone it is the `relabel` stage; with a `parent` reporter (the random baseline inside `evaluate`) it only
    keeps polling the stop flag through the parent and emits no stage events of its own.
    """
    spec = ctx.spec
    reporter = parent or ctx.tracker.stage("relabel")
    if path.exists():
        if parent is None:
            reporter.begin(1)
            reporter.log(f"{path.name} already recorded; reusing it")
            reporter.end()
        return SoftLabels.load(path)
    images = ctx.normalize(images_u8).float()
    if parent is None:
        reporter.begin(1)

    def on_batch(done: int, total: int) -> None:
        if parent is None:
            reporter.total = total
            reporter.step(done)
        else:
            parent.poll()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with autocast(ctx.device, ctx.amp):
            return teacher_logits(teacher, x, spec.cal_ratio)

    with frozen(teacher):
        tensors = record_soft_labels(
            logits_of,
            images,
            epochs=spec.relabel_epochs,
            batch_size=spec.relabel_batch_size,
            generator=generator(spec.seed, stream),
            cutmix_alpha=spec.cutmix_alpha,
            min_crop_scale=spec.min_crop_scale,
            topk=spec.topk,
            on_batch=on_batch,
        )
    meta = {
        "batch_size": spec.relabel_batch_size,
        "epochs": spec.relabel_epochs,
        "num_images": int(images.shape[0]),
        "num_classes": ctx.num_classes,
        "image_size": spec.image_size,
        "topk": spec.topk,
        "cutmix_alpha": spec.cutmix_alpha,
        "min_crop_scale": spec.min_crop_scale,
        "temperature": spec.eval_temperature,
        "teacher_logits": "(1-r)*backbone + r*cal_head" if spec.uses_cal else "backbone",
        "cal_ratio": spec.cal_ratio,
        "labels": labels.tolist(),
        "classes": ctx.data.classes,
        "mean": list(ctx.data.mean),
        "std": list(ctx.data.std),
    }
    save_soft_labels(path, tensors, meta)
    if parent is None:
        reporter.end()
    return SoftLabels.load(path)
