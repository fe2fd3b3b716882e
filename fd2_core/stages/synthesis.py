"""Image synthesis: the optimisation of synthetic images against frozen teachers.

It is SRe²L++'s recipe with FD²'s loss terms.

Loss per teacher (FD² paper): r·CE_cal + (1−r)·CE_bb + r_bn·BN + λ_FC·L_FC + λ_SC·L_SC.
FC and SC are switched by the spec (`fd2_core.losses.distillation_loss`).
One step augments the batch, sums its models' losses and moves the pixels by one Adam step.
A committee takes part one member per step (round robin) or all members with their weights.
`optimise_chunk` runs the sre2l++ recipe for one class block of one ipc index.
The FADRM+ recipe runs the same steps in phases (`fd2_core.stages.fadrm_phases`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..augment import apply_crop_flip, random_roll, sample_crop_flip
from ..losses import BNStatMatcher, distillation_loss
from ..models import FD2Model
from ..progress import StageReporter
from ..runtime import generator, scaled_step
from .committee import Committee
from .context import RunContext
from .initialisation import initial_images

# Adam on the pixels with the published SRe²L synthesis setting.
# SRe²L++ and the FD² paper keep it.
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-8


def _crop(
    ctx: RunContext, x: torch.Tensor, g: torch.Generator, side: int | None, per_image: bool
) -> torch.Tensor:
    """RandomResizedCrop (area min_crop_scale–1) + flip of [n,3,s,s] images to `side` (or s)."""
    params = sample_crop_flip(x.shape[0], x.shape[-1], g, scale=(ctx.spec.min_crop_scale, 1.0), per_image=per_image)
    return apply_crop_flip(x, params, side)


def distill_augment(ctx: RunContext, x: torch.Tensor, g: torch.Generator, side: int | None = None) -> torch.Tensor:
    """The distill step's augmentation: crop + flip to `side` (default: x's own), then one roll.

    Under `distill_crop: batch` the whole batch gets one box and one flip.
    That is the published way: one torchvision transform on the 4-D batch.
    Under `image` each image gets its own box and flip.
    The roll moves the batch by randint(0, J) pixels per axis.
    """
    x = _crop(ctx, x, g, side, per_image=ctx.spec.distill_crop == "image")
    return random_roll(x, ctx.spec.jitter, g)


@torch.no_grad()
def previous_attention(
    ctx: RunContext,
    teacher: FD2Model,
    previous: list[torch.Tensor],
    g: torch.Generator,
    side: int | None = None,
) -> torch.Tensor | None:
    """Attention maps [J, B, M, H, W] of the block's distilled images 0…j−1, each [B,3,s,s].

    They are computed once per index j.
    Under FADRM+ they are computed once per phase.
    Then the images are at the phase's side and the crop at the teacher's `side`.
    As published, each reference image gets its own crop and flip and no roll.
    This holds whatever `distill_crop` says.
    """
    if not previous:
        return None
    maps = []
    with ctx.autocast():
        for images in previous:
            out = teacher(_crop(ctx, images.to(ctx.device), g, side, per_image=True))
            maps.append(out.cal.attention.float())
    return torch.stack(maps)


def distill_loss(
    ctx: RunContext,
    teacher: FD2Model,
    x: torch.Tensor,
    y: torch.Tensor,
    prev_maps: torch.Tensor | None,
    bn: BNStatMatcher,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One teacher's total loss on an augmented synthetic batch, and its detached parts.

    The BN hooks are already registered in `bn`.
    The loss is `distillation_loss` with the spec's weights and switches.
    """
    spec = ctx.spec
    with ctx.autocast():
        out = teacher(x)
    terms = distillation_loss(
        out.logits,
        out.cal,
        y,
        bn,
        cal_ratio=spec.cal_ratio,
        r_bn=spec.r_bn,
        lambda_fc=spec.lambda_fc,
        fc_rho=spec.fc_rho,
        lambda_sc=spec.lambda_sc,
        sc_tau=spec.sc_tau,
        prototypes=teacher.cal_head.prototypes if spec.uses_fc and out.cal is not None else None,
        normalize_prototypes=spec.fc_prototypes == "normalized",
        previous_attention=prev_maps if spec.uses_sc else None,
    )
    return terms.total, terms.parts()


class StepModel(NamedTuple):
    """A model a distillation step uses, with what belongs to it in the phase.

    `bn`: its BN-matching hooks.
    `previous_attention`: the attention maps of the earlier ipc indices ([J,B,M,h,w] or None).
    `input_side`: the crop side it sees (None: the images' own).
    `ctx`: its member context (None: the run's).
    `weight`: its weight in a weighted-sum step.
    A committee is a list of them.
    """

    teacher: FD2Model
    bn: BNStatMatcher
    previous_attention: torch.Tensor | None
    input_side: int | None
    ctx: RunContext | None = None
    weight: float = 1.0


def step_model(models: list[StepModel], step: int) -> StepModel:
    """The model of global step `step`: round robin over `models` (one teacher is a list of one)."""
    return models[step % len(models)]


def step_models(models: list[StepModel], step: int, round_robin: bool) -> list[StepModel]:
    """The models of global step `step`: one in turn (round robin) or all of them (weighted sum)."""
    return [step_model(models, step)] if round_robin else models


def committee_step(
    ctx: RunContext,
    models: Sequence[StepModel],
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    g: torch.Generator,
    bounds: tuple[torch.Tensor, torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One iteration with the step's models: Σ_m w_m · loss_m.

    A single teacher or a round-robin step is one model of weight 1.
    Each member's loss uses its own spec (r, prototypes, BN hooks, earlier attention maps).
    The batch is augmented once per input side.
    So members that see the same side see the same crops.
    Then the loss goes backward to the images and Adam takes a step.
    Under float16 autocast the step goes through `scaler`.
    Last, the pixels are clamped to valid values.
    """
    crops: dict[int | None, torch.Tensor] = {}
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    for model in models:
        if model.input_side not in crops:
            crops[model.input_side] = distill_augment(ctx, x, g, model.input_side)
        loss, own = distill_loss(
            model.ctx or ctx, model.teacher, crops[model.input_side], y, model.previous_attention, model.bn
        )
        if model.weight != 1.0:
            loss, own = model.weight * loss, {k: model.weight * v for k, v in own.items()}
        total = loss if total is None else total + loss
        parts = own if not parts else {k: parts[k] + v if k in parts else v for k, v in own.items()}
    assert total is not None
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        optimizer.step()
    else:
        scaled_step(total, optimizer, scaler)
    with torch.no_grad():
        x.data = torch.max(torch.min(x.data, bounds[1]), bounds[0])
    return total.detach(), parts


def distill_step(
    ctx: RunContext,
    teacher: FD2Model,
    x: torch.Tensor,
    y: torch.Tensor,
    prev_maps: torch.Tensor | None,
    bn: BNStatMatcher,
    optimizer: torch.optim.Optimizer,
    g: torch.Generator,
    bounds: tuple[torch.Tensor, torch.Tensor],
    side: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One full iteration of one teacher (`committee_step` with that teacher alone).

    It augments (crop to `side`, default x's), computes all losses, goes backward to the images,
    takes an Adam step and clamps to valid pixels.
    """
    return committee_step(ctx, [StepModel(teacher, bn, prev_maps, side)], x, y, optimizer, g, bounds)


def bn_matchers(stack: contextlib.ExitStack, committee: Committee, multiplier: float) -> list[BNStatMatcher]:
    """A BN-matching hook set per member, all removed when `stack` closes."""
    return [stack.enter_context(BNStatMatcher(m.model.bn_layers(), multiplier)) for m in committee.members]


def optimise_chunk(
    ctx: RunContext,
    committee: Committee,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter: StageReporter,
    done_before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distil one class chunk of one ipc index with the sre2l++ recipe.

    Returns (images, their initialisation), both [k,3,S,S].
    `previous` holds the chunk's images of the earlier indices ([k,3,S,S] each, for SC).
    A committee's members take part per `JobSpec.round_robin`.
    """
    spec = ctx.spec
    g = generator(spec.seed, "distill", index, int(classes[0]))
    init = initial_images(ctx, committee.scorer, classes, index, g, reporter.poll).float()
    x = init.clone()
    if ctx.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = classes.to(ctx.device)
    prev_maps = [previous_attention(ctx, m.model, previous, g) if spec.uses_sc else None
                 for m in committee.members]
    optimizer = torch.optim.Adam([x], lr=spec.distill_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    bounds = ctx.pixel_bounds()
    iters = spec.distill_iterations
    round_robin, scaler = spec.round_robin, ctx.grad_scaler()
    with contextlib.ExitStack() as stack:
        bns = bn_matchers(stack, committee, spec.first_bn_multiplier)
        models = [StepModel(m.model, bn, maps, None, m.ctx, 1.0 if round_robin else m.weight)
                  for m, bn, maps in zip(committee.members, bns, prev_maps, strict=True)]
        for it in range(iters):
            optimizer.param_groups[0]["lr"] = 0.5 * spec.distill_lr * (1.0 + math.cos(math.pi * it / iters))
            loss, parts = committee_step(ctx, step_models(models, it, round_robin), x, y, optimizer, g, bounds,
                                         scaler)
            reporter.step(done_before + it + 1, {"loss": loss, **parts})
    return x.detach().float().contiguous(), init.contiguous()
