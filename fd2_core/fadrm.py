"""FADRM+'s phase schedule (torch-free: the cost model reads it too).

FADRM+ optimises each synthetic image through phases of their own length and image side.
The published phases are 1500, 1500, 1500, 2000 steps at 200, 224, 200, 224 px.
One cosine learning-rate schedule runs over all their steps.
The images are resized between phases.
At each boundary they are pulled back towards their patch initialisation.
The torch half, the optimisation itself, is `fd2_core.stages.fadrm_phases`.
See docs/INTERFACES.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from fd2_core.spec import JobSpec

# The published low-resolution phase side relative to the full one: 200 px of 224.
LOW_SIDE_RATIO = 200 / 224
# Backbones whose classifier is tied to image_size (ConvNet-BN flattens its last feature map).
# They see a phase's images through a crop resized to image_size.
# The global-pooling torchvision nets see the phase's side.
FIXED_INPUT_BACKBONES = ("convnet",)


class Phase(NamedTuple):
    """One FADRM+ phase: image side in pixels, step count, first global step (0-based)."""

    size: int
    steps: int
    first_step: int


def phase_sizes(spec: JobSpec) -> list[int]:
    """Side of each phase: `fadrm_phase_sizes`, else round(S·200/224) and S in turn, ending at S.

    S is image_size; at 224 px this is the published 200, 224, 200, 224.
    """
    if spec.fadrm_phase_sizes is not None:
        return list(spec.fadrm_phase_sizes)
    n, side = len(spec.fadrm_phase_steps), spec.image_size
    low = max(16, min(side, round(side * LOW_SIDE_RATIO)))
    return [side if (n - 1 - p) % 2 == 0 else low for p in range(n)]


def phase_schedule(spec: JobSpec) -> list[Phase]:
    """The phases in order: phase p starts at global step Σ_{q<p} steps_q."""
    phases, first = [], 0
    for size, steps in zip(phase_sizes(spec), spec.fadrm_phase_steps, strict=True):
        phases.append(Phase(size, steps, first))
        first += steps
    return phases


def input_side(backbone: str, image_size: int, phase_size: int) -> int:
    """Side of the augmented crop a `backbone` teacher sees in a phase of side `phase_size`.

    RandomResizedCrop targets the phase's side, except for a backbone fixed to image_size.
    """
    return image_size if backbone in FIXED_INPUT_BACKBONES else phase_size


def total_steps(spec: JobSpec) -> int:
    """Optimisation steps of one image over all phases: Σ_p steps_p."""
    return sum(spec.fadrm_phase_steps)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr of global step t (0-based) of T: lr·0.5·(1 + cos(π·t/T)), one schedule over all phases."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total))


__all__ = [
    "FIXED_INPUT_BACKBONES",
    "LOW_SIDE_RATIO",
    "Phase",
    "cosine_lr",
    "input_side",
    "phase_schedule",
    "phase_sizes",
    "total_steps",
]
