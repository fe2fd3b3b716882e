"""Validation probe: the distillation step size at the benchmark's shortened schedule, in both protocols.

The published lr (1e-3 with patch initialisation) goes with 4 000–10 000 iterations; the quality benchmark runs
200 per ipc index on a CPU. This probe distils the sre2l++ and fd2 sets at several lrs on the validation data
only (default `fgsynth:seed=7`, whose test split plays validation) with the benchmark's own code
(`bench/quality.py`'s PairRunner: same teachers from the base backbone, same students) and reports both protocols
(end to end, images only) and how far the images moved from their initialisation (PSNR).

    .venv/bin/python bench/distill_lr_probe.py --lrs 0.001 0.01 0.05 --seeds 0 1 --ipcs 1 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import FULL, VARIANTS, PairRunner, log  # noqa: E402

PROBED = ("sre2l++", "fd2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fgsynth:seed=7", help="validation data source")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 5e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "distill_lr_probe")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "distill_lr_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    for seed in args.seeds:
        for lr in args.lrs:
            key = f"seed{seed}/lr{lr:g}"
            if key in out:
                continue
            cfg = {**FULL, "spec": {**FULL["spec"], "distill_lr": lr}, "ipcs": tuple(args.ipcs),
                   "hard_label_methods": ()}
            work = args.work / f"lr{lr:g}"
            shared = args.work / "teachers" / "val" / f"seed{seed}"
            for kind in ("ce", "cal"):  # teachers do not depend on the distill lr: train them once
                (shared / f"teacher-{kind}").mkdir(parents=True, exist_ok=True)
                link = work / "val" / f"seed{seed}" / f"teacher-{kind}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(shared / f"teacher-{kind}", target_is_directory=True)
            record: dict = {}
            runner = PairRunner("val", args.data, seed, cfg, work, record, lambda: None)
            record["methods"] = {v.name: runner.method(v) for v in VARIANTS if v.name in PROBED}
            out[key] = record
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
            for name, m in record["methods"].items():
                cells = {
                    p: [round(m[p][f"ipc{i}"]["soft"], 3) for i in args.ipcs] for p in ("end-to-end", "images-only")
                }
                log(f"{key} {name}: {cells}, PSNR {m['init_psnr_db']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
