"""Validation probe: how the relabel protocol (BatchNorm mode × forward split) changes the student.

Runs on the validation data only (default `fgsynth:seed=7`, whose test split plays validation).
Per teacher seed it trains the plain-CE teacher from the shipped base backbone, takes a random real
subset of `ipc` images per class, records its soft labels with each (BatchNorm mode, forward split)
pair and trains the identical student on each (same recorded crops, same student initialisation):
only the teacher's logits differ.

    .venv/bin/python bench/relabel_probe.py --ipc 3 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import log, make_ctx, teacher_weights_path  # noqa: E402
from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.evaluate import train_student  # noqa: E402
from fd2_core.stages.patches import random_real_indices  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402
from fd2_core.stages.relabel import relabel_all_epochs  # noqa: E402

PROTOCOLS = (("train", 2), ("eval", 1), ("train", 1), ("eval", 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fgsynth:seed=7", help="validation data source")
    parser.add_argument("--ipc", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "relabel_probe")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "relabel_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = teacher_weights_path({"teacher_init": "base"})
    data = load_dataset(args.data, 32, seed=0)
    results: dict[str, float] = {}
    for seed in args.seeds:
        base = {"preset": "cpu-small", "device": "cpu", "seed": seed, "method": "sre2l++", "ipc": args.ipc,
                "teacher_weights_mode": "backbone"}
        spec = resolve_spec(base)
        root = args.work / f"seed{seed}"
        teacher = pretrain(make_ctx(spec, data, root / "teacher", weights)).model
        idx = random_real_indices(make_ctx(spec, data, root), args.ipc, "baseline-subset").reshape(-1)
        images, labels = data.train_images[idx], data.train_labels[idx]
        for mode, splits in PROTOCOLS:
            protocol = {"relabel_bn_mode": mode, "relabel_forward_splits": splits}
            ctx = make_ctx(resolve_spec({**base, **protocol}), data, root)
            t = time.monotonic()
            path = root / f"soft_{mode}{splits}_ipc{args.ipc}.safetensors"
            soft = relabel_all_epochs(ctx, teacher, images, labels, path)
            acc = train_student(ctx, images, labels, soft, stream="student").accuracy
            results[f"seed{seed}/{mode}/{splits}"] = acc
            log(f"seed {seed}: bn {mode}, {splits} part(s): {acc:.3f} ({time.monotonic() - t:.0f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"data": args.data, "ipc": args.ipc, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
