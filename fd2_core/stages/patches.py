"""Patch initialisation: real views of a class, scored by a teacher's
cross-entropy, stitched factor×factor.

Two rules (`JobSpec.patch_rule`), both scoring square RandomResizedCrop
views (area scale 0.08–1) of side S/factor, each zero-padded to S, by the
scorer's backbone cross-entropy for its class in eval mode:
- `ranked` (RDED's own rule): a shuffled pool of up to `patch_pool` images per class,
  `patch_candidates` views each; every image keeps its lowest-CE view and the pool is ranked once;
  ipc index j stitches ranks j·f² … (j+1)·f²−1, so no image repeats across indices
  (`sample_patch_pool`, `rank_patches`, `select_patches`).
- `published` (FD²'s patch script, generalised from its fixed 29 images and
  2×2 stitch): the first n train images of each class in the loader's
  order, n = min(smallest class's train count, `patch_pool`);
  `PUBLISHED_PATCH_FILES` patch files per class, each from fresh views of those
n images, each image's lowest-CE view kept and the f² best stitched; every ipc
index picks one file at random, with repetition, so two indices may start from
the same image (`published_pool`, `published_picks`, `build_patch_files`).

The scorer is the `teacher` argument: `Committee.scorer` (a separate plain cross-entropy teacher
under FD² with the published rule, else the first member).
Every random draw comes from streams seeded by the run seed, a stream name and the class (and the
file), never from the class block, so a block's images are those of the same classes in an unsharded
run with any `distill_batch_classes`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from ..augment import sample_crop_flip
from ..crops import resized_crop
from ..models import FD2Model
from ..runtime import frozen, generator
from ..spec import PUBLISHED_PATCH_FILES, JobSpec
from .context import RunContext

T = TypeVar("T")

SCORE_BATCH = 256  # views per teacher forward when scoring patch candidates
PATCH_SCALE = (0.08, 1.0)  # RDED's RandomResizedCrop area range for the candidate views
# RDED's views stitched per side: 1 up to this image side (CIFAR,
# Tiny-ImageNet), 2 above it (128/224 px)
PATCH_FACTOR_SMALL_SIDE = 64


class PatchPool(NamedTuple):
    """The random draws of the patch initialisation for some classes
    (RDED), made before any scoring."""

    images: torch.Tensor  # [k, P] int64 train indices, each class's pool shuffled
    valid: torch.Tensor  # [k, P] bool, False past the end of a class with fewer than P images
    boxes: torch.Tensor  # [k, P, V, 4] float32 square views (x1, y1, x2, y2) in source pixels


class PatchRanking(NamedTuple):
    """A class pool ranked by its images' best view, lowest teacher CE first (RDED's selector)."""

    images: torch.Tensor  # [k, P] int64 train indices, ranked; padding (invalid) entries last
    boxes: torch.Tensor  # [k, P, 4] the lowest-CE view of each ranked image
    counts: torch.Tensor  # [k] int64 real images in each class's pool


class PatchFiles(NamedTuple):
    """The published rule's selection for some classes, per ipc index: the
    views of the file it picked."""

    # [k, ipc, f²] int64 train indices, lowest CE first (the stitch's row-major cells)
    images: torch.Tensor
    boxes: torch.Tensor  # [k, ipc, f², 4] float32 the kept view of each image in source pixels


def _class_pools(ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Train indices sorted by class (stable: the loader's order inside a class) plus per-class
    counts, to take a class's images without a loop."""
    labels = ctx.data.train_labels
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=ctx.num_classes)
    return order, counts


def random_real_indices(ctx: RunContext, ipc: int, stream: str) -> torch.Tensor:
    """[ipc, K] train indices: distinct random real images of every class
    (a class's pool wraps if short)."""
    g = generator(ctx.spec.seed, stream)
    order, counts = _class_pools(ctx)
    starts = torch.cumsum(counts, 0) - counts
    # a random permutation inside every class: sort by (class, random key)
    keys = torch.rand(order.numel(), generator=g) + ctx.data.train_labels[order].float()
    perm = order[torch.argsort(keys)]
    j = torch.arange(ipc)[:, None]
    return perm[starts[None, :] + torch.remainder(j, counts[None, :])]


def patch_factor(spec: JobSpec) -> int:
    """Views stitched per side: the spec's, else RDED's (1 at ≤ 64 px, 2 above)."""
    return spec.patch_factor or (1 if spec.image_size <= PATCH_FACTOR_SMALL_SIDE else 2)


def _square_views(spec: JobSpec, count: int, g: torch.Generator) -> torch.Tensor:
    """[count, 4] square RandomResizedCrop boxes (area scale 0.08–1, ratio 1) in source pixels; the
    flips drawn beside them are not used (a view is scored and stitched unflipped)."""
    return sample_crop_flip(count, spec.image_size, g, scale=PATCH_SCALE, ratio=(1.0, 1.0)).boxes


def sample_patch_pool(ctx: RunContext, classes: torch.Tensor) -> PatchPool:
    """RDED's pool: up to `patch_pool` shuffled images per class,
    `patch_candidates` square views each.

    Drawn for all classes at once from streams seeded by the run seed only, then sliced, so a
    class's pool depends neither on the ipc index nor on how classes are chunked.
    """
    spec = ctx.spec
    counts = torch.bincount(ctx.data.train_labels, minlength=ctx.num_classes)
    size = min(spec.patch_pool, int(counts.max()))
    # [k, P]; wraps where a class is short
    images = random_real_indices(ctx, size, "patch-pool").T[classes]
    valid = torch.arange(size)[None, :] < counts[classes, None]
    views = spec.patch_candidates
    boxes = _square_views(spec, ctx.num_classes * size * views, generator(spec.seed, "patch-views"))
    return PatchPool(images, valid, boxes.view(ctx.num_classes, size, views, 4)[classes])


def crop_views(images: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """[n,3,S,S] images and [n,V,4] integer boxes → [n·V,3,side,side] crops, resampled as
    torchvision's resized_crop(antialias=True) does (`fd2_core.crops`; a box larger than the cell is
    downscaled with the antialiasing filter, as the published views at factor 2 are)."""
    n, v = boxes.shape[:2]
    return resized_crop(images.repeat_interleave(v, dim=0), boxes.reshape(-1, 4), side)


def pad_centre(views: torch.Tensor, size: int) -> torch.Tensor:
    """[n,3,s,s] → [n,3,size,size] with zeros (the mean colour in
    normalised space) around a centred view."""
    lo = (size - views.shape[-1]) // 2
    hi = size - views.shape[-1] - lo
    return F.pad(views, (lo, hi, lo, hi))


def _view_scores(
    ctx: RunContext,
    teacher: FD2Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    poll: Callable[[], None] | None = None,
) -> torch.Tensor:
    """CE [n, V] of every view ([n] train indices, [n] labels, [n,V,4]
    boxes), padded to S, backbone logits.

    `poll` is called between chunks: scoring a large pool takes minutes,
    and a stop must not wait for it.
    """
    size = ctx.spec.image_size
    side = size // patch_factor(ctx.spec)
    views = boxes.shape[1]
    per = max(1, SCORE_BATCH // views)
    scores = []
    for start in range(0, images.shape[0], per):  # fixed-size chunks bound the memory
        if poll is not None:
            poll()
        x = ctx.normalize(ctx.data.train_images[images[start : start + per]])
        padded = pad_centre(crop_views(x, boxes[start : start + per], side), size)
        y = labels[start : start + per].to(ctx.device).repeat_interleave(views)
        with ctx.autocast():
            logits = teacher(padded).logits.float()
        scores.append(F.cross_entropy(logits, y, reduction="none").view(-1, views).cpu())
    return torch.cat(scores) if scores else torch.zeros(0, views)


@torch.no_grad()
def rank_patches(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    pool: PatchPool,
    poll: Callable[[], None] | None = None,
) -> PatchRanking:
    """Each image keeps its lowest-CE view; a class's images are ranked by
    that CE, ascending (RDED)."""
    k, p, views = pool.boxes.shape[:3]
    flat = pool.valid.reshape(-1).nonzero().squeeze(1)
    labels = classes.repeat_interleave(p)[flat]
    with frozen(teacher):  # eval mode: BatchNorm uses running statistics
        ce = _view_scores(
            ctx, teacher, pool.images.reshape(-1)[flat], labels, pool.boxes.reshape(-1, views, 4)[flat], poll
        )
    best_ce, best_view = ce.min(dim=1)
    score = torch.full((k * p,), math.inf).index_put_((flat,), best_ce).view(k, p)
    view = torch.zeros(k * p, dtype=torch.long).index_put_((flat,), best_view).view(k, p)
    order = torch.argsort(score, dim=1, stable=True)  # padding (inf) last
    # [k, P, 4]
    boxes = pool.boxes.gather(2, view[:, :, None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return PatchRanking(
        pool.images.gather(1, order), boxes.gather(1, order[:, :, None].expand(-1, -1, 4)), pool.valid.sum(1)
    )


def select_patches(ranking: PatchRanking, index: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ipc index j takes ranks j·f² … (j+1)·f²−1, wrapping round a short
    pool: ([k, f²] indices, [k, f², 4])."""
    cells = factor * factor
    ranks = index * cells + torch.arange(cells)
    pos = torch.remainder(ranks[None, :], ranking.counts[:, None])  # [k, f²]
    return ranking.images.gather(1, pos), ranking.boxes.gather(1, pos[:, :, None].expand(-1, -1, 4))


def stitch_patches(ctx: RunContext, images: torch.Tensor, boxes: torch.Tensor, factor: int) -> torch.Tensor:
    """[k, f²] train indices + [k, f², 4] views → [k,3,S,S]: views
    row-major in a factor×factor grid."""
    k = images.shape[0]
    size = ctx.spec.image_size
    side = size // factor
    x = ctx.normalize(ctx.data.train_images[images.reshape(-1)])
    cells = crop_views(x, boxes.reshape(-1, 1, 4), side).float()  # [k·f², 3, side, side]
    grid = cells.reshape(k, factor, factor, 3, side, side).permute(0, 3, 1, 4, 2, 5)
    stitched = grid.reshape(k, 3, factor * side, factor * side)
    if factor * side != size:  # S not divisible by the factor
        stitched = F.interpolate(stitched, size=(size, size), mode="bilinear", align_corners=False)
    return stitched.contiguous()


def patch_ranking(
    ctx: RunContext, teacher: FD2Model, classes: torch.Tensor, poll: Callable[[], None] | None = None
) -> PatchRanking:
    """Ranking per (teacher, class chunk), computed once per run: the
    teacher is frozen for the whole stage."""
    return _once_per_run(ctx, "patch_ranking", teacher, classes,
                         lambda: rank_patches(ctx, teacher, classes, sample_patch_pool(ctx, classes), poll))


def _once_per_run(ctx: RunContext, name: str, teacher: FD2Model, classes: torch.Tensor, build: Callable[[], T]) -> T:
    """`build()` once per (teacher, class chunk) in the run's notes:
    scoring a pool takes minutes, and every ipc index of the chunk reads
    the same result (the teacher is frozen for the whole stage)."""
    cache = ctx.notes.setdefault(name, weakref.WeakKeyDictionary())
    per_teacher = cache.setdefault(teacher, {})
    key = tuple(classes.tolist())
    if key not in per_teacher:
        per_teacher[key] = build()
    return per_teacher[key]


def published_pool_size(ctx: RunContext) -> int:
    """n = min(smallest class's train count, patch_pool): the same n for every class (the published
    script hard-codes 29, CUB-200-2011's smallest class)."""
    counts = torch.bincount(ctx.data.train_labels, minlength=ctx.num_classes)
    return min(int(counts.min()), ctx.spec.patch_pool)


def published_pool(ctx: RunContext, classes: torch.Tensor) -> torch.Tensor:
    """[k, n] int64 train indices: the first n train images of each class in the loader's order.

    That order is the one of `ImageDataset.train_images` inside a class: for a folder or an archive,
    the scanner's, i.e. file names in code-point order, a folder's own files before its sub-folders
    (depth first, each level by name), less the images carved off as test; for a manifest, its row
    order; for the built-in `fgsynth`, generation order, which is also the name order of the files
    it exports (`train/<class>/00000.png`, `00001.png`, …).
    The published script takes the first 29 file names of each CUB-200-2011 class folder.
    """
    order, counts = _class_pools(ctx)
    starts = torch.cumsum(counts, 0) - counts
    return order[starts[classes][:, None] + torch.arange(published_pool_size(ctx))[None, :]]


def published_picks(ctx: RunContext, classes: torch.Tensor) -> torch.Tensor:
    """[k, ipc] int64: the patch file (0 … PUBLISHED_PATCH_FILES−1) each
    ipc index of each class starts from, uniform with repetition
    (published), from the stream (seed, "patch-picks", class) alone.
    A class's first indices are the same at any ipc, so smaller sets are prefixes of larger ones."""
    seed, ipc = ctx.spec.seed, ctx.spec.ipc
    return torch.stack([torch.randint(PUBLISHED_PATCH_FILES, (ipc,), generator=generator(seed, "patch-picks", c))
                        for c in classes.tolist()])


def published_views(ctx: RunContext, cls: int, file: int, count: int) -> torch.Tensor:
    """[count, V, 4] the fresh square views of patch file `file` of class `cls`, `V` =
    patch_candidates per pool image, from the stream (seed, "patch-file", class, file) alone: a
    file's views depend on no other."""
    spec = ctx.spec
    g = generator(spec.seed, "patch-file", cls, file)
    return _square_views(spec, count * spec.patch_candidates, g).view(count, spec.patch_candidates, 4)


@torch.no_grad()
def build_patch_files(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    files: torch.Tensor,
    poll: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published patch files `files` ([m, 2] (class, file) pairs of `classes`'
    pools): for each, every pool image's views are scored (one batch of m·n·V
    views through `_view_scores`), each image keeps its lowest-CE view, and the f²
    best images are kept, lowest CE first, wrapping round a pool shorter than f².

    Returns ([m, f²] train indices, [m, f², 4] boxes). `teacher` is the scorer, run in eval mode.
    """
    cells = patch_factor(ctx.spec) ** 2
    pool = published_pool(ctx, classes)  # [k, n]
    n, views = pool.shape[1], ctx.spec.patch_candidates
    rows = (files[:, :1] == classes[None, :]).int().argmax(dim=1)  # each pair's row of `classes`
    images = pool[rows]  # [m, n]
    boxes = torch.stack([published_views(ctx, c, f, n) for c, f in files.tolist()])  # [m, n, V, 4]
    with frozen(teacher):  # eval mode: BatchNorm uses running statistics
        ce = _view_scores(ctx, teacher, images.reshape(-1), files[:, 0].repeat_interleave(n),
                          boxes.reshape(-1, views, 4), poll)
    best_ce, best_view = ce.view(-1, n, views).min(dim=2)  # [m, n]
    kept = boxes.gather(2, best_view[:, :, None, None].expand(-1, -1, 1, 4)).squeeze(2)  # [m, n, 4]
    # [m, f²]
    best = torch.argsort(best_ce, dim=1, stable=True)[:, torch.remainder(torch.arange(cells), n)]
    return images.gather(1, best), kept.gather(1, best[:, :, None].expand(-1, -1, 4))


def published_patch_files(
    ctx: RunContext, teacher: FD2Model, classes: torch.Tensor, poll: Callable[[], None] | None = None
) -> PatchFiles:
    """Every ipc index's views of `classes` under the published rule: only the files some index
    picks are built, all in one batched scoring; [k, ipc, f²] per index as `PatchFiles`."""
    picks = published_picks(ctx, classes)  # [k, ipc]
    # (class, file)
    pairs = torch.stack([classes[:, None].expand_as(picks), picks], dim=2).reshape(-1, 2)
    files, which = torch.unique(pairs, dim=0, return_inverse=True)  # sorted by class, then file
    images, boxes = build_patch_files(ctx, teacher, classes, files, poll)
    k, ipc = picks.shape
    return PatchFiles(images[which].view(k, ipc, -1), boxes[which].view(k, ipc, -1, 4))


def _published_files(
    ctx: RunContext, teacher: FD2Model, classes: torch.Tensor, poll: Callable[[], None] | None = None
) -> PatchFiles:
    """Published selection per (scorer, class chunk), built once per run:
    the scorer is frozen for the stage."""
    return _once_per_run(ctx, "patch_files", teacher, classes,
                         lambda: published_patch_files(ctx, teacher, classes, poll))


@torch.no_grad()
def patch_init(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    index: int,
    poll: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Patch initialisation of ipc index `index` for `classes`: [k,3,S,S] in normalised space.

    `teacher` is the scorer (`Committee.scorer`).
    `ranked`: the pool is ranked once; index j stitches the j-th group of
    factor² best views, so no image repeats across indices.
    `published`: index j stitches the patch file it picked.
    Either way the IPC-1 and IPC-3 sets are prefixes of the IPC-5 set.
    `poll` is called while scoring.
    """
    factor = patch_factor(ctx.spec)
    if ctx.spec.patch_rule == "published":
        files = _published_files(ctx, teacher, classes, poll)
        return stitch_patches(ctx, files.images[:, index], files.boxes[:, index], factor)
    images, boxes = select_patches(patch_ranking(ctx, teacher, classes, poll), index, factor)
    return stitch_patches(ctx, images, boxes, factor)


def patch_wrap_note(ctx: RunContext) -> str | None:
    """A log line when some class's views are reused: `ranked`, a pool
    holding fewer than ipc·factor² images;
    `published`, a pool (the first n images of each class) holding fewer than factor²."""
    spec = ctx.spec
    cells = patch_factor(spec) ** 2
    if spec.patch_rule == "published":
        n = published_pool_size(ctx)
        if n >= cells:
            return None
        return (f"patch init: each class's pool holds its first {n} train images (the smallest class's count, at "
                f"most patch_pool), fewer than factor² = {cells}; each patch file reuses its views in ranked order")
    need = spec.ipc * cells
    pools = torch.bincount(ctx.data.train_labels, minlength=ctx.num_classes).clamp_max(spec.patch_pool)
    short = int((pools < need).sum())
    if short == 0:
        return None
    return (
        f"patch init: {short} of {ctx.num_classes} classes have fewer than ipc·factor² = {need} pool images "
        f"(smallest {int(pools.min())}); their views are reused in ranked order"
    )


__all__ = [
    "PATCH_SCALE",
    "PUBLISHED_PATCH_FILES",
    "SCORE_BATCH",
    "PatchFiles",
    "PatchPool",
    "PatchRanking",
    "build_patch_files",
    "crop_views",
    "pad_centre",
    "patch_factor",
    "patch_init",
    "patch_wrap_note",
    "published_patch_files",
    "published_picks",
    "published_pool",
    "published_pool_size",
    "published_views",
    "random_real_indices",
    "rank_patches",
    "sample_patch_pool",
    "select_patches",
    "stitch_patches",
]
