"""Time one full FD² distill iteration against the bare teacher forward+backward, side by side.

Full iteration = augmentation (crop/flip/roll) + teacher forward with BatchNorm hooks + CAL head +
CE + BN matching + FC + SC + backward to the images + Adam step + clamp.
Bare pass = the backbone's forward and CE backward to the same images.
Both are timed interleaved in one process, so machine noise hits both.
The FADRM+ rows time the committee step: one member per step in turn (round
robin over a committee of four), against the bare pass of the same member,
at the phase side the row names (AMP on CUDA when the spec has it).

    python bench/distill_step.py [--rounds 7] [--iters 5] [--threads N] [--device cpu|cuda]
[--fadrm-size S] [--distill-crop batch|image]

`--distill-crop` times the FD² rows with one crop box for the batch or one
per image (default: the spec's).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd2_core.data.dataset import ImageDataset  # noqa: E402
from fd2_core.losses import BNStatMatcher  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.runtime import frozen  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.committee import member_context  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.synthesis import StepModel, committee_step, distill_step, step_models  # noqa: E402
from fd2_core.stages.teacher import new_teacher  # noqa: E402

SETTINGS = [("resnet18", 100), ("convnet", 20)]


def fake_data(num_classes: int, size: int) -> ImageDataset:
    empty = torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return ImageDataset(
        classes=[f"c{i}" for i in range(num_classes)],
        train_images=torch.zeros(num_classes, 3, size, size, dtype=torch.uint8),
        train_labels=torch.arange(num_classes),
        test_images=empty,
        test_labels=torch.zeros(0, dtype=torch.long),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        errors=[],
        source="bench",
    )


def timed(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of `fn` over `iters` calls, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def measure(
    backbone: str, num_classes: int, device: str, rounds: int, iters: int, distill_crop: str | None = None
) -> dict[str, float]:
    crop = {"distill_crop": distill_crop} if distill_crop else {}
    spec = resolve_spec({"backbone": backbone, "image_size": 32, "model_width": 128, "device": device, **crop})
    ctx = RunContext(spec, fake_data(num_classes, 32), Path("."), torch.device(device), ProgressTracker({}, None, None))
    torch.manual_seed(0)
    teacher = new_teacher(ctx)
    with torch.no_grad():
        teacher.cal_head.prototypes.copy_(F.normalize(torch.randn_like(teacher.cal_head.prototypes), dim=1))
    y = torch.arange(num_classes, device=ctx.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_classes, 3, 32, 32, device=ctx.device, requires_grad=True)
    with torch.no_grad():
        prev = teacher.eval()(x).cal.attention.float()[None]  # one previous ipc index → SC active
    optimizer = torch.optim.Adam([x], lr=0.05, betas=(0.5, 0.9))
    bounds = ctx.pixel_bounds()

    def bare() -> None:
        with ctx.autocast():
            logits = teacher.backbone.forward_head(teacher.backbone.forward_features(x))
        loss = F.cross_entropy(logits.float(), y)
        x.grad = None
        loss.backward()

    def full(bn: BNStatMatcher) -> None:
        distill_step(ctx, teacher, x, y, prev, bn, optimizer, g, bounds)

    bare_times, full_times = [], []
    with frozen(teacher):
        bare(), bare()
        with BNStatMatcher(teacher.bn_layers(), spec.first_bn_multiplier) as bn:
            full(bn), full(bn)
        for _ in range(rounds):
            bare_times.append(timed(bare, ctx.device, iters))
            with BNStatMatcher(teacher.bn_layers(), spec.first_bn_multiplier) as bn:
                full_times.append(timed(lambda: full(bn), ctx.device, iters))
    b, f = statistics.median(bare_times), statistics.median(full_times)
    return {"bare_ms": 1000 * b, "full_ms": 1000 * f, "ratio": f / b}


FADRM_COMMITTEES = {"cpu": ["convnet"] * 4, "cuda": ["resnet18", "mobilenetv2", "resnet50", "densenet121"]}


def measure_fadrm(device: str, size: int, num_classes: int, rounds: int, iters: int) -> dict[str, float]:
    """Per-step time of the FADRM+ + FD² committee step (round robin over
    four members) and of the bare pass of the same member, cycling the
    members alike; SC active (one earlier ipc index per member)."""
    spec = resolve_spec({"preset": "paper-cub-fadrm", "image_size": size, "device": device, "model_width": 128,
                         "committee": FADRM_COMMITTEES[device], "torchvision_weights": False})
    ctx = RunContext(spec, fake_data(num_classes, size), Path("."), torch.device(device),
                     ProgressTracker({}, None, None))
    torch.manual_seed(0)
    members = [member_context(ctx, i) for i in range(len(spec.members))]
    teachers = [new_teacher(m) for m in members]
    y = torch.arange(num_classes, device=ctx.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_classes, 3, size, size, device=ctx.device, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    bounds = ctx.pixel_bounds()
    step = [0]

    def bare() -> None:
        teacher = teachers[step[0] % len(teachers)]
        step[0] += 1
        with ctx.autocast():
            logits = teacher.backbone.forward_head(teacher.backbone.forward_features(x))
        x.grad = None
        F.cross_entropy(logits.float(), y).backward()

    bare_times, full_times = [], []
    for t in teachers:
        t.eval().requires_grad_(False)
    with torch.no_grad():
        prev = [t(x).cal.attention.float()[None] for t in teachers]
    with contextlib.ExitStack() as stack:
        matchers = [stack.enter_context(BNStatMatcher(t.bn_layers(), spec.first_bn_multiplier)) for t in teachers]
        models = [StepModel(t, bn, p, size, c) for t, bn, p, c in zip(teachers, matchers, prev, members, strict=True)]

        def full() -> None:
            committee_step(ctx, step_models(models, step[0], True), x, y, optimizer, g, bounds)
            step[0] += 1

        for _ in range(len(teachers)):
            bare(), full()
        for _ in range(rounds):
            bare_times.append(timed(bare, ctx.device, iters))
            full_times.append(timed(full, ctx.device, iters))
    b, f = statistics.median(bare_times), statistics.median(full_times)
    return {"bare_ms": 1000 * b, "full_ms": 1000 * f, "ratio": f / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fadrm-size", type=int, default=0, help="FADRM+ row side; 0 = 32 on cpu, 224 on cuda")
    parser.add_argument("--fadrm-classes", type=int, default=0, help="FADRM+ batch classes; 0 = 20 cpu, 100 cuda")
    parser.add_argument("--distill-crop", choices=("batch", "image"), default=None,
                        help="one crop box per batch or per image in the FD² rows; default: the spec's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'setting':<22} {'bare fwd+bwd':>13} {'FD² iteration':>14} {'ratio':>7}")
    for backbone, k in SETTINGS:
        r = measure(backbone, k, args.device, args.rounds, args.iters, args.distill_crop)
        print(f"{backbone + ' / ' + str(k) + ' classes':<22} {r['bare_ms']:>10.1f} ms {r['full_ms']:>11.1f} ms "
              f"{r['ratio']:>6.2f}x")
    size = args.fadrm_size or (224 if args.device == "cuda" else 32)
    k = args.fadrm_classes or (100 if args.device == "cuda" else 20)
    committee = "+".join(FADRM_COMMITTEES[args.device])
    r = measure_fadrm(args.device, size, k, args.rounds, args.iters)
    print(f"FADRM+ + FD² committee step ({committee}, round robin), {k} classes at {size} px: bare "
          f"{r['bare_ms']:.1f} ms, step {r['full_ms']:.1f} ms, {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
