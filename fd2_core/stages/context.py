"""What every stage needs: the resolved spec, the data as tensors, the device and the progress tracker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..progress import ProgressTracker
from ..runtime import autocast, grad_scaler
from ..spec import JobSpec

STAGES_FOLDER = "stages"


def stage_folder(workdir: Path) -> Path:
    """Where a run in `workdir` keeps its stages' files (created by `RunContext.stage_dir` on first use)."""
    return workdir / STAGES_FOLDER


@dataclass
class RunContext:
    spec: JobSpec
    data: ImageDataset
    workdir: Path
    device: torch.device
    tracker: ProgressTracker
    teacher_weights: Path | None = None  # local file the teacher starts from (None: scratch or torchvision)
    notes: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = torch.tensor(self.data.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.data.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    @property
    def stage_dir(self) -> Path:
        path = stage_folder(self.workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def amp(self) -> bool:
        return self.spec.amp and self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision: `amp_dtype` autocast on CUDA when amp is on; nothing on the CPU."""
        return autocast(self.device, self.amp, self.spec.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler for one optimisation loop, active only for float16 on CUDA (`runtime.grad_scaler`)."""
        return grad_scaler(self.device, self.amp, self.spec.amp_dtype)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] on any device → normalised float on the run's device."""
        x = images_u8.to(self.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float → [0, 1] float (for PNG export)."""
        return (images * self.std.to(images.device) + self.mean.to(images.device)).clamp_(0.0, 1.0)

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid pixel range [0, 1] expressed in normalised space, per channel."""
        return (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std

    def iterate(
        self,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (when a generator is given) normalised batches on the device."""
        n = images_u8.shape[0]
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.normalize(images_u8[idx]), labels[idx].to(self.device)
