"""Stage 2 — optimise synthetic images against the frozen teacher, one ipc index at a time.

Loss per teacher (FD² paper): r·CE_cal + (1−r)·CE_bb + r_bn·BN + λ_FC·L_FC + λ_SC·L_SC, where FC and SC
are switched by the spec (`fd2_core.losses.distillation_loss`). Images start from the patch initialisation
(`fd2_core.stages.patches`: real views scored by the scorer's CE, stitched factor×factor) or from noise. Every
finished ipc index is saved atomically with its initialisation and skipped on a re-run, so a killed run resumes
at the first missing index.
Two methods select instead of optimising: `rded` keeps the patch initialisation as it is (RDED: no teacher
gradient step on the images), `random` takes random real images. The `fadrm+` recipe (alone or under FD²)
optimises in phases of their own image side (`fd2_core.fadrm`), with a data residual to the patch
initialisation and a fresh Adam at each phase start; each finished phase is saved too, so a killed run resumes
at the first unfinished phase.

Classes are optimised in blocks of `distill_batch_classes` (`class_blocks`), and one block's work (every ipc index
in order, its patch selection, its random streams, the earlier indices SC reads) never reads another block's. So
a block can also run alone (`distill_block`, one shard of `fd2_core.shards`), saving each index of it as
`ipc_JJJ_cKKKKK.safetensors`; `merge_blocks` then writes every `ipc_JJJ.safetensors` exactly as `distill` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..atomic import load_tensors, save_tensors
from ..augment import apply_crop_flip, random_roll, sample_crop_flip
from ..fadrm import Phase, cosine_lr, input_side, phase_schedule, total_steps
from ..losses import BNStatMatcher, distillation_loss
from ..models import FD2Model
from ..runtime import frozen, generator, scaled_step
from ..spec import JobSpec
from ..stored_images import stored_pixels
from .committee import Committee, as_committee, frozen_members
from .context import RunContext
from .patches import patch_init, patch_wrap_note, random_real_indices
from .pretrain import load_scorer

# Adam on the pixels with the published SRe²L synthesis setting, which SRe²L++ and the FD² paper keep
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-8


def ipc_file(stage_dir: Path, index: int) -> Path:
    """Ipc index `index` of every class: `images` [K,3,S,S], `labels` [K], `init` for the optimising methods."""
    return stage_dir / "distill" / f"ipc_{index:03d}.safetensors"


def block_file(stage_dir: Path, index: int, first_class: int) -> Path:
    """Ipc index `index` of the class block from `first_class` as a block shard saves it: `images` (and `init`)
    [k,3,S,S]."""
    return stage_dir / "distill" / f"ipc_{index:03d}_c{first_class:05d}.safetensors"


def ipc_path(ctx: RunContext, index: int) -> Path:
    return ipc_file(ctx.stage_dir, index)


def block_path(ctx: RunContext, index: int, classes: torch.Tensor) -> Path:
    return block_file(ctx.stage_dir, index, int(classes[0]))


def block_starts(num_classes: int, batch_classes: int) -> list[int]:
    """First class of every block of `batch_classes` classes (0 = all classes, one block)."""
    return list(range(0, num_classes, batch_classes or num_classes))


def class_blocks(ctx: RunContext) -> list[torch.Tensor]:
    """The class blocks optimised together, [k] class indices each, in order: `distill_batch_classes` classes
    per block, the last one shorter."""
    k = ctx.num_classes
    size = ctx.spec.distill_batch_classes or k
    return [torch.arange(s, min(s + size, k)) for s in block_starts(k, size)]


def _crop(
    ctx: RunContext, x: torch.Tensor, g: torch.Generator, side: int | None, per_image: bool
) -> torch.Tensor:
    """RandomResizedCrop (scale min_crop_scale–1) + flip of [n,3,s,s] images to `side` (default: s)."""
    params = sample_crop_flip(x.shape[0], x.shape[-1], g, scale=(ctx.spec.min_crop_scale, 1.0), per_image=per_image)
    return apply_crop_flip(x, params, side)


def _augment(ctx: RunContext, x: torch.Tensor, g: torch.Generator, side: int | None = None) -> torch.Tensor:
    """The distill step's augmentation: crop + flip to `side` (default: x's own) — one box and one flip for the
    whole batch under `distill_crop: batch` (published: one torchvision transform on the 4-D batch), one per image
    under `image` — then one roll of randint(0, J) pixels per axis for the batch."""
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
    """Attention maps [J, B, M, H, W] of the block's already distilled images 0…j−1 (each [B,3,s,s]), once per
    index j (FADRM+: once per phase, the images at the phase's side and the crop at the teacher's `side`).

    As published, each reference image gets its own crop and flip and no roll, whatever `distill_crop` says.
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
    """One teacher's total loss on an augmented synthetic batch and its detached parts (hooks already registered
    in `bn`): `distillation_loss` with the spec's weights and switches."""
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
    """One iteration with the step's models: Σ_m w_m · loss_m (one model of weight 1 for a single teacher or a
    round-robin step), each member's loss with its own spec (r, prototypes, BN hooks, earlier attention maps).

    The batch is augmented once per input side, so members that see the same side see the same crops; then
    backward to the images, an Adam step (through `scaler` when given: float16 autocast), and the clamp to valid
    pixels.
    """
    crops: dict[int | None, torch.Tensor] = {}
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    for model in models:
        if model.input_side not in crops:
            crops[model.input_side] = _augment(ctx, x, g, model.input_side)
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
    """One full iteration of one teacher: augment (crop to `side`, default x's), all losses, backward to the
    images, Adam step, clamp to valid pixels (`committee_step` with that teacher alone)."""
    return committee_step(ctx, [StepModel(teacher, bn, prev_maps, side)], x, y, optimizer, g, bounds)


def initial_images(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    index: int,
    g: torch.Generator,
    poll: Callable[[], None] | None = None,
) -> torch.Tensor:
    """[k,3,S,S] starting images in normalised space: real patches scored by `teacher`, the patch scorer
    (`Committee.scorer`, `fd2_core.stages.patches`), or N(0, 1) noise."""
    if ctx.spec.init == "patches":
        return patch_init(ctx, teacher, classes, index, poll)
    size = ctx.spec.image_size
    return torch.randn(len(classes), 3, size, size, generator=g).to(ctx.device)


def step_models(models: list[StepModel], step: int, round_robin: bool) -> list[StepModel]:
    """The models of global step `step`: one in turn (round robin) or all of them (weighted sum)."""
    return [step_model(models, step)] if round_robin else models


def _bn_matchers(stack: contextlib.ExitStack, committee: Committee, multiplier: float) -> list[BNStatMatcher]:
    """A BN-matching hook set per member, all removed when `stack` closes."""
    return [stack.enter_context(BNStatMatcher(m.model.bn_layers(), multiplier)) for m in committee.members]


def optimise_chunk(
    ctx: RunContext,
    committee: Committee,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter,
    done_before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distil one class chunk of one ipc index with the sre2l++ recipe; returns (images, their initialisation),
    both [k,3,S,S]. `previous` holds the chunk's images of the earlier indices ([k,3,S,S] each, for SC). A
    committee's members take part per `JobSpec.round_robin`."""
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
        bns = _bn_matchers(stack, committee, spec.first_bn_multiplier)
        models = [StepModel(m.model, bn, maps, None, m.ctx, 1.0 if round_robin else m.weight)
                  for m, bn, maps in zip(committee.members, bns, prev_maps, strict=True)]
        for it in range(iters):
            optimizer.param_groups[0]["lr"] = 0.5 * spec.distill_lr * (1.0 + math.cos(math.pi * it / iters))
            loss, parts = committee_step(ctx, step_models(models, it, round_robin), x, y, optimizer, g, bounds,
                                         scaler)
            reporter.step(done_before + it + 1, {"loss": loss, **parts})
    return x.detach().float().contiguous(), init.contiguous()


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[n,3,s,s] → [n,3,size,size], bilinear (align_corners=False): FADRM+'s resize between phases."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def residual_blend(x: torch.Tensor, patch: torch.Tensor, alpha: float) -> torch.Tensor:
    """FADRM's data residual at a phase start: α·x + (1−α)·resize(patch), both [n,3,s,s] at x's side s.

    `patch` is the images' initialisation at any side; pulling back towards the real patches keeps the
    optimised images from drifting away from natural image statistics over the phases.
    """
    return alpha * x + (1.0 - alpha) * resize_images(patch, x.shape[-1])


class StepModel(NamedTuple):
    """A model a distillation step uses, with what belongs to it in the phase: its BN-matching hooks, the
    attention maps of the earlier ipc indices ([J,B,M,h,w] or None), the crop side it sees (None: the images'
    own), its member context (None: the run's) and its weight in a weighted-sum step. A committee is a list."""

    teacher: FD2Model
    bn: BNStatMatcher
    previous_attention: torch.Tensor | None
    input_side: int | None
    ctx: RunContext | None = None
    weight: float = 1.0


def step_model(models: list[StepModel], step: int) -> StepModel:
    """The model of global step `step`: round robin over `models` (a single teacher is a list of one)."""
    return models[step % len(models)]


def phase_path(ctx: RunContext, index: int, classes: torch.Tensor):
    """Checkpoint of the last finished FADRM+ phase of one (ipc index, class chunk)."""
    return ctx.stage_dir / "distill" / f"ipc_{index:03d}_c{int(classes[0]):05d}_phase.safetensors"


def _run_phase(
    ctx: RunContext,
    models: list[StepModel],
    x: torch.Tensor,
    y: torch.Tensor,
    phase: Phase,
    g: torch.Generator,
    total: int,
    on_step: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None],
) -> torch.Tensor:
    """One phase from its (already resized and blended) start images: a fresh Adam, the steps of the phase
    under the run's one cosine schedule; returns the images [k,3,s,s]."""
    spec = ctx.spec
    x = x.detach().clone()
    if ctx.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=spec.distill_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    bounds, scaler = ctx.pixel_bounds(), ctx.grad_scaler()  # a fresh scaler with the phase's fresh Adam
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
    reporter,
    done_before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FADRM+ for one class chunk of one ipc index; returns (images, their initialisation), both [k,3,S,S];
    `previous` holds the chunk's images of the earlier indices ([k,3,S,S] each, for SC).

    Phase p starts from residual_blend(resize(x, s_p), init, α) (phase 0: the initialisation at s_0) and is
    saved when finished; a re-run starts after the last saved phase with the same images and random draws.
    A committee's members take part per `JobSpec.round_robin` (published: one per step), each at its own crop
    side with its own earlier attention maps at the phase's resolution.
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
        bns = _bn_matchers(stack, committee, spec.first_bn_multiplier)
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
            x = _run_phase(ctx, models, x, y, phase, g, total, on_step)
            if p < len(phases) - 1:
                save_tensors(path, {"images": x, "phase": torch.tensor(p)})
    return x.contiguous(), init.contiguous()


def select_random(ctx: RunContext, index: int, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The `random` method: real train images instead of optimised ones, same count per class; [k,3,S,S] for
    `classes` (default all)."""
    pick = random_real_indices(ctx, ctx.spec.ipc, "random-subset")[index]
    return ctx.normalize(ctx.data.train_images[pick if classes is None else pick[classes]]).float()


def select_rded(
    ctx: RunContext,
    teacher: FD2Model,
    index: int,
    poll: Callable[[], None] | None = None,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `rded` method: ipc index `index` is its patch initialisation, kept as it is (no optimisation step);
    [k,3,S,S] in normalised space for `classes` (a class block; default every block): with the same seed, the
    images sre2l++ (the same plain teacher) starts from."""
    blocks = class_blocks(ctx) if classes is None else [classes]
    with frozen(teacher):
        return torch.cat([patch_init(ctx, teacher, block, index, poll) for block in blocks])


def distill_block_index(
    ctx: RunContext,
    committee: Committee | None,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter,
    done_before: int,
) -> dict[str, torch.Tensor]:
    """Ipc index `index` of one class block, the one unit both `distill` and `distill_block` run: `images`
    [k,3,S,S] in normalised space, and `init` for the optimising methods (`rded` is its own initialisation,
    `random` has none). `previous` holds the block's images of the earlier indices; `committee` is None only
    for `random`."""
    spec = ctx.spec
    if spec.method == "random":
        return {"images": select_random(ctx, index, classes)}
    assert committee is not None
    if spec.method == "rded":
        return store_index(ctx, {"images": select_rded(ctx, committee.scorer, index, reporter.poll, classes)})
    optimise = optimise_chunk_fadrm if spec.recipe == "fadrm+" else optimise_chunk
    with frozen_members(committee):
        images, init = optimise(ctx, committee, classes, index, previous, reporter, done_before)
    return store_index(ctx, {"images": images, "init": init})


def store_index(ctx: RunContext, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A finished index as stored (`synthetic_format`): under `jpeg` its `images` [k,3,S,S] become the decoded
    JPEG 75 pixels of their uint8 truncation (published: SC's references, relabel and the students read the
    JPEGs), and the optimised floats stay as `raw` for the drift metrics; under `png` nothing changes here (the
    floats are rounded once, at export). Real images (`random`) are never re-encoded."""
    if ctx.spec.synthetic_format != "jpeg":
        return tensors
    raw = tensors["images"]
    stored = {**tensors, "images": ctx.normalize(stored_pixels(ctx.denormalize(raw.float()), "jpeg")).float()}
    return {**stored, "raw": raw} if "init" in tensors else stored  # rded: its images are its start, no drift


def chunk_steps(spec: JobSpec) -> int:
    """Optimisation steps of one class chunk of one ipc index: all FADRM+ phases, else distill_iterations."""
    return total_steps(spec) if spec.recipe == "fadrm+" else spec.distill_iterations


def _index_tensors(ctx: RunContext, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ipc index of every class from its blocks, in class order: `labels`, `images`, and `init` / `raw`
    when every block has one."""
    tensors = {"labels": torch.arange(ctx.num_classes), "images": torch.cat([b["images"] for b in blocks])}
    for key in ("init", "raw"):
        if all(key in b for b in blocks):
            tensors[key] = torch.cat([b[key] for b in blocks])
    return tensors


def _save_index(ctx: RunContext, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Save ipc index `index` and drop what it supersedes: its block files and FADRM+ phase checkpoints."""
    path = save_tensors(ipc_path(ctx, index), tensors, {"ipc_index": str(index)})
    for superseded in path.parent.glob(f"ipc_{index:03d}_c*.safetensors"):
        superseded.unlink(missing_ok=True)
    return path


def _log_wrap_note(ctx: RunContext, reporter) -> None:
    note = patch_wrap_note(ctx) if ctx.spec.scores_patches else None
    if note:
        reporter.log(note)


def _loaded(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in load_tensors(path).items()}


def _with_scorer(ctx: RunContext, committee: Committee) -> Committee:
    """The committee with the plain patch scorer the spec trains (`JobSpec.trains_scorer`): a caller that passes
    a bare teacher, or teachers loaded without the scorer, still selects patches with the scorer, never silently
    with the CAL teacher. Raises FileNotFoundError while the scorer is not pretrained."""
    if not ctx.spec.trains_scorer or committee.scorer_model is not None:
        return committee
    return dataclasses.replace(committee, scorer_model=load_scorer(ctx))


def distill(ctx: RunContext, teacher: FD2Model | Committee | None) -> torch.Tensor:
    """Returns synthetic images [ipc, K, 3, S, S] in normalised space (also saved per ipc index, with `init`).

    `teacher` is one model or a committee (`fd2_core.stages.committee`); None only for `random`. Ipc index j runs
    its class blocks in order (`distill_block_index`); a block a block shard already saved is reused.
    """
    spec = ctx.spec
    committee = _with_scorer(ctx, as_committee(ctx, teacher)) if teacher is not None else None
    reporter = ctx.tracker.stage("distill")
    blocks = class_blocks(ctx)
    per_block = chunk_steps(spec) if spec.optimises_images else 0
    reporter.begin(spec.ipc * per_block * len(blocks) if spec.optimises_images else spec.ipc)
    _log_wrap_note(ctx, reporter)
    done: list[torch.Tensor] = []
    for j in range(spec.ipc):
        path = ipc_path(ctx, j)
        if path.exists():
            done.append(load_tensors(path)["images"].to(ctx.device))
            reporter.log(f"ipc index {j} already distilled; reusing it", fraction=(j + 1) / spec.ipc)
            continue
        parts = []
        for c, classes in enumerate(blocks):
            saved = block_path(ctx, j, classes)
            if saved.exists():
                parts.append(_loaded(saved, ctx.device))
                continue
            before = (j * len(blocks) + c) * per_block
            previous = [images[classes] for images in done]
            parts.append(distill_block_index(ctx, committee, classes, j, previous, reporter, before))
        tensors = _index_tensors(ctx, parts)
        _save_index(ctx, j, tensors)
        done.append(tensors["images"])
        reporter.log(f"ipc index {j + 1}/{spec.ipc} distilled", fraction=(j + 1) / spec.ipc)
    reporter.end()
    return torch.stack(done)


def _saved_block(ctx: RunContext, index: int, classes: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Ipc index `index` of a block if it is saved: sliced from the merged ipc file, else its block file."""
    merged = ipc_path(ctx, index)
    if merged.exists():
        return {k: v[classes] for k, v in load_tensors(merged).items() if k != "labels"}
    own = block_path(ctx, index, classes)
    return load_tensors(own) if own.exists() else None


def block_done(stage_dir: Path, ipc: int, first_class: int) -> bool:
    """Whether every ipc index of the block from `first_class` is saved (in its block file or already merged)."""
    return all(ipc_file(stage_dir, j).exists() or block_file(stage_dir, j, first_class).exists() for j in range(ipc))


def distill_block(ctx: RunContext, teacher: FD2Model | Committee | None, classes: torch.Tensor) -> list[Path]:
    """Stage 2 for one class block alone: every ipc index in order, each saved atomically as its block file
    (`block_path`; a saved or merged index is reused, an FADRM+ phase checkpoint resumed). Returns the block
    files. The images equal the block's rows of what `distill` writes: both run `distill_block_index` with the
    same streams and the block's own earlier images."""
    spec = ctx.spec
    committee = _with_scorer(ctx, as_committee(ctx, teacher)) if teacher is not None else None
    reporter = ctx.tracker.stage("distill")
    per_block = chunk_steps(spec) if spec.optimises_images else 0
    reporter.begin(spec.ipc * per_block if spec.optimises_images else spec.ipc)
    _log_wrap_note(ctx, reporter)
    first, last = int(classes[0]), int(classes[-1])
    previous: list[torch.Tensor] = []
    for j in range(spec.ipc):
        saved = _saved_block(ctx, j, classes)
        if saved is None:
            saved = distill_block_index(ctx, committee, classes, j, previous, reporter, j * per_block)
            save_tensors(block_path(ctx, j, classes), saved, {"ipc_index": str(j), "first_class": str(first),
                                                              "num_classes": str(len(classes))})
            phase_path(ctx, j, classes).unlink(missing_ok=True)
            reporter.log(f"ipc index {j + 1}/{spec.ipc} of classes {first}-{last} distilled",
                         fraction=(j + 1) / spec.ipc)
        else:
            reporter.log(f"ipc index {j} of classes {first}-{last} already distilled; reusing it",
                         fraction=(j + 1) / spec.ipc)
        previous.append(saved["images"].to(ctx.device))
    reporter.end()
    return [block_path(ctx, j, classes) for j in range(spec.ipc)]


def merge_blocks(ctx: RunContext) -> list[Path]:
    """Once every block of every ipc index is saved, write each `ipc_JJJ.safetensors` exactly as `distill` writes
    it (same tensors, same metadata) and remove the block files; a merged index is kept as it is. Raises
    FileNotFoundError naming the first missing block file (its block shard has not finished)."""
    blocks = class_blocks(ctx)
    for j in range(ctx.spec.ipc):
        if ipc_path(ctx, j).exists():
            continue
        paths = [block_path(ctx, j, classes) for classes in blocks]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is not saved yet: its class block has not finished")
        _save_index(ctx, j, _index_tensors(ctx, [load_tensors(p) for p in paths]))
    return [ipc_path(ctx, j) for j in range(ctx.spec.ipc)]


def load_distilled(ctx: RunContext) -> torch.Tensor:
    """The saved synthetic images [ipc, K, 3, S, S] on the run's device, as `distill` returns them."""
    return torch.stack([load_tensors(ipc_path(ctx, j))["images"].to(ctx.device) for j in range(ctx.spec.ipc)])


def psnr_db(mse: float) -> float:
    """PSNR for pixels in [0, 1]: 10·log10(1 / MSE); inf for identical images."""
    return math.inf if mse <= 0.0 else 10.0 * math.log10(1.0 / mse)


def _quantised_pixels(ctx: RunContext, images: torch.Tensor) -> torch.Tensor:
    """Normalised float → [0, 1] on the 8-bit grid, exactly what the pipeline exports and evaluates."""
    return (ctx.denormalize(images.float()) * 255.0).round() / 255.0


def init_drift(ctx: RunContext) -> dict[str, object] | None:
    """How far the distilled images moved from their initialisation, from the saved ipc files.

    PSNR (dB) between the final images (under `synthetic_format: jpeg` as optimised, before the JPEG storage, so
    the storage loss does not count as movement) and their initialisation, both in [0, 1] on the 8-bit grid the pipeline
    exports (so an image that did not move by half a level reads inf): per ipc index, and over the whole set
    from the pooled MSE; plus the mean absolute pixel change.
    None for the `random` method or when an index has no saved initialisation. With `init = gaussian` the
    reference is the clipped noise, so the numbers measure distance from noise, not from real patches. `rded`
    keeps its initialisation: zero change and an infinite PSNR (null in report.json) for every index.
    """
    if ctx.spec.method == "random":
        return None
    if ctx.spec.method == "rded":
        ipc = ctx.spec.ipc
        return {"init": ctx.spec.init, "init_psnr_db": math.inf, "init_psnr_db_per_index": [math.inf] * ipc,
                "init_mean_abs_change": 0.0, "init_mean_abs_change_per_index": [0.0] * ipc}
    mse, mae = [], []
    for j in range(ctx.spec.ipc):
        path = ipc_path(ctx, j)
        tensors = load_tensors(path) if path.exists() else {}
        if "init" not in tensors:
            return None
        moved = tensors.get("raw", tensors["images"])  # under jpeg: before storage, so JPEG's loss is not drift
        diff = _quantised_pixels(ctx, moved) - _quantised_pixels(ctx, tensors["init"])
        mse.append(diff.square().mean().item())
        mae.append(diff.abs().mean().item())
    return {
        "init": ctx.spec.init,
        "init_psnr_db": psnr_db(sum(mse) / len(mse)),
        "init_psnr_db_per_index": [psnr_db(m) for m in mse],
        "init_mean_abs_change": sum(mae) / len(mae),
        "init_mean_abs_change_per_index": mae,
    }
