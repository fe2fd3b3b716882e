"""Image drift: how far the distilled images moved from their initialisation, for the report.

The numbers come from the saved ipc files, which keep each index's `init` beside its images.
They tell a reader whether optimisation changed the real patches a little or replaced them.
"""

from __future__ import annotations

import math

import torch

from ..atomic import load_tensors
from .context import RunContext
from .distill_files import ipc_path


def psnr_db(mse: float) -> float:
    """PSNR for pixels in [0, 1]: 10·log10(1 / MSE); inf for identical images."""
    return math.inf if mse <= 0.0 else 10.0 * math.log10(1.0 / mse)


def _quantised_pixels(ctx: RunContext, images: torch.Tensor) -> torch.Tensor:
    """Normalised float → [0, 1] on the 8-bit grid, as the pipeline exports and evaluates it."""
    return (ctx.denormalize(images.float()) * 255.0).round() / 255.0


def init_drift(ctx: RunContext) -> dict[str, object] | None:
    """How far the distilled images moved from their initialisation, from the saved ipc files.

    It gives the PSNR (dB) between the final images and their initialisation, per ipc index.
    Over the whole set the PSNR comes from the pooled MSE.
    It also gives the mean absolute pixel change.
    Under `synthetic_format: jpeg` the final images are taken as optimised, before the JPEG storage.
    So the storage loss does not count as movement.
    Both sides are in [0, 1] on the 8-bit grid the pipeline exports.
    So an image that did not move by half a level reads inf.
    None for the `random` method or when an index has no saved initialisation.
    With `init = gaussian` the reference is the clipped noise.
    Then the numbers measure distance from noise, not from real patches.
    `rded` keeps its initialisation: zero change and an infinite PSNR for every index.
    report.json writes that PSNR as null.
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
        # under jpeg: the images before storage, so JPEG's loss is not counted as drift
        moved = tensors.get("raw", tensors["images"])
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
