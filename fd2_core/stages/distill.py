"""Stage 2 — optimise synthetic images against the frozen teacher, one ipc index at a time.

This module is the stage's entry: `distill` runs the stage's units in order, `distill_block` is one
unit. A unit is one class block: `distill_block_index` for each of its ipc indices in order.
The unit picks the method's work from the modules beside this one:
- `fd2_core.stages.initialisation`: the start images, and `rded` / `random` (real pixels);
- `fd2_core.stages.synthesis`: the optimisation with FD²'s loss (the sre2l++ recipe);
- `fd2_core.stages.fadrm_phases`: the `fadrm+` recipe, in phases with a data residual;
- `fd2_core.stages.distill_files`: the files each index is saved in, and the merge of block files.
Every finished ipc index is saved atomically with its initialisation and skipped on a re-run.
So a killed run resumes at the first missing index (under FADRM+, at the first unfinished phase).

Classes are optimised in blocks of `distill_batch_classes` (`class_blocks`).
One block's work never reads another block's.
Its patch selection, its random streams and the earlier indices SC reads are the block's own.
So a block runs alone in any order, in this process or as one shard of `fd2_core.shards` on another
worker. It saves each index as `ipc_JJJ_cKKKKK.safetensors`, and `merge_blocks` then writes every
`ipc_JJJ.safetensors`. A work folder whose merged index files were written before blocks were saved
(an earlier version's run) is read block by block from them, so it resumes without recomputing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..atomic import save_tensors
from ..fadrm import total_steps
from ..models import FD2Model
from ..progress import StageReporter, unit_tracker
from ..spec import JobSpec
from ..stored_images import stored_pixels
from .committee import Committee, as_committee, frozen_members
from .context import RunContext
from .distill_files import block_path, class_blocks, load_distilled, merge_blocks, saved_block
from .fadrm_phases import optimise_chunk_fadrm, phase_path
from .initialisation import select_random, select_rded
from .patches import patch_wrap_note
from .pretrain import load_scorer
from .synthesis import optimise_chunk


def distill_block_index(
    ctx: RunContext,
    committee: Committee | None,
    classes: torch.Tensor,
    index: int,
    previous: list[torch.Tensor],
    reporter: StageReporter,
    done_before: int,
) -> dict[str, torch.Tensor]:
    """Ipc index `index` of one class block, the one unit both `distill` and `distill_block` run.

    Returns `images` [k,3,S,S] in normalised space, and `init` for the optimising methods.
    `rded` is its own initialisation, and `random` has none.
    `previous` holds the block's images of the earlier indices.
    `committee` is None only for `random`.
    """
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
    """A finished index as stored (`synthetic_format`).

    Under `jpeg` its `images` [k,3,S,S] become the decoded JPEG 75 pixels of their uint8 truncation.
    As published, SC's references, relabel and the students read the JPEGs.
    The optimised floats stay as `raw` for the drift metrics.
    Under `png` nothing changes here: the floats are rounded once, at export.
    Real images (`random`) are never re-encoded.
    """
    if ctx.spec.synthetic_format != "jpeg":
        return tensors
    raw = tensors["images"]
    stored = {**tensors, "images": ctx.normalize(stored_pixels(ctx.denormalize(raw.float()), "jpeg")).float()}
    # rded: its images are its start, so it has no drift to measure
    return {**stored, "raw": raw} if "init" in tensors else stored


def chunk_steps(spec: JobSpec) -> int:
    """Steps of one class chunk of one ipc index: all FADRM+ phases, else distill_iterations."""
    return total_steps(spec) if spec.recipe == "fadrm+" else spec.distill_iterations


def _log_wrap_note(ctx: RunContext, reporter: StageReporter) -> None:
    note = patch_wrap_note(ctx) if ctx.spec.scores_patches else None
    if note:
        reporter.log(note)


def _with_scorer(ctx: RunContext, committee: Committee) -> Committee:
    """The committee with the plain patch scorer the spec trains (`JobSpec.trains_scorer`).

    A caller that passes a bare teacher, or teachers loaded without the scorer, still selects
    patches with the scorer, never silently with the CAL teacher.
    Raises FileNotFoundError while the scorer is not pretrained.
    """
    if not ctx.spec.trains_scorer or committee.scorer_model is not None:
        return committee
    return dataclasses.replace(committee, scorer_model=load_scorer(ctx))


def distill(ctx: RunContext, teacher: FD2Model | Committee | None) -> torch.Tensor:
    """Stage 2: synthetic images [ipc, K, 3, S, S] in normalised space,
    saved per ipc index with `init`.

    `teacher` is one model or a committee (`fd2_core.stages.committee`); None only for `random`.
    The stage runs its units in order, as the shards of `fd2_core.shards` do: each class block
    (`distill_block`, its share of the stage's progress), then the merge of the block files into one
    file per ipc index (`merge_blocks`). A block or an index already saved is reused.
    """
    committee = _with_scorer(ctx, as_committee(ctx, teacher)) if teacher is not None else None
    blocks = class_blocks(ctx)
    for i, classes in enumerate(blocks):
        unit = dataclasses.replace(ctx, tracker=unit_tracker(ctx.tracker, "distill", i, len(blocks)))
        distill_block(unit, committee, classes)
    merge_blocks(ctx)
    return load_distilled(ctx)


def distill_block(ctx: RunContext, teacher: FD2Model | Committee | None, classes: torch.Tensor) -> list[Path]:
    """Stage 2 for one class block alone, each ipc index in order saved atomically as a block file.

    A saved or merged index is reused (`saved_block`), and an FADRM+ phase checkpoint is resumed.
    Returns the block files (`block_path`).
    The images equal the block's rows of what `distill` writes.
    Both run `distill_block_index` with the same streams and the block's own earlier images.
    """
    spec = ctx.spec
    committee = _with_scorer(ctx, as_committee(ctx, teacher)) if teacher is not None else None
    reporter = ctx.tracker.stage("distill")
    per_block = chunk_steps(spec) if spec.optimises_images else 0
    reporter.begin(spec.ipc * per_block if spec.optimises_images else spec.ipc)
    _log_wrap_note(ctx, reporter)
    first, last = int(classes[0]), int(classes[-1])
    which = "" if len(classes) == ctx.num_classes else f" of classes {first}-{last}"
    previous: list[torch.Tensor] = []
    for j in range(spec.ipc):
        saved = saved_block(ctx, j, classes)
        if saved is None:
            saved = distill_block_index(ctx, committee, classes, j, previous, reporter, j * per_block)
            save_tensors(block_path(ctx, j, classes), saved, {"ipc_index": str(j), "first_class": str(first),
                                                              "num_classes": str(len(classes))})
            phase_path(ctx, j, classes).unlink(missing_ok=True)
            reporter.log(f"ipc index {j + 1}/{spec.ipc}{which} distilled", fraction=(j + 1) / spec.ipc)
        else:
            reporter.log(f"ipc index {j}{which} already distilled; reusing it", fraction=(j + 1) / spec.ipc)
        previous.append(saved["images"].to(ctx.device))
    reporter.end()
    return [block_path(ctx, j, classes) for j in range(spec.ipc)]
