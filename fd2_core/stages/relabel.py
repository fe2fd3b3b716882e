"""Stage 3 — record FKD-style soft labels for a set of images (distilled or random real).

Published relabel: the teacher's logits of the chosen source (default the backbone's own classifier), BatchNorm
in train mode on each forwarded part of a batch (default two halves), the stored running statistics untouched.
A committee's soft labels are the weighted mean of its members' logits (`committee.ensemble_logits`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import FD2Model
from ..progress import StageReporter
from ..runtime import autocast, generator
from ..softlabels import SoftLabels, record_soft_labels, save_soft_labels
from ..spec import JobSpec
from .committee import Committee, as_committee, ensemble_logits, member_fields, relabel_members
from .context import RunContext

SOFT_LABELS_FILE = "soft_labels.safetensors"

_SOURCE_TEXT = {
    "backbone": "backbone classifier logits",
    "cal": "CAL head logits W(100 z)",
    "mixed": "(1-r)*backbone + r*cal_head logits, r = cal_ratio",
}
_MODE_TEXT = {
    "train": "BatchNorm with the statistics of each forwarded part (train mode; running statistics unchanged)",
    "eval": "BatchNorm with the running statistics (eval mode)",
}


def describe_logits(source: str, bn_mode: str, forward_splits: int) -> str:
    """One line saying which logits a soft-label file holds and how they were computed (metadata text)."""
    return f"{_SOURCE_TEXT[source]}; {_MODE_TEXT[bn_mode]}; each batch forwarded in {forward_splits} part(s)"


def protocol_matches(soft: SoftLabels, spec: JobSpec) -> bool:
    """True when a recorded file used the source, BatchNorm mode and forward split the spec asks for."""
    return (soft.soft_label_source, soft.bn_mode, soft.forward_splits) == (
        spec.soft_label_source,
        spec.relabel_bn_mode,
        spec.relabel_forward_splits,
    )


def relabel(
    ctx: RunContext,
    teacher: FD2Model | Committee,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    stream: str = "relabel",
    parent: StageReporter | None = None,
) -> SoftLabels:
    """Soft labels for `images_u8` (uint8 [N,3,S,S]); reuses the file when it already exists with this protocol.

    Alone it is the `relabel` stage; with a `parent` reporter (the random baseline inside `evaluate`) it only
    keeps polling the stop flag through the parent and emits no stage events of its own.
    """
    spec = ctx.spec
    reporter = parent or ctx.tracker.stage("relabel")
    if parent is None:
        reporter.begin(1)
    if path.exists():
        existing = SoftLabels.load(path)
        if protocol_matches(existing, spec):
            if parent is None:
                reporter.log(f"{path.name} already recorded; reusing it")
                reporter.end()
            return existing
        if parent is None:
            reporter.log(f"{path.name} was recorded with another relabel protocol; recording it again")
    committee = as_committee(ctx, teacher)
    if spec.soft_label_source != "backbone" and any(m.model.cal_head is None for m in committee.members):
        raise ValueError(f"soft_label_source {spec.soft_label_source!r} needs the CAL head (method fd2, cal on)")
    images = ctx.normalize(images_u8).float()

    def on_batch(done: int, total: int) -> None:
        if parent is None:
            reporter.total = total
            reporter.step(done)
        else:
            parent.poll()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with autocast(ctx.device, ctx.amp):
            return ensemble_logits(committee, x, spec.soft_label_source)

    with relabel_members(committee, spec.relabel_bn_mode):
        tensors = record_soft_labels(
            logits_of,
            images,
            epochs=spec.relabel_epochs,
            batch_size=spec.relabel_batch_size,
            generator=generator(spec.seed, stream),
            cutmix_alpha=spec.cutmix_alpha,
            min_crop_scale=spec.min_crop_scale,
            topk=spec.topk,
            forward_splits=spec.relabel_forward_splits,
            on_batch=on_batch,
        )
    save_soft_labels(path, tensors, _metadata(ctx, images.shape[0], labels, committee))
    if parent is None:
        reporter.end()
    return SoftLabels.load(path)


def _metadata(ctx: RunContext, num_images: int, labels: torch.Tensor, committee: Committee) -> dict[str, object]:
    spec = ctx.spec
    logits = describe_logits(spec.soft_label_source, spec.relabel_bn_mode, spec.relabel_forward_splits)
    extra: dict[str, object] = {}
    if len(committee) > 1:
        logits = f"weighted mean over a committee of {len(committee)} teachers of each one's {logits}"
        extra["committee"] = [{"name": m.name, **member_fields(m)} for m in committee.members]
    return {
        "batch_size": spec.relabel_batch_size,
        "epochs": spec.relabel_epochs,
        "num_images": int(num_images),
        "num_classes": ctx.num_classes,
        "image_size": spec.image_size,
        "topk": spec.topk,
        "cutmix_alpha": spec.cutmix_alpha,
        "min_crop_scale": spec.min_crop_scale,
        "temperature": spec.eval_temperature,
        "soft_label_source": spec.soft_label_source,
        "relabel_bn_mode": spec.relabel_bn_mode,
        "forward_splits": spec.relabel_forward_splits,
        "teacher_logits": logits,
        **extra,
        "cal_ratio": spec.cal_ratio,
        "labels": labels.tolist(),
        "classes": ctx.data.classes,
        "mean": list(ctx.data.mean),
        "std": list(ctx.data.std),
    }
