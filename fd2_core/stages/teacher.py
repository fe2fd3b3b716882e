"""Teacher helpers shared by the stages: the logits a teacher stands for, accuracy, save/load, and
the check of a teacher weights file before a run starts."""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.nn.modules.batchnorm import _BatchNorm

from ..atomic import load_tensors, save_tensors
from ..data.errors import DataError
from ..models import FD2Model, ModelOutput, build_model
from ..models.weights import ClassListMismatch, WeightsLoad, load_model_weights
from ..runtime import frozen, to_device
from ..spec import JobSpec
from .context import RunContext

SOFT_LABEL_SOURCES = ("backbone", "cal", "mixed")
BN_MODES = ("train", "eval")


def teacher_optimizer(ctx: RunContext, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The teacher recipe's optimiser over `params`: SGD with momentum, or
    AdamW (spec `pretrain_*`).

    Pretraining trains each teacher with it.
    The full-data student reuses it, since the teacher's recipe is the one
    calibrated for full real data.
    """
    spec = ctx.spec
    if spec.pretrain_optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.pretrain_lr, momentum=spec.pretrain_momentum, weight_decay=spec.pretrain_weight_decay
        )
    return torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=spec.pretrain_weight_decay)


def source_logits(out: ModelOutput, source: str, cal_ratio: float) -> torch.Tensor:
    """Logits [B, K] of one soft-label source: backbone classifier, CAL
    head, or (1−r)·backbone + r·CAL.

    The published relabel stores the backbone's and the CAL head's logits;
    the published validation trains on the backbone's.
    """
    if source == "backbone":
        return out.logits.float()
    if source not in SOFT_LABEL_SOURCES:
        raise ValueError(f"unknown soft-label source {source!r}; expected one of {SOFT_LABEL_SOURCES}")
    if out.cal is None:
        raise ValueError(f"soft-label source {source!r} needs a teacher with the CAL head")
    if source == "cal":
        return out.cal.logits.float()
    return (1.0 - cal_ratio) * out.logits.float() + cal_ratio * out.cal.logits.float()


def teacher_logits(model: FD2Model, x: torch.Tensor, cal_ratio: float) -> torch.Tensor:
    """(1−r)·backbone + r·CAL logits for a CAL teacher (the CE weighting of
    the spec); backbone otherwise."""
    out = model(x)
    return source_logits(out, "backbone" if out.cal is None else "mixed", cal_ratio)


@contextlib.contextmanager
def relabel_mode(model: torch.nn.Module, bn_mode: str) -> Iterator[torch.nn.Module]:
    """The teacher as the relabel stage runs it: gradients off, every module in eval mode, and with
    `train` the BatchNorm layers normalising with the statistics of each forwarded batch (published
    relabel, which never calls eval()).

    Only BatchNorm changes mode (dropout and the CAL head's random counterfactual stay off), and its
    running statistics are never read nor written: `track_running_stats` is off while inside, so
    running_mean, running_var and num_batches_tracked stay bit-identical.
    Everything is restored on exit.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn_mode!r}; expected one of {BN_MODES}")
    with frozen(model):
        layers = [m for m in model.modules() if isinstance(m, _BatchNorm)] if bn_mode == "train" else []
        saved = [(m.training, m.track_running_stats) for m in layers]
        for m in layers:
            m.train()
            m.track_running_stats = False
        try:
            yield model
        finally:
            for m, (training, tracking) in zip(layers, saved, strict=True):
                m.track_running_stats = tracking
                m.train(training)


@torch.no_grad()
def correctness(
    model: torch.nn.Module,
    ctx: RunContext,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cal_ratio: float | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """bool [N] on the CPU, in the order of `images_u8`: top-1 correct in eval mode; `cal_ratio` set
    = a teacher's combined logits, else plain logits."""
    was_training = model.training
    model.eval()
    hits = []
    with ctx.autocast():
        for x, y in ctx.iterate(images_u8, labels, batch_size):
            if cal_ratio is None:
                logits = model(x).logits
            else:
                logits = teacher_logits(model, x, cal_ratio)
            hits.append((logits.argmax(1) == y).cpu())
    model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(
    model: torch.nn.Module,
    ctx: RunContext,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cal_ratio: float | None = None,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in eval mode (NaN without images); see `correctness`."""
    if images_u8.shape[0] == 0:
        return float("nan")
    return int(correctness(model, ctx, images_u8, labels, cal_ratio, batch_size).sum()) / images_u8.shape[0]


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
        weights_mode=spec.teacher_weights_mode,
        classes=ctx.data.classes,
    )
    return to_device(model, ctx.device, channels_last=ctx.amp)


def check_teacher_weights(spec: JobSpec, classes: Sequence[str], path: Path) -> WeightsLoad:
    """Load `path` into a CPU teacher as `spec` and `classes` describe it,
    before any stage writes anything.

    Returns what the load did (mode, class matching, warnings).
    Raises DataError `teacher_classes_mismatch` (the file's teacher knows another set of classes;
    the message names the difference) or `bad_teacher_weights` (unreadable, or not fitting the
    spec's backbone, width, image size or mode)."""
    model = build_model(
        spec.backbone, len(classes), spec.image_size, cal=spec.uses_cal,
        num_attention_maps=spec.num_attention_maps, width=spec.model_width,
    )
    try:
        return load_model_weights(model, path, mode=spec.teacher_weights_mode, classes=classes)
    except ClassListMismatch as err:
        # the message says the fix
        raise DataError("teacher_classes_mismatch", str(err), fix="") from err
    except (ValueError, RuntimeError, OSError, SafetensorError, pickle.UnpicklingError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = "" if str(path) in detail else f" {path}"
        raise DataError("bad_teacher_weights", f"teacher weights{where} cannot be used: {detail}") from err


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
