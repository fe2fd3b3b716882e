"""GPU check: pretrain, distill and relabel at 224 px with ResNet-18, fp32 vs bf16 autocast.

Runs the real pipeline stages on the built-in data and prints
images·iterations/s per stage and the peak GPU memory.
Used once per GPU machine; figures go to docs/BENCHMARKS.md.

    python bench/gpu_check.py [--classes 20] [--train 40] [--distill-iters 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.pipeline import run  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--distill-iters", type=int, default=300)
    parser.add_argument("--relabel-epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    parser.add_argument("--out", default="/tmp/fd2-gpu-check")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    assert not cuda or torch.cuda.is_available(), "no CUDA device"
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    data = load_dataset(f"fgsynth:classes={args.classes},size={args.size},train={args.train},test=4,seed=0", args.size)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {name}, torch {torch.__version__}; "
          f"data {len(data.classes)} classes × {args.train} train at {args.size} px in {time.perf_counter() - t:.1f}s")
    rows = []
    for amp in (False, True) if cuda else (False,):
        spec = resolve_spec({
            "preset": "paper-cub", "torchvision_weights": False, "device": args.device, "amp": amp,
            "image_size": args.size,
            "ipc": args.ipc, "pretrain_epochs": args.pretrain_epochs, "pretrain_batch_size": 32,
            "pretrain_optimizer": "adamw", "pretrain_lr": 1e-3, "pretrain_lr_decay": 0.0,
            "distill_iterations": args.distill_iters, "relabel_epochs": args.relabel_epochs,
            "evaluate": False, "eval_random_baseline": False, "test_fraction": 0.2,
        })
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = run(spec, data, Path(args.out) / ("bf16" if amp else "fp32"))
        tm = result.report["timings_s"]
        n_train = int(result.report["teacher"]["train_images"])
        k = len(data.classes)
        row = {
            "precision": "bf16 autocast + channels_last" if amp else "fp32",
            "pretrain_img_per_s": args.pretrain_epochs * n_train / tm["pretrain"],
            "distill_img_iter_per_s": args.ipc * k * args.distill_iters / tm["distill"],
            "relabel_img_per_s": args.relabel_epochs * args.ipc * k / tm["relabel"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "timings_s": tm,
        }
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'precision':<32} {'pretrain img/s':>15} {'distill img·it/s':>17} {'relabel img/s':>14} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['precision']:<32} {r['pretrain_img_per_s']:>15.1f} {r['distill_img_iter_per_s']:>17.1f} "
              f"{r['relabel_img_per_s']:>14.1f} {r['peak_gib']:>9.2f}")


if __name__ == "__main__":
    main()
