"""Device choice, mixed precision and seeding, in one place so every stage behaves the same."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without one is a clear error, not a silent CPU run."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available; set device to cpu or auto")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16") -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (bfloat16 | float16) on CUDA only: CPU autocast is slower than fp32 on small convnets."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=AMP_DTYPES[dtype])
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, enabled: bool, dtype: str = "bfloat16") -> torch.amp.GradScaler:
    """A gradient scaler that is active only for float16 autocast on CUDA (bfloat16 has fp32's exponent range
    and needs none); inactive, `scale` returns the loss as it is and `step` is the optimizer's own step."""
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda" and dtype == "float16")


def scaled_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """backward + optimizer step through `scaler` (fp16: skipped when the scaled gradients overflow)."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def to_device(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def derive_seed(seed: int, *names: object) -> int:
    """A stable sub-seed per (stage, index): resuming a stage reproduces exactly what a full run does."""
    digest = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, *names: object, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode with gradients off for the parameters; restores both afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=False):
            p.requires_grad_(flag)
        model.train(was_training)
