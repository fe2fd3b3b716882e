"""Stage 1 — train the teacher: plain CE (base recipe) or CAL + prototypes + attention crop/drop
(FD²); with a committee, every member in turn (`fd2_core.stages.committee`).

The checkpoint is selected on a validation split carved from train (never on test), by the accuracy
of the logits that become the soft labels.
Each epoch is checkpointed, so a killed run resumes from the last finished epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import load_tensors, read_json, save_tensors, write_json
from ..attention_aug import attention_crop_drop
from ..augment import train_augment
from ..losses import center_loss
from ..models import FD2Model
from ..runtime import generator, scaled_step
from ..spec import JobSpec
from .committee import (
    Committee,
    TeacherMember,
    committee_info,
    member_context,
    member_names,
    member_weights,
    member_workdir,
    save_committee,
    scorer_context,
    scorer_workdir,
)
from .context import RunContext, stage_folder
from .teacher import accuracy, load_teacher, new_teacher, save_teacher, teacher_optimizer

TEACHER_FILE = "teacher.safetensors"
TEACHER_INFO = "teacher.json"
CHECKPOINT_FILE = "pretrain_checkpoint.safetensors"
CHECKPOINT_INFO = "pretrain_checkpoint.json"
# epochs per factor γ of the published schedule lr·γ^(epoch/2) (FD² paper presets)
LR_DECAY_EVERY = 2


@dataclass
class TeacherResult:
    model: FD2Model
    info: dict


def split_train_val(labels: torch.Tensor, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: `fraction` of every class (at least one image when
    the class has ≥ 3) goes to val."""
    if fraction <= 0:
        return torch.arange(labels.numel()), torch.empty(0, dtype=torch.long)
    order = torch.randperm(labels.numel(), generator=g)
    shuffled = labels[order]
    # rank of each shuffled sample inside its class, computed without a Python loop over classes
    sort_idx = torch.argsort(shuffled, stable=True)
    sorted_labels = shuffled[sort_idx]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(labels.numel()) - starts[sorted_labels]
    rank = torch.empty_like(rank_sorted)
    rank[sort_idx] = rank_sorted
    per_class_val = torch.floor(counts.float() * fraction).long()
    per_class_val = torch.where((per_class_val == 0) & (counts >= 3), torch.ones_like(counts), per_class_val)
    is_val = rank < per_class_val[shuffled]
    return order[~is_val].sort().values, order[is_val].sort().values


def decayed_lr(lr: float, gamma: float, epoch: int, mode: str = "continuous") -> float:
    """lr of `epoch` (0-based) under decay γ every LR_DECAY_EVERY epochs.

    continuous: lr·γ^(epoch/2) with a real exponent, as the published FD² pretraining script sets it
    each epoch; stepped: lr·γ^(epoch//2), the CAL code's StepLR(step_size=2, gamma=γ).
    Raises ValueError for another mode."""
    if mode == "continuous":
        return lr * gamma ** (epoch / LR_DECAY_EVERY)
    if mode == "stepped":
        return lr * gamma ** (epoch // LR_DECAY_EVERY)
    raise ValueError(f"unknown pretrain_lr_decay_mode {mode!r}")


def teacher_lr_at(ctx: RunContext, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The teacher's lr at (epoch, step).

    With spec.pretrain_lr_decay γ > 0 it is `decayed_lr`, constant within an epoch.
    The published setting is γ = 0.9, continuous.
    Otherwise it is the cosine lr·0.5·(1 + cos(π·t/T)) over all T steps.
    """
    spec = ctx.spec
    if spec.pretrain_lr_decay > 0:
        mode = spec.pretrain_lr_decay_mode
        return decayed_lr(spec.pretrain_lr, spec.pretrain_lr_decay, epoch, mode)
    total = spec.pretrain_epochs * steps_per_epoch
    t = epoch * steps_per_epoch + step
    return 0.5 * spec.pretrain_lr * (1.0 + math.cos(math.pi * t / max(total, 1)))


def selection_ratio(spec: JobSpec) -> float | None:
    """The CAL ratio checkpoint selection reads, or None for the backbone's own logits.

    Selection reads the logits the soft labels come from: the backbone's by default.
    When the soft labels use the CAL head it reads the combined (1−r)·backbone + r·CAL logits.
    """
    return spec.cal_ratio if spec.uses_cal and spec.soft_label_source != "backbone" else None


def cal_loss(
    model: FD2Model,
    x: torch.Tensor,
    y: torch.Tensor,
    ratio: float,
    g: torch.Generator,
    crop_drop: str = "published",
) -> tuple:
    """L = (1−r)·CE(f(x),y) + r·[CE(p,y)/3 + CE(p_eff over x+crop+drop) +
    (2/3)·CE(p over crop+drop) + center].

    `crop_drop` is spec.cal_crop_drop: "published" upsamples the attention maps for the crop/drop as
    the FD² code does (align_corners=False), "cal-code" as the CAL code does (align_corners=True).
    Returns (loss, embedding of the original batch for the prototype
    update, loss parts for progress).
    """
    out = model(x, counterfactual=True)
    assert out.cal is not None and model.cal_head is not None
    attention = out.cal.attention.detach().float()
    crops, drops = attention_crop_drop(x, attention, generator=g, align_corners=crop_drop == "cal-code")
    aug = model(torch.cat([crops, drops]), counterfactual=True)
    assert aug.cal is not None
    y2, y3 = torch.cat([y, y]), torch.cat([y, y, y])
    ce_bb = F.cross_entropy(out.logits, y)
    ce_raw = F.cross_entropy(out.cal.logits, y)
    ce_eff = F.cross_entropy(torch.cat([out.cal.effect_logits, aug.cal.effect_logits]), y3)
    ce_aug = F.cross_entropy(aug.cal.logits, y2)
    center = center_loss(out.cal.embedding.float(), y, model.cal_head.prototypes)
    cal_terms = ce_raw / 3 + ce_eff + (2.0 / 3.0) * ce_aug + center
    loss = (1.0 - ratio) * ce_bb + ratio * cal_terms
    parts = {"ce": ce_bb.detach(), "cal": cal_terms.detach(), "center": center.detach()}
    return loss, out.cal.embedding.detach().float(), parts


def _save_checkpoint(ctx, model, optimizer, best_state, info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = value if value.dim() else value.reshape(1)
    save_tensors(ctx.stage_dir / CHECKPOINT_FILE, tensors)
    write_json(ctx.stage_dir / CHECKPOINT_INFO, info)


def _load_checkpoint(ctx, model, optimizer) -> tuple[dict, dict] | None:
    path, info_path = ctx.stage_dir / CHECKPOINT_FILE, ctx.stage_dir / CHECKPOINT_INFO
    if not (path.exists() and info_path.exists()):
        return None
    info = read_json(info_path)
    tensors = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v.to(ctx.device) for k, v in tensors.items() if k.startswith("best.")}
    state = optimizer.state_dict()
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            target = state["state"].setdefault(int(idx), {})
            target[key] = value.to(ctx.device) if key != "step" else value.reshape(())
    optimizer.load_state_dict(state)
    return info, best


def pretrain_teacher(ctx: RunContext) -> TeacherResult:
    """Train (or reuse, or resume) the one teacher `ctx.spec` describes, in `ctx`'s stage folder."""
    spec, data = ctx.spec, ctx.data
    out_path, info_path = ctx.stage_dir / TEACHER_FILE, ctx.stage_dir / TEACHER_INFO
    reporter = ctx.tracker.stage("pretrain")
    if out_path.exists() and info_path.exists():
        reporter.begin(1)
        reporter.log("pretrain already finished; reusing the saved teacher")
        reporter.end()
        return TeacherResult(load_teacher(out_path, ctx), read_json(info_path))

    g_split = generator(spec.seed, "val-split")
    train_idx, val_idx = split_train_val(data.train_labels, spec.val_fraction, g_split)
    x_train, y_train = data.train_images[train_idx], data.train_labels[train_idx]
    x_val, y_val = data.train_images[val_idx], data.train_labels[val_idx]

    torch.manual_seed(spec.seed)
    model = new_teacher(ctx, weights_path=ctx.teacher_weights)
    optimizer = teacher_optimizer(ctx, [p for p in model.parameters() if p.requires_grad])
    steps_per_epoch = max(1, x_train.shape[0] // spec.pretrain_batch_size)
    reporter.begin(spec.pretrain_epochs * steps_per_epoch)

    start_epoch, best_acc, history = 0, -1.0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    resumed = _load_checkpoint(ctx, model, optimizer)
    if resumed is not None:
        info, best_state = resumed
        start_epoch, best_acc, history = info["next_epoch"], info["best_val_accuracy"], info["history"]
        reporter.log(f"resumed pretraining at epoch {start_epoch}")

    ratio = spec.cal_ratio
    scaler = ctx.grad_scaler()
    for epoch in range(start_epoch, spec.pretrain_epochs):
        g = generator(spec.seed, "pretrain", epoch)
        model.train()
        running = 0.0
        for step, (x, y) in enumerate(ctx.iterate(x_train, y_train, spec.pretrain_batch_size, g, drop_last=True)):
            for group in optimizer.param_groups:
                group["lr"] = teacher_lr_at(ctx, epoch, step, steps_per_epoch)
            x = train_augment(x, g, spec.pretrain_augment, mean=ctx.mean, std=ctx.std)
            with ctx.autocast():
                if spec.uses_cal:
                    loss, embedding, parts = cal_loss(model, x, y, ratio, g, spec.cal_crop_drop)
                else:
                    loss = F.cross_entropy(model(x).logits, y)
                    embedding, parts = None, {"ce": loss.detach()}
            optimizer.zero_grad(set_to_none=True)
            scaled_step(loss, optimizer, scaler)
            if embedding is not None:
                model.cal_head.update_prototypes(embedding, y, spec.prototype_momentum)
            running = 0.9 * running + 0.1 * loss.detach() if step else loss.detach()
            reporter.step(epoch * steps_per_epoch + step + 1, {"loss": running, **parts})
        if x_val.shape[0]:
            val_acc = accuracy(model, ctx, x_val, y_val, cal_ratio=selection_ratio(spec))
        else:
            val_acc = float("nan")
        running = float(running)
        history.append({"epoch": epoch, "loss": running, "val_accuracy": val_acc})
        if not x_val.shape[0] or val_acc >= best_acc:
            best_acc = val_acc if x_val.shape[0] else best_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reporter.log(f"epoch {epoch + 1}/{spec.pretrain_epochs}: loss {running:.3f}, val acc {val_acc:.3f}")
        _save_checkpoint(
            ctx,
            model,
            optimizer,
            best_state,
            {"next_epoch": epoch + 1, "best_val_accuracy": best_acc, "history": history},
        )

    model.load_state_dict(best_state)
    model.eval()
    ratio_or_none = ratio if spec.uses_cal else None
    info = {
        "val_accuracy": best_acc if x_val.shape[0] else None,
        "test_accuracy": accuracy(model, ctx, data.test_images, data.test_labels, cal_ratio=ratio_or_none),
        "backbone_test_accuracy": accuracy(model, ctx, data.test_images, data.test_labels),
        "train_images": int(x_train.shape[0]),
        "val_images": int(x_val.shape[0]),
        "history": history,
    }
    save_teacher(out_path, model, ctx)
    write_json(info_path, info)
    for name in (CHECKPOINT_FILE, CHECKPOINT_INFO):
        (ctx.stage_dir / name).unlink(missing_ok=True)
    reporter.end(f"teacher test accuracy {info['test_accuracy']:.3f}")
    return TeacherResult(model, info)


def pretrain_member(ctx: RunContext, index: int) -> TeacherResult:
    """Train (or reuse, or resume) member `index` of the run's teachers alone, in its own folder
    (the one teacher of a single-teacher run): one shard of `fd2_core.shards`."""
    return pretrain_teacher(member_context(ctx, index, alone=True))


def _teacher_saved(stage_dir: Path) -> bool:
    """Whether the pretraining whose stage folder is `stage_dir` is
    finished: its teacher file and info saved."""
    return (stage_dir / TEACHER_FILE).exists() and (stage_dir / TEACHER_INFO).exists()


def member_saved(workdir: Path, spec: JobSpec, index: int) -> bool:
    """Whether member `index`'s pretraining in `workdir` is finished (its
    teacher file and its info are saved)."""
    return _teacher_saved(stage_folder(member_workdir(workdir, spec, index)))


def pretrain_scorer(ctx: RunContext, alone: bool = False) -> TeacherResult:
    """Train (or reuse, or resume) the plain cross-entropy teacher that scores the patch views, in
    its own folder (`committee.scorer_context`); `alone`: as one shard of `fd2_core.shards`.
    Only for a spec that trains one (`JobSpec.trains_scorer`)."""
    return pretrain_teacher(scorer_context(ctx, alone))


def scorer_saved(workdir: Path, spec: JobSpec) -> bool:
    """Whether the scorer's pretraining in `workdir` is finished (its
    teacher file and its info are saved)."""
    return _teacher_saved(stage_folder(scorer_workdir(workdir, spec)))


def load_scorer(ctx: RunContext) -> FD2Model:
    """The saved scorer (`pretrain_scorer`), without training;
    FileNotFoundError while it is not pretrained."""
    scorer_ctx = scorer_context(ctx)
    path = scorer_ctx.stage_dir / TEACHER_FILE
    if not _teacher_saved(scorer_ctx.stage_dir):
        raise FileNotFoundError(f"the patch scorer is not pretrained yet: {path} is missing")
    return load_teacher(path, scorer_ctx)


def scorer_report(info: dict) -> dict:
    """The patch scorer's entry of the report's `teacher` block: its
    accuracies, without the epoch history."""
    return {"kind": "plain cross-entropy teacher (patch_rule published)",
            **{k: info.get(k) for k in ("test_accuracy", "val_accuracy", "train_images")}}


def load_committee(ctx: RunContext) -> Committee:
    """The run's teachers from their saved files, without training and without
    progress events, as `pretrain` returns them except for a committee's report
    entry (`info` is empty; `pretrain` measures the ensemble) and the patch scorer
    (distillation loads it itself; relabel and the students do not need it).
    Raises FileNotFoundError naming the first member whose pretraining has not finished."""
    members = []
    for i, (name, weight) in enumerate(zip(member_names(ctx), member_weights(ctx), strict=True)):
        member_ctx = member_context(ctx, i)
        path, info_path = member_ctx.stage_dir / TEACHER_FILE, member_ctx.stage_dir / TEACHER_INFO
        if not _teacher_saved(member_ctx.stage_dir):
            raise FileNotFoundError(f"teacher {name} is not pretrained yet: {path} is missing")
        members.append(TeacherMember(name, member_ctx, load_teacher(path, member_ctx), read_json(info_path), weight))
    return Committee(members, members[0].info if ctx.spec.committee is None else {})


def pretrain(ctx: RunContext) -> Committee:
    """Stage 1: every teacher of the run in order, each resumable on its
    own (a single teacher is a committee of one, trained in the run's own
    stage folder), then the patch scorer when the spec trains one.
    A committee of several also writes the combined `teacher.safetensors` (every member, keys
    prefixed) and reports the ensemble's accuracy."""
    members = []
    for i, (name, weight) in enumerate(zip(member_names(ctx), member_weights(ctx), strict=True)):
        member_ctx = member_context(ctx, i)
        result = pretrain_teacher(member_ctx)
        members.append(TeacherMember(name, member_ctx, result.model, result.info, weight))
    scorer = pretrain_scorer(ctx) if ctx.spec.trains_scorer else None
    scorer_model = scorer.model if scorer is not None else None
    info = members[0].info if ctx.spec.committee is None else committee_info(ctx, members)
    # the report says which plain teacher chose the patches, and how good it is
    if scorer is not None:
        info = {**info, "patch_scorer": scorer_report(scorer.info)}
    if ctx.spec.committee is not None:
        save_committee(ctx.stage_dir / TEACHER_FILE, ctx, members)
    return Committee(members, info, scorer_model)
