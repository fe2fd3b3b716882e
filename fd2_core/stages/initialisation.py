"""What stage 2 starts from, and the two methods that stop there.

The optimising methods start from real patches (`fd2_core.stages.patches`) or from noise.
Two methods select real pixels instead of optimising them.
`rded` keeps the patch initialisation as it is, as RDED does: no gradient step on the images.
`random` takes random real train images.
They sit beside the patch rules because all three read the same real-image pools.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import FD2Model
from ..runtime import frozen
from .context import RunContext
from .distill_files import class_blocks
from .patches import patch_init, random_real_indices


def initial_images(
    ctx: RunContext,
    teacher: FD2Model,
    classes: torch.Tensor,
    index: int,
    g: torch.Generator,
    poll: Callable[[], None] | None = None,
) -> torch.Tensor:
    """[k,3,S,S] starting images in normalised space: real patches, or N(0, 1) noise.

    The patches are scored by `teacher`, the patch scorer (`Committee.scorer`).
    """
    if ctx.spec.init == "patches":
        return patch_init(ctx, teacher, classes, index, poll)
    size = ctx.spec.image_size
    return torch.randn(len(classes), 3, size, size, generator=g).to(ctx.device)


def select_random(ctx: RunContext, index: int, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The `random` method: real train images instead of optimised ones, same count per class.

    Returns [k,3,S,S] for `classes` (default all).
    """
    pick = random_real_indices(ctx, ctx.spec.ipc, "random-subset")[index]
    return ctx.normalize(ctx.data.train_images[pick if classes is None else pick[classes]]).float()


def select_rded(
    ctx: RunContext,
    teacher: FD2Model,
    index: int,
    poll: Callable[[], None] | None = None,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `rded` method: ipc index `index` is its patch initialisation, with no optimisation step.

    Returns [k,3,S,S] in normalised space for `classes` (a class block; default every block).
    With the same seed these are the images sre2l++ (the same plain teacher) starts from.
    """
    blocks = class_blocks(ctx) if classes is None else [classes]
    with frozen(teacher):
        return torch.cat([patch_init(ctx, teacher, block, index, poll) for block in blocks])
