"""Precision of the distill step: bf16 autocast against fp32 on the same images, teacher and crops.

The published SRe²L++ (+ FD²) distillation runs in fp32; the paper presets follow it (`amp: false`).
This probe says what bf16 would change, at the paper's 224 px with ResNet-18:
- one step: the cosine between the bf16 and the fp32 pixel gradients of the full FD² loss (CE, BN
  matching, FC, SC), and the share of pixels whose gradient sign differs (Adam's first step moves a
  pixel by about lr·sign(g), so that is the share that moves the other way);
- a short run: `--steps` distill steps from the same start with the same random draws at each
  precision, and the PSNR (dB, pixels in [0, 1]) between the two results.
The teacher is a fresh ResNet-18 whose BatchNorm statistics come from a few train-mode passes over
the built-in data (no weights are downloaded).
One seed: a measurement, not a verdict.
On a CPU, `--device cpu` emulates bf16 with CPU autocast (slow at 224 px:
use `--size 32 --classes 8` for a smoke run).

    python bench/precision_probe.py [--device cuda] [--size 224] [--classes
100] [--steps 50] [--out FILE] """

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.losses import BNStatMatcher  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.runtime import frozen  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.synthesis import ADAM_BETAS, ADAM_EPS, distill_augment, distill_loss, distill_step  # noqa: E402
from fd2_core.stages.teacher import new_teacher  # noqa: E402


@dataclass
class EmulatedContext(RunContext):
    """A run context whose autocast is bf16 on any device (CUDA autocast,
    or CPU autocast to emulate it)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _contexts(args: argparse.Namespace):
    spec = resolve_spec({"preset": "paper-cub", "torchvision_weights": False, "device": args.device,
                         "image_size": args.size, "amp": False})
    data = load_dataset(f"fgsynth:classes={args.classes},size={args.size},train=4,test=1,seed=0", args.size)
    device, tracker = torch.device(args.device), ProgressTracker({}, None, None)
    fp32 = RunContext(spec, data, Path(args.work), device, tracker)
    bf16 = EmulatedContext(spec, data, Path(args.work), device, tracker)
    return fp32, bf16


def _teacher(ctx: RunContext) -> torch.nn.Module:
    """A fresh teacher with BatchNorm statistics of the real images and unit-norm prototypes."""
    torch.manual_seed(0)
    teacher = new_teacher(ctx)
    x = ctx.normalize(ctx.data.train_images)
    teacher.train()
    with torch.no_grad():
        for bn in teacher.bn_layers():
            bn.momentum = None  # a cumulative average over the passes below
        for start in range(0, x.shape[0], 32):
            teacher(x[start : start + 32])
        if teacher.cal_head is not None:
            prototypes = teacher.cal_head.prototypes
            prototypes.copy_(F.normalize(torch.randn_like(prototypes), dim=1))
    return teacher.eval()


def _gradient(ctx: RunContext, teacher, x0: torch.Tensor, y: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The pixel gradient of one step's full loss, with the crops of a fixed seed."""
    x = x0.clone().requires_grad_(True)
    with BNStatMatcher(teacher.bn_layers(), ctx.spec.first_bn_multiplier) as bn:
        loss, _ = distill_loss(ctx, teacher, distill_augment(ctx, x, torch.Generator().manual_seed(1)), y, prev, bn)
        loss.backward()
    return x.grad.detach().float()


def _short_run(ctx: RunContext, teacher, x0: torch.Tensor, y: torch.Tensor, prev, steps: int) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=ctx.spec.distill_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    g = torch.Generator().manual_seed(2)
    with BNStatMatcher(teacher.bn_layers(), ctx.spec.first_bn_multiplier) as bn:
        for it in range(steps):
            optimizer.param_groups[0]["lr"] = 0.5 * ctx.spec.distill_lr * (1 + math.cos(math.pi * it / steps))
            distill_step(ctx, teacher, x, y, prev, bn, optimizer, g, ctx.pixel_bounds())
    return ctx.denormalize(x.detach().float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--work", default="/tmp/fd2-precision-probe")
    parser.add_argument("--out", default="", help="write the figures as JSON here too")
    args = parser.parse_args()
    t0 = time.perf_counter()
    fp32, bf16 = _contexts(args)
    teacher = _teacher(fp32)
    y = torch.arange(args.classes, device=fp32.device)
    # start from real images, as the patch initialisation does, not from noise
    x0 = fp32.normalize(fp32.data.train_images[torch.arange(args.classes) * 4])
    with frozen(teacher), torch.no_grad():
        prev = teacher(x0.flip(-1)).cal.attention.float()[None]  # one earlier index: SC active
    with frozen(teacher):
        g32, g16 = _gradient(fp32, teacher, x0, y, prev), _gradient(bf16, teacher, x0, y, prev)
        cosine = F.cosine_similarity(g32.flatten(), g16.flatten(), dim=0).item()
        sign_flip = (torch.sign(g32) != torch.sign(g16)).float().mean().item()
        a, b = (_short_run(c, teacher, x0, y, prev, args.steps) for c in (fp32, bf16))
    mse = (a - b).square().mean().item()
    result = {
        "device": torch.cuda.get_device_name() if fp32.device.type == "cuda" else "cpu (bf16 emulated)",
        "torch": torch.__version__, "size": args.size, "classes": args.classes, "steps": args.steps,
        "grad_cosine_bf16_fp32": cosine, "pixels_moving_differently": sign_flip,
        "short_run_psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
