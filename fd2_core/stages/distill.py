"""Stage 2 — optimise synthetic images against the frozen teacher, one ipc index at a time.

Loss per teacher (FD2_SPEC.md): r·CE_cal + (1−r)·CE_bb + r_bn·BN + λ_FC·L_FC + λ_SC·L_SC, where FC and SC
are switched by the spec. Every finished ipc index is saved atomically and skipped on a re-run, so a killed
run resumes at the first missing index. The `random` method selects real images instead of optimising.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..atomic import load_tensors, save_tensors
from ..augment import apply_crop_flip, random_roll, sample_crop_flip
from ..losses import BNStatMatcher, fc_loss, sc_loss
from ..models import FD2Model
from ..runtime import autocast, frozen, generator
from .context import RunContext

SCORE_BATCH = 256


def ipc_path(ctx: RunContext, index: int):
    return ctx.stage_dir / "distill" / f"ipc_{index:03d}.safetensors"


def _class_chunks(ctx: RunContext) -> list[torch.Tensor]:
    k = ctx.num_classes
    size = ctx.spec.distill_batch_classes or k
    return [torch.arange(s, min(s + size, k)) for s in range(0, k, size)]


def _class_pools(ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Train indices sorted by class plus per-class offsets, to sample a class's images without a loop."""
    labels = ctx.data.train_labels
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=ctx.num_classes)
    return order, counts


def _sample_class_images(ctx: RunContext, classes: torch.Tensor, per_class: int, g: torch.Generator):
    """[len(classes), per_class] train indices drawn uniformly (with replacement) from each class."""
    order, counts = _class_pools(ctx)
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(len(classes), per_class, generator=g)
    offset = (u * counts[classes, None]).long().clamp_max(counts[classes, None] - 1)
    return order[starts[classes, None] + offset]


@torch.no_grad()
def patch_init(ctx: RunContext, teacher: FD2Model, classes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RDED-style init: score random S/2 crops of real class images by teacher CE, stitch the best 2×2."""
    s = ctx.spec.image_size
    half = s // 2
    n_cand = 4 * ctx.spec.patch_candidates
    k = len(classes)
    idx = _sample_class_images(ctx, classes, n_cand, g)  # [k, n_cand]
    images = ctx.normalize(ctx.data.train_images[idx.reshape(-1)])  # [k*n, 3, s, s]
    x0 = torch.randint(0, s - half + 1, (k * n_cand,), generator=g).to(ctx.device)
    y0 = torch.randint(0, s - half + 1, (k * n_cand,), generator=g).to(ctx.device)
    ar = torch.arange(half, device=ctx.device)
    rows = (y0[:, None] + ar)[:, :, None]  # [n, half, 1]
    cols = (x0[:, None] + ar)[:, None, :]  # [n, 1, half]
    batch = torch.arange(k * n_cand, device=ctx.device)[:, None, None]
    crops = images[batch, :, rows, cols].permute(0, 3, 1, 2)  # [n, 3, half, half]
    padded = torch.zeros(k * n_cand, 3, s, s, device=ctx.device, dtype=crops.dtype)
    lo = (s - half) // 2
    padded[:, :, lo : lo + half, lo : lo + half] = crops
    labels = classes.repeat_interleave(n_cand).to(ctx.device)
    scores = []
    with autocast(ctx.device, ctx.amp):
        for start in range(0, padded.shape[0], SCORE_BATCH):
            logits = teacher(padded[start : start + SCORE_BATCH]).logits.float()
            scores.append(F.cross_entropy(logits, labels[start : start + SCORE_BATCH], reduction="none"))
    best = torch.cat(scores).view(k, n_cand).topk(4, dim=1, largest=False).indices  # lowest CE
    chosen = crops.view(k, n_cand, 3, half, half).gather(
        1, best[:, :, None, None, None].expand(-1, -1, 3, half, half)
    )
    top = torch.cat([chosen[:, 0], chosen[:, 1]], dim=3)
    bottom = torch.cat([chosen[:, 2], chosen[:, 3]], dim=3)
    stitched = torch.cat([top, bottom], dim=2)
    if stitched.shape[-1] != s:  # odd sizes
        stitched = F.interpolate(stitched, size=(s, s), mode="bilinear", align_corners=False)
    return stitched.float()


def _augment(ctx: RunContext, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    params = sample_crop_flip(x.shape[0], x.shape[-1], g, scale=(ctx.spec.min_crop_scale, 1.0))
    return random_roll(apply_crop_flip(x, params), ctx.spec.jitter, g)


@torch.no_grad()
def previous_attention(
    ctx: RunContext, teacher: FD2Model, previous: list[torch.Tensor], classes: torch.Tensor, g: torch.Generator
) -> torch.Tensor | None:
    """Attention maps [J, B, M, H, W] of the already distilled images 0…j−1, once per index j."""
    if not previous:
        return None
    maps = []
    with autocast(ctx.device, ctx.amp):
        for images in previous:
            out = teacher(_augment(ctx, images[classes].to(ctx.device), g))
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
    """One teacher's total loss on an augmented synthetic batch (hooks already registered in `bn`)."""
    spec = ctx.spec
    with autocast(ctx.device, ctx.amp):
        out = teacher(x)
    ce_bb = F.cross_entropy(out.logits.float(), y)
    parts: dict[str, torch.Tensor] = {}
    if out.cal is not None:
        ce_cal = F.cross_entropy(out.cal.logits.float(), y)
        loss = spec.cal_ratio * ce_cal + (1.0 - spec.cal_ratio) * ce_bb
    else:
        loss = ce_bb
    parts["ce"] = loss.detach()
    bn_loss = bn.loss()
    loss = loss + spec.r_bn * bn_loss
    parts["bn"] = bn_loss.detach()
    if spec.uses_fc and out.cal is not None:
        fc = fc_loss(
            out.cal.embedding.float(),
            y,
            teacher.cal_head.prototypes,
            spec.fc_rho,
            normalize_prototypes=spec.fc_prototypes == "normalized",
        )
        loss = loss + spec.lambda_fc * fc.total
        parts["fc"] = fc.total.detach()
    if spec.uses_sc and out.cal is not None and prev_maps is not None:
        sc = sc_loss(out.cal.attention.float(), prev_maps)
        # added only when L_SC ≥ τ; a tensor mask instead of an `if` keeps the GPU free of a sync per step
        loss = loss + spec.lambda_sc * sc * (sc.detach() >= spec.sc_tau)
        parts["sc"] = sc.detach()
    return loss, parts


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One full iteration: augment, all losses, backward to the images, Adam step, clamp to valid pixels."""
    loss, parts = distill_loss(ctx, teacher, _augment(ctx, x, g), y, prev_maps, bn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        x.data = torch.max(torch.min(x.data, bounds[1]), bounds[0])
    return loss.detach(), parts


def optimise_chunk(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter,
    done_before: int,
) -> torch.Tensor:
    spec = ctx.spec
    g = generator(spec.seed, "distill", index, int(classes[0]))
    if spec.init == "patches":
        x = patch_init(ctx, teacher, classes, g)
    else:
        x = torch.randn(len(classes), 3, spec.image_size, spec.image_size, generator=g).to(ctx.device)
    if ctx.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = classes.to(ctx.device)
    prev_maps = previous_attention(ctx, teacher, previous, classes, g) if spec.uses_sc else None
    optimizer = torch.optim.Adam([x], lr=spec.distill_lr, betas=(0.5, 0.9), eps=1e-8)
    bounds = ctx.pixel_bounds()
    iters = spec.distill_iterations
    with BNStatMatcher(teacher.bn_layers(), spec.first_bn_multiplier) as bn:
        for it in range(iters):
            optimizer.param_groups[0]["lr"] = 0.5 * spec.distill_lr * (1.0 + math.cos(math.pi * it / iters))
            loss, parts = distill_step(ctx, teacher, x, y, prev_maps, bn, optimizer, g, bounds)
            reporter.step(done_before + it + 1, {"loss": loss, **parts})
    return x.detach().float().contiguous()


def random_real_indices(ctx: RunContext, ipc: int, stream: str) -> torch.Tensor:
    """[ipc, K] train indices: distinct random real images of every class (a class's pool wraps if short)."""
    g = generator(ctx.spec.seed, stream)
    order, counts = _class_pools(ctx)
    starts = torch.cumsum(counts, 0) - counts
    # a random permutation inside every class: sort by (class, random key)
    keys = torch.rand(order.numel(), generator=g) + ctx.data.train_labels[order].float()
    perm = order[torch.argsort(keys)]
    j = torch.arange(ipc)[:, None]
    return perm[starts[None, :] + torch.remainder(j, counts[None, :])]


def select_random(ctx: RunContext, index: int) -> torch.Tensor:
    """The `random` method: real train images instead of optimised ones, same count per class."""
    pick = random_real_indices(ctx, ctx.spec.ipc, "random-subset")[index]
    return ctx.normalize(ctx.data.train_images[pick]).float()


def distill(ctx: RunContext, teacher: FD2Model | None) -> torch.Tensor:
    """Returns synthetic images [ipc, K, 3, S, S] in normalised space (also saved per ipc index)."""
    spec = ctx.spec
    reporter = ctx.tracker.stage("distill")
    chunks = _class_chunks(ctx)
    per_index = spec.distill_iterations * len(chunks) if spec.method != "random" else 1
    reporter.begin(spec.ipc * per_index)
    done: list[torch.Tensor] = []
    for j in range(spec.ipc):
        path = ipc_path(ctx, j)
        if path.exists():
            done.append(load_tensors(path)["images"].to(ctx.device))
            reporter.log(f"ipc index {j} already distilled; reusing it", fraction=(j + 1) / spec.ipc)
            continue
        if spec.method == "random":
            images = select_random(ctx, j)
        else:
            assert teacher is not None
            parts = []
            with frozen(teacher):
                for c, classes in enumerate(chunks):
                    before = j * per_index + c * spec.distill_iterations
                    parts.append(optimise_chunk(ctx, teacher, classes, j, done, reporter, before))
            images = torch.cat(parts)
        save_tensors(path, {"images": images, "labels": torch.arange(ctx.num_classes)}, {"ipc_index": str(j)})
        done.append(images)
        reporter.log(f"ipc index {j + 1}/{spec.ipc} distilled", fraction=(j + 1) / spec.ipc)
    reporter.end()
    return torch.stack(done)
