"""A short FADRM+ + FD² distillation with a committee, timed per phase: images·iterations per second
and peak accelerator memory, in fp32 and in mixed precision (bfloat16; float16 with the gradient
scaler), side by side in one process.

The committee is pretrained once (briefly: the timing of a distillation step does not depend on how
good the teachers are) on the built-in fine-grained data, then the distill stage runs once per
precision on the same teachers, with `--steps` steps in each of the four phases (published sides
200/224/200/224 at 224 px), one member per step (round robin).
Per phase: wall time, steps, images per step (the classes of the batch), img·it/s = images × steps /
seconds, and the peak memory (CUDA only).

    python bench/fadrm_run.py [--size 224] [--classes 20] [--steps 200]
[--device cuda] [--json out.json] python bench/fadrm_run.py --size 32
--classes 4 --steps 2 --device cpu --committee convnet,convnet  # smoke """

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fd2_core.stages.fadrm_phases as fadrm_phases  # noqa: E402
from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.presets import PAPER_COMMITTEE  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.runtime import pick_device  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.distill import distill  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402

PRECISIONS = {"fp32": {"amp": False}, "bf16": {"amp": True, "amp_dtype": "bfloat16"},
              "fp16+scaler": {"amp": True, "amp_dtype": "float16"}}


def _spec(args: argparse.Namespace, **extra: Any):
    return resolve_spec({
        "preset": "paper-cub-fadrm", "device": args.device, "image_size": args.size, "ipc": 1,
        "committee": args.committee.split(","), "torchvision_weights": False, "pretrain_epochs": 1,
        "pretrain_batch_size": 16, "fadrm_phase_steps": [args.steps] * 4, "distill_batch_classes": 0,
        "evaluate": False, "model_width": 32, **extra,
    })


def _timed_phases(device: torch.device, log: list[dict[str, Any]]):
    """Wrap the phase runner: wall time (synchronised) and peak memory of each phase."""
    original = fadrm_phases.run_phase

    def timed(ctx, models, x, y, phase, g, total, on_step):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = original(ctx, models, x, y, phase, g, total, on_step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        log.append({"size": phase.size, "steps": phase.steps, "images": int(x.shape[0]), "seconds": seconds,
                    "img_it_per_s": x.shape[0] * phase.steps / seconds, "peak_gib": peak})
        return out

    return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--train", type=int, default=16, help="train images per class")
    parser.add_argument("--steps", type=int, default=200, help="steps per phase (four phases)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--committee", default=",".join(PAPER_COMMITTEE))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="fadrm-run-"))
    source = f"fgsynth:classes={args.classes},size={args.size},train={args.train},test=2,seed=0"
    dataset = load_dataset(source, args.size, seed=0)
    tracker = ProgressTracker({}, None, None)
    base = _spec(args)
    ctx = RunContext(base, dataset, work / "run", device, tracker)
    start = time.perf_counter()
    committee = pretrain(ctx)
    pretrain_s = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}; committee {args.committee} pretrained (1 epoch) in "
          f"{pretrain_s:.1f} s; {args.classes} classes at {args.size} px, {args.steps} steps per phase")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "size": args.size,
                               "classes": args.classes, "committee": args.committee.split(","),
                               "steps_per_phase": args.steps, "pretrain_s": pretrain_s, "precisions": {}}
    # the warm-up pays for kernel selection, untimed
    for label in ["warm-up", *args.precisions.split(",")]:
        warm = label == "warm-up"
        spec = _spec(args, fadrm_phase_steps=[3] * 4, amp=True) if warm else _spec(args, **PRECISIONS[label])
        run_ctx = RunContext(spec, dataset, work / f"distill-{label}", device, tracker)
        # the same teachers, run under this precision
        for i, member in enumerate(committee.members):
            member.ctx = RunContext(spec.member_spec(i), dataset, member.ctx.workdir, device, tracker)
        log: list[dict[str, Any]] = []
        original = fadrm_phases.run_phase
        fadrm_phases.run_phase = _timed_phases(device, log)
        try:
            distill(run_ctx, committee)
        finally:
            fadrm_phases.run_phase = original
        if warm:
            continue
        results["precisions"][label] = log
        for p, row in enumerate(log):
            peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "n/a"
            print(f"{label:<12} phase {p + 1} at {row['size']:>3} px: {row['steps']} steps x {row['images']} images "
                  f"in {row['seconds']:.2f} s = {row['img_it_per_s']:.1f} img·it/s, peak {peak}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
