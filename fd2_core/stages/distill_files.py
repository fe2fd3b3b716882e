"""Where stage 2 keeps its images: one file per ipc index, one per class block run alone.

`distill` saves ipc index j of every class as `ipc_JJJ.safetensors`.
A class block run alone (`distill_block`, a shard of `fd2_core.shards`) saves its own rows.
Those block files are `ipc_JJJ_cKKKKK.safetensors`.
`merge_blocks` joins those block files into the same `ipc_JJJ.safetensors` that `distill` writes.
Keeping the names, the class blocks and the merge in one place keeps the two writers in step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import load_tensors, save_tensors
from .context import RunContext


def ipc_file(stage_dir: Path, index: int) -> Path:
    """Ipc index `index` of every class: `images` [K,3,S,S], `labels` [K], `init` if optimised."""
    return stage_dir / "distill" / f"ipc_{index:03d}.safetensors"


def block_file(stage_dir: Path, index: int, first_class: int) -> Path:
    """Ipc index `index` of the class block from `first_class` as a block shard saves it.

    It holds `images` (and `init`) [k,3,S,S].
    """
    return stage_dir / "distill" / f"ipc_{index:03d}_c{first_class:05d}.safetensors"


def ipc_path(ctx: RunContext, index: int) -> Path:
    """The run's file of ipc index `index` (`ipc_file` under its stage folder)."""
    return ipc_file(ctx.stage_dir, index)


def block_path(ctx: RunContext, index: int, classes: torch.Tensor) -> Path:
    """The run's block file of ipc index `index` for the class block `classes` (`block_file`)."""
    return block_file(ctx.stage_dir, index, int(classes[0]))


def block_starts(num_classes: int, batch_classes: int) -> list[int]:
    """First class of every block of `batch_classes` classes (0 = all classes, one block)."""
    return list(range(0, num_classes, batch_classes or num_classes))


def class_blocks(ctx: RunContext) -> list[torch.Tensor]:
    """The class blocks optimised together, [k] class indices each, in order.

    Each block holds `distill_batch_classes` classes; the last one is shorter.
    """
    k = ctx.num_classes
    size = ctx.spec.distill_batch_classes or k
    return [torch.arange(s, min(s + size, k)) for s in block_starts(k, size)]


def saved_block(ctx: RunContext, index: int, classes: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Ipc index `index` of a block if saved: sliced from the merged ipc file, or its block file."""
    merged = ipc_path(ctx, index)
    if merged.exists():
        return {k: v[classes] for k, v in load_tensors(merged).items() if k != "labels"}
    own = block_path(ctx, index, classes)
    return load_tensors(own) if own.exists() else None


def block_done(stage_dir: Path, ipc: int, first_class: int) -> bool:
    """Whether every ipc index of the block from `first_class` is saved (block file or merged)."""
    return all(ipc_file(stage_dir, j).exists() or block_file(stage_dir, j, first_class).exists() for j in range(ipc))


def index_tensors(ctx: RunContext, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ipc index of every class from its blocks, in class order.

    It holds `labels` and `images`, and `init` / `raw` when every block has one.
    """
    tensors = {"labels": torch.arange(ctx.num_classes), "images": torch.cat([b["images"] for b in blocks])}
    for key in ("init", "raw"):
        if all(key in b for b in blocks):
            tensors[key] = torch.cat([b[key] for b in blocks])
    return tensors


def save_index(ctx: RunContext, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Save ipc index `index`; drop its block files and FADRM+ phase checkpoints, now superseded."""
    path = save_tensors(ipc_path(ctx, index), tensors, {"ipc_index": str(index)})
    for superseded in path.parent.glob(f"ipc_{index:03d}_c*.safetensors"):
        superseded.unlink(missing_ok=True)
    return path


def merge_blocks(ctx: RunContext) -> list[Path]:
    """Write each `ipc_JJJ.safetensors` from its block files, exactly as `distill` writes it.

    It runs once every block of every ipc index is saved.

    The merged file has the same tensors and the same metadata; the block files are removed.
    A merged index is kept as it is.
    Raises FileNotFoundError naming the first missing block file (its block shard has not finished).
    """
    blocks = class_blocks(ctx)
    for j in range(ctx.spec.ipc):
        if ipc_path(ctx, j).exists():
            continue
        paths = [block_path(ctx, j, classes) for classes in blocks]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is not saved yet: its class block has not finished")
        save_index(ctx, j, index_tensors(ctx, [load_tensors(p) for p in paths]))
    return [ipc_path(ctx, j) for j in range(ctx.spec.ipc)]


def load_distilled(ctx: RunContext) -> torch.Tensor:
    """The saved images [ipc, K, 3, S, S] on the run's device, as `distill` returns them."""
    return torch.stack([load_tensors(ipc_path(ctx, j))["images"].to(ctx.device) for j in range(ctx.spec.ipc)])
