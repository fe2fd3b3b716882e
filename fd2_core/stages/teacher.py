"""Teacher helpers shared by the stages: the logits a teacher stands for, accuracy, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import load_tensors, save_tensors
from ..models import FD2Model, build_model
from ..runtime import autocast, to_device
from .context import RunContext


def teacher_logits(model: FD2Model, x: torch.Tensor, cal_ratio: float) -> torch.Tensor:
    """(1−r)·backbone + r·CAL logits for a CAL teacher (the CE weighting of the spec); backbone otherwise."""
    out = model(x)
    if out.cal is None:
        return out.logits.float()
    return (1.0 - cal_ratio) * out.logits.float() + cal_ratio * out.cal.logits.float()


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    ctx: RunContext,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cal_ratio: float | None = None,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in eval mode; `cal_ratio` set = a teacher's combined logits, else plain logits."""
    if images_u8.shape[0] == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    with autocast(ctx.device, ctx.amp):
        for x, y in ctx.iterate(images_u8, labels, batch_size):
            if cal_ratio is None:
                logits = model(x).logits
            else:
                logits = teacher_logits(model, x, cal_ratio)
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return correct / images_u8.shape[0]


def new_teacher(ctx: RunContext, weights_path: Path | None = None) -> FD2Model:
    spec = ctx.spec
    model = build_model(
        spec.backbone,
        ctx.num_classes,
        spec.image_size,
        cal=spec.uses_cal,
        num_attention_maps=spec.num_attention_maps,
        width=spec.model_width,
        torchvision_weights=spec.torchvision_weights,
        weights_path=weights_path,
    )
    return to_device(model, ctx.device, channels_last=ctx.amp)


def teacher_metadata(ctx: RunContext, extra: dict[str, object] | None = None) -> dict[str, str]:
    spec = ctx.spec
    meta = {
        "format": "fd2.teacher.v1",
        "backbone": spec.backbone,
        "model_width": str(spec.model_width),
        "image_size": str(spec.image_size),
        "cal": json.dumps(spec.uses_cal),
        "num_attention_maps": str(spec.num_attention_maps),
        "cal_ratio": str(spec.cal_ratio),
        "classes": json.dumps(ctx.data.classes, ensure_ascii=False),
        "mean": json.dumps(list(ctx.data.mean)),
        "std": json.dumps(list(ctx.data.std)),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_teacher(path: Path, model: FD2Model, ctx: RunContext, extra: dict[str, object] | None = None) -> Path:
    state = {k: v for k, v in model.state_dict().items()}
    return save_tensors(path, state, metadata=teacher_metadata(ctx, extra))


def load_teacher(path: Path, ctx: RunContext) -> FD2Model:
    model = new_teacher(ctx)
    model.load_state_dict({k: v.to(ctx.device) for k, v in load_tensors(path).items()})
    model.eval()
    return model
