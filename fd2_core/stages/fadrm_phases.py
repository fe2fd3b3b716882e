"""FADRM+'s optimisation in phases, beside the torch-free schedule in `fd2_core.fadrm`.

Each phase optimises the images at its own side with a fresh Adam.
One cosine schedule runs over the steps of all phases.
At each phase start the images are resized.
They are then pulled back towards their patch initialisation (the data residual, `residual_blend`).
Each finished phase is saved, so a killed run resumes at the first unfinished phase (`phase_path`).
The steps themselves are those of the sre2l++ recipe (`fd2_core.stages.synthesis.committee_step`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import load_tensors, save_tensors
from ..fadrm import Phase, cosine_lr, input_side, phase_schedule, total_steps
from ..progress import StageReporter
from ..runtime import generator
from .committee import Committee
from .context import RunContext
from .initialisation import initial_images
from .synthesis import ADAM_BETAS, ADAM_EPS, StepModel, bn_matchers, committee_step, previous_attention, step_models


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[n,3,s,s] → [n,3,size,size], bilinear (align_corners=False), between FADRM+ phases."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def residual_blend(x: torch.Tensor, patch: torch.Tensor, alpha: float) -> torch.Tensor:
    """FADRM's data residual at a phase start: α·x + (1−α)·resize(patch), at x's side s.

    Both are [n,3,s,s]; `patch` is the images' initialisation at any side.
    Pulling back towards the real patches keeps the images close to natural image statistics.
    """
    return alpha * x + (1.0 - alpha) * resize_images(patch, x.shape[-1])


def phase_path(ctx: RunContext, index: int, classes: torch.Tensor) -> Path:
    """Checkpoint of the last finished FADRM+ phase of one (ipc index, class chunk)."""
    return ctx.stage_dir / "distill" / f"ipc_{index:03d}_c{int(classes[0]):05d}_phase.safetensors"


def run_phase(
    ctx: RunContext,
    models: list[StepModel],
    x: torch.Tensor,
    y: torch.Tensor,
    phase: Phase,
    g: torch.Generator,
    total: int,
    on_step: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None],
) -> torch.Tensor:
    """One phase from its (already resized and blended) start images; returns the images [k,3,s,s].

    It takes a fresh Adam and the steps of the phase under the run's one cosine schedule.
    """
    spec = ctx.spec
    x = x.detach().clone()
    if ctx.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=spec.distill_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    # a fresh scaler with the phase's fresh Adam
    bounds, scaler = ctx.pixel_bounds(), ctx.grad_scaler()
    for i in range(phase.steps):
        step = phase.first_step + i
        optimizer.param_groups[0]["lr"] = cosine_lr(spec.distill_lr, step, total)
        loss, parts = committee_step(
            ctx, step_models(models, step, spec.round_robin), x, y, optimizer, g, bounds, scaler
        )
        on_step(step, loss, parts)
    return x.detach().float()


def optimise_chunk_fadrm(
    ctx: RunContext,
    committee: Committee,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter: StageReporter,
    done_before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FADRM+ for one class chunk of one ipc index: (images, their initialisation), [k,3,S,S] each.

    `previous` holds the chunk's images of the earlier indices ([k,3,S,S] each, for SC).
    Phase p starts from residual_blend(resize(x, s_p), init, α).
    Phase 0 starts from the initialisation at s_0.
    Each phase is saved when finished.
    A re-run starts after the last saved phase with the same images and random draws.
    A committee's members take part per `JobSpec.round_robin` (published: one per step).
    Each member sees its own crop side and its own earlier attention maps at the phase's resolution.
    """
    spec = ctx.spec
    init = initial_images(ctx, committee.scorer, classes, index,
                          generator(spec.seed, "distill", index, int(classes[0])), reporter.poll).float()
    phases, total = phase_schedule(spec), total_steps(spec)
    path, start, x = phase_path(ctx, index, classes), 0, init
    if path.exists():
        saved = load_tensors(path)
        start, x = int(saved["phase"]) + 1, saved["images"].to(ctx.device)
        reporter.log(f"ipc index {index}, classes from {int(classes[0])}: phases 1-{start} already done; resuming")
    y = classes.to(ctx.device)

    def on_step(step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        reporter.step(done_before + step + 1, {"loss": loss, **parts})

    round_robin = spec.round_robin
    with contextlib.ExitStack() as stack:
        bns = bn_matchers(stack, committee, spec.first_bn_multiplier)
        for p in range(start, len(phases)):
            phase = phases[p]
            g = generator(spec.seed, "fadrm", index, int(classes[0]), p)
            x = residual_blend(resize_images(x, phase.size), init, spec.fadrm_alpha)
            resized = [resize_images(images, phase.size) for images in previous] if spec.uses_sc else []
            models = []
            for member, bn in zip(committee.members, bns, strict=True):
                side = input_side(member.ctx.spec.backbone, spec.image_size, phase.size)
                maps = previous_attention(ctx, member.model, resized, g, side) if spec.uses_sc else None
                weight = 1.0 if round_robin else member.weight
                models.append(StepModel(member.model, bn, maps, side, member.ctx, weight))
            x = run_phase(ctx, models, x, y, phase, g, total, on_step)
            if p < len(phases) - 1:
                save_tensors(path, {"images": x, "phase": torch.tensor(p)})
    return x.contiguous(), init.contiguous()
