"""A committee of teachers (README, "Teacher committees"; docs/INTERFACES.md for the artifact):
several backbones, each pretrained on its own with its own M and r, used together by distillation
(one per step or a weighted sum) and by the relabel (the weighted mean of their logits).

One teacher is a committee of one: it keeps the run's own context and work folder, so single-teacher
runs and their work folders are exactly what they were before committees. A member of a larger
committee has its own context (the spec as the member sees it, `JobSpec.member_spec`) and its own
folder `teachers/<i>-<backbone>/`, so each member's pretraining is checkpointed and resumed on its
own.

The published patch rule scores patch views with a plain cross-entropy teacher. Under FD² the
members carry the CAL head, so pretraining trains one more teacher, the scorer
(`JobSpec.trains_scorer`): the first member's backbone and pretraining settings with CAL off, in its
own folder `teachers/scorer-<backbone>/`, checkpointed and resumed like a member, and reported as
the stage's last share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import save_tensors
from ..models import FD2Model
from ..progress import UnitTracker
from ..runtime import frozen
from ..spec import JobSpec
from .context import RunContext
from .teacher import relabel_mode, source_logits, teacher_metadata

COMMITTEE_FORMAT = "fd2.teacher.committee.v1"
MEMBERS_FOLDER = "teachers"
SCORER_NAME = "scorer"


@dataclass
class TeacherMember:
    """One pretrained teacher: its name (`<i>-<backbone>`), its context (spec, folder), the model,
    what its pretraining measured, and its normalised weight
    (the weights of a committee sum to 1)."""

    name: str
    ctx: RunContext
    model: FD2Model
    info: dict[str, Any]
    weight: float = 1.0


@dataclass
class Committee:
    """The run's teachers. `model` is the first member's: it draws the preview's attention maps.
    `info` is what the report says about the teachers. `scorer_model` is the separately trained
    plain teacher that scores the patch views when the spec trains one (`JobSpec.trains_scorer`);
    None: the first member scores."""

    members: list[TeacherMember]
    info: dict[str, Any] = field(default_factory=dict)
    scorer_model: FD2Model | None = None

    @property
    def model(self) -> FD2Model:
        return self.members[0].model

    @property
    def scorer(self) -> FD2Model:
        """The model whose cross-entropy scores the patch views (patch initialisation, rded)."""
        return self.model if self.scorer_model is None else self.scorer_model

    def __len__(self) -> int:
        return len(self.members)


def _member_tracker(ctx: RunContext, index: int, count: int, name: str, alone: bool) -> UnitTracker:
    """The run's tracker as teacher `index` of `count` sees it: its share of the pretrain stage, its
    messages prefixed with its name (`alone`: one shard, the whole stage)."""
    return UnitTracker(ctx.tracker, "pretrain", 0.0 if alone else index / count, 1.0 if alone else 1 / count,
                       first=alone or index == 0, last=alone or index == count - 1,
                       prefix=f"teacher {index + 1}/{count} ({name})", begin_message="pretraining started",
                       end_message="pretraining finished")


def member_names(ctx: RunContext) -> list[str]:
    return [f"{i}-{m.backbone}" for i, m in enumerate(ctx.spec.members)]


def member_workdir(workdir: Path, spec: JobSpec, index: int) -> Path:
    """Member `index`'s work folder: the run's own for a single teacher, else
    `teachers/<i>-<backbone>/`."""
    if spec.committee is None:
        return workdir
    return workdir / MEMBERS_FOLDER / f"{index}-{spec.members[index].backbone}"


def pretrainings(spec: JobSpec) -> int:
    """Teachers the pretrain stage trains, each an equal share of its progress: the members,
    and the scorer."""
    return len(spec.members) + int(spec.trains_scorer)


def member_context(ctx: RunContext, index: int, alone: bool = False) -> RunContext:
    """Member `index`'s context: the run's own for a single teacher (with a scorer beside it, its
    pretraining reported as the first share of the stage); else the member's spec and folder, its
    pretraining reported as its share of the stage (`alone`: as the whole stage, for a shard)."""
    names, count = member_names(ctx), pretrainings(ctx.spec)
    tracker = _member_tracker(ctx, index, count, names[index], alone)
    if ctx.spec.committee is None:
        return ctx if count == 1 else dataclasses.replace(ctx, tracker=tracker)  # type: ignore[arg-type]
    return RunContext(
        spec=ctx.spec.member_spec(index),
        data=ctx.data,
        workdir=member_workdir(ctx.workdir, ctx.spec, index),
        device=ctx.device,
        tracker=tracker,  # type: ignore[arg-type]
        notes=ctx.notes,
    )


def scorer_workdir(workdir: Path, spec: JobSpec) -> Path:
    """The scorer's work folder: `teachers/scorer-<backbone>/` (the first member's backbone)."""
    return workdir / MEMBERS_FOLDER / f"{SCORER_NAME}-{spec.members[0].backbone}"


def scorer_spec(spec: JobSpec) -> JobSpec:
    """The spec the scorer is pretrained with: the first member's (backbone, width, pretraining
    settings, seed) with CAL, FC and SC off, so it trains with plain cross-entropy as an SRe²L++
    teacher does."""
    return spec.member_spec(0).model_copy(update={"cal": False, "fc": False, "sc": False})


def scorer_context(ctx: RunContext, alone: bool = False) -> RunContext:
    """The scorer's context: its spec and folder, the run's teacher weights file (loaded as the
    teachers load it; a CAL head in it is left out), its pretraining reported as the stage's last
    share (`alone`: as the whole stage, for a shard)."""
    count = pretrainings(ctx.spec)
    return RunContext(
        spec=scorer_spec(ctx.spec),
        data=ctx.data,
        workdir=scorer_workdir(ctx.workdir, ctx.spec),
        device=ctx.device,
        tracker=_member_tracker(ctx, count - 1, count, SCORER_NAME, alone),  # type: ignore[arg-type]
        teacher_weights=ctx.teacher_weights,
        notes=ctx.notes,
    )


def member_weights(ctx: RunContext) -> list[float]:
    """The members' weights normalised to sum 1."""
    raw = [m.weight for m in ctx.spec.members]
    return [w / sum(raw) for w in raw]


def as_committee(ctx: RunContext, teacher: FD2Model | Committee) -> Committee:
    """A committee as it is; a single model as a committee of one with the run's context."""
    if isinstance(teacher, Committee):
        return teacher
    return Committee([TeacherMember("0-" + ctx.spec.backbone, ctx, teacher, {}, 1.0)])


@contextlib.contextmanager
def frozen_members(committee: Committee) -> Iterator[Committee]:
    """Every member frozen (eval mode, no parameter gradients) for the duration,
    as `runtime.frozen` does."""
    with contextlib.ExitStack() as stack:
        for member in committee.members:
            stack.enter_context(frozen(member.model))
        yield committee


@contextlib.contextmanager
def relabel_members(committee: Committee, bn_mode: str) -> Iterator[Committee]:
    """Every member in the relabel's mode (`teacher.relabel_mode`),
    each one's running statistics untouched."""
    with contextlib.ExitStack() as stack:
        for member in committee.members:
            stack.enter_context(relabel_mode(member.model, bn_mode))
        yield committee


def ensemble_logits(committee: Committee, x: torch.Tensor, source: str) -> torch.Tensor:
    """Σ_m w_m · logits_m(x) [B, K] float32: each member's logits of `source` (its own r for
    `mixed`), weighted by its normalised weight. A committee of one gives that member's logits
    unchanged."""
    if len(committee) == 1:
        member = committee.members[0]
        return source_logits(member.model(x), source, member.ctx.spec.cal_ratio)
    total: torch.Tensor | None = None
    for member in committee.members:
        logits = member.weight * source_logits(member.model(x), source, member.ctx.spec.cal_ratio)
        total = logits if total is None else total + logits
    assert total is not None
    return total


@torch.no_grad()
def _ensemble_accuracy(ctx: RunContext, committee: Committee, images_u8: torch.Tensor, labels: torch.Tensor,
                       source_of: Any) -> float | None:
    if images_u8.shape[0] == 0:
        return None
    hits = 0
    with frozen_members(committee), ctx.autocast():
        for x, y in ctx.iterate(images_u8, labels, 256):
            total = sum(m.weight * source_logits(m.model(x), source_of(m), m.ctx.spec.cal_ratio)
                        for m in committee.members)
            hits += int((total.argmax(1) == y).sum())
    return hits / images_u8.shape[0]


def committee_info(ctx: RunContext, members: Sequence[TeacherMember]) -> dict[str, Any]:
    """The report's teacher entry for a committee: the ensemble's test accuracy (each member's own
    logits as its single-teacher `test_accuracy` reads them, and the backbones' alone, what the soft
    labels hold by default), the members' mean validation accuracy, and every member's own
    figures."""
    committee = Committee(list(members))
    data = ctx.data

    def own(member: TeacherMember) -> str:
        return "mixed" if member.model.cal_head is not None else "backbone"

    vals = [m.info.get("val_accuracy") for m in members]
    vals = [v for v in vals if v is not None]
    return {
        "test_accuracy": _ensemble_accuracy(ctx, committee, data.test_images, data.test_labels, own),
        "backbone_test_accuracy": _ensemble_accuracy(
            ctx, committee, data.test_images, data.test_labels, lambda m: "backbone"
        ),
        "val_accuracy": sum(vals) / len(vals) if vals else None,
        "members": [
            {"name": m.name, **member_fields(m), "test_accuracy": m.info.get("test_accuracy"),
             "backbone_test_accuracy": m.info.get("backbone_test_accuracy"),
             "val_accuracy": m.info.get("val_accuracy")}
            for m in members
        ],
    }


def member_fields(member: TeacherMember) -> dict[str, Any]:
    spec = member.ctx.spec
    return {
        "backbone": spec.backbone,
        "model_width": spec.model_width,
        "cal": spec.uses_cal,
        "num_attention_maps": spec.num_attention_maps,
        "cal_ratio": spec.cal_ratio,
        "weight": member.weight,
    }


def member_prefix(index: int) -> str:
    return f"members.{index}."


def save_committee(path: Path, ctx: RunContext, members: Sequence[TeacherMember]) -> Path:
    """The committee's teacher artifact: every member's state dict under `members.<i>.`, and in the
    metadata `members` (name, prefix, backbone, width, cal, M, r, weight of each, in order) beside
    the run's classes, normalisation and image size (docs/INTERFACES.md, teacher.safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    listed = []
    for i, member in enumerate(members):
        prefix = member_prefix(i)
        tensors.update({prefix + k: v for k, v in member.model.state_dict().items()})
        listed.append({"name": member.name, "prefix": prefix, **member_fields(member)})
    meta = teacher_metadata(ctx, {"members": json.dumps(listed), "committee_mode": ctx.spec.committee_mode})
    # per member, in `members`
    for single in ("model_width", "num_attention_maps", "cal_ratio", "cal"):
        meta.pop(single)
    meta.update(format=COMMITTEE_FORMAT, backbone=",".join(m.ctx.spec.backbone for m in members))
    return save_tensors(path, tensors, metadata=meta)


__all__ = [
    "COMMITTEE_FORMAT",
    "Committee",
    "TeacherMember",
    "as_committee",
    "committee_info",
    "ensemble_logits",
    "frozen_members",
    "member_context",
    "member_workdir",
    "member_prefix",
    "member_names",
    "member_weights",
    "pretrainings",
    "relabel_members",
    "save_committee",
    "scorer_context",
    "scorer_spec",
    "scorer_workdir",
]
