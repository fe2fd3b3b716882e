"""Teacher stability: seed-to-seed spread of the teacher's backbone test accuracy, from scratch vs
from the base backbone (`fd2_core/models/base_backbone.py`), on the validation sets only.

The soft labels every method distils with are the teacher backbone's own logits, so the spread of
its accuracy across seeds (init, validation split, data order) bounds how small a method difference
the quality benchmark can see.
This script trains `cpu-small` teachers through the `pretrain` stage, the way
`bench/quality.py` does, for both teacher kinds (plain CE = method `sre2l++`, CAL =
method `fd2`) on the validation data (`fgsynth:seed=7`, birds and cars; never the
evaluated seed-0 sets), for several seeds and configurations, and reports the
backbone's test accuracy (mean ± sample std over seeds) and the wall time per teacher.

Configurations (`--configs`): `scratch` (random init, the old behaviour), `base` (every teacher
starts from the shipped base backbone, fresh classifier and CAL head), and variants of `base` with
the fine-tuning schedule changed (see CONFIGS).
Results are merged into `bench/results/teacher_stability.json` after every teacher (a re-run skips
teachers already there with the same configuration and weights file), so configurations can be
measured in separate, even concurrent, invocations.

    .venv/bin/python bench/teacher_stability.py
# scratch + base, 5 seeds .venv/bin/python bench/teacher_stability.py --configs
base-lr1e-3 --seeds 0,1,2,3,4 .venv/bin/python bench/teacher_stability.py
--report                         # print the table only """

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fd2_core.data.dataset import ImageDataset, load_dataset  # noqa: E402
from fd2_core.models.base_backbone import base_backbone_path  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.spec import JobSpec  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402

FORMAT = "fd2.teacher_stability.v1"
DEFAULT_OUT = ROOT / "bench" / "results" / "teacher_stability.json"
DEFAULT_WORK = ROOT / ".fd2" / "teacher_stability"

# name → dataset source: the validation sets (the evaluated birds-32 / cars-32 are seed 0)
SETTINGS: dict[str, str] = {"birds-val": "fgsynth:seed=7", "cars-val": "fgsynth:seed=7,variant=cars"}
METHODS: dict[str, str] = {"sre2l++": "CE", "fd2": "CAL"}

# name → (start from the base backbone?, spec overrides on top of cpu-small)
CONFIGS: dict[str, tuple[bool, dict[str, Any]]] = {
    "scratch": (False, {}),
    "base": (True, {}),
    "base-lr1e-3": (True, {"pretrain_lr": 1e-3}),
    "base-lr5e-4": (True, {"pretrain_lr": 5e-4}),
    "base-e10": (True, {"pretrain_epochs": 10}),
    "base-e30": (True, {"pretrain_epochs": 30}),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_ctx(spec: JobSpec, data: ImageDataset, workdir: Path, teacher_weights: Path | None) -> RunContext:
    """As bench/quality.py builds it: CPU, no progress sink, the teacher's initial weights."""
    return RunContext(spec=spec, data=data, workdir=workdir, device=torch.device("cpu"),
                      tracker=ProgressTracker({}, None, None), teacher_weights=teacher_weights)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-merge-write of the result file between concurrent invocations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_results(path: Path) -> dict[str, Any]:
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("format") == FORMAT:
            return stored
    return {"format": FORMAT, "runs": {}}


def write_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def run_key(config: str, setting: str, method: str, seed: int) -> str:
    return f"{config}|{setting}|{method}|seed{seed}"


def stats(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n − 1) in percent, with the range."""
    pct = [100.0 * v for v in values]
    return {
        "n": len(pct), "mean": round(statistics.fmean(pct), 2),
        "std": round(statistics.stdev(pct), 2) if len(pct) > 1 else float("nan"),
        "min": round(min(pct), 2), "max": round(max(pct), 2),
    }


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """config → setting → method → backbone / combined test accuracy stats
    and mean time per teacher."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key, run in runs.items():
        config, setting, method, _ = key.split("|")
        groups.setdefault((config, setting, method), []).append(run)
    out: dict[str, Any] = {}
    for (config, setting, method), items in sorted(groups.items()):
        entry = {
            "seeds": sorted(r["seed"] for r in items),
            "backbone_test": stats([r["backbone_test_accuracy"] for r in items]),
            "teacher_test": stats([r["test_accuracy"] for r in items]),
            "time_s": round(statistics.fmean(r["time_s"] for r in items), 1),
            "cpu_s": round(statistics.fmean(r.get("cpu_s", r["time_s"]) for r in items), 1),
        }
        out.setdefault(config, {}).setdefault(setting, {})[method] = entry
    return out


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per (config, setting, method)."""
    lines = [
        "| config | setting | teacher | backbone test % (mean ± std) | min–max | seeds | CPU time / teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, settings in summary.items():
        for setting, methods in settings.items():
            for method, e in methods.items():
                b = e["backbone_test"]
                lines.append(
                    f"| {config} | {setting} | {METHODS.get(method, method)} ({method}) | "
                    f"{b['mean']:.1f} ± {b['std']:.1f} | {b['min']:.0f}–{b['max']:.0f} | {b['n']} | "
                    f"{e['cpu_s']:.0f} s |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="scratch,base", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--weights", type=Path, default=None, help="base backbone file (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the table of stored results and stop")
    args = parser.parse_args(argv)

    if args.report:
        with locked(args.out):
            print(table(summarise(read_results(args.out)["runs"])))
        return 0
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    weights = args.weights or (base_backbone_path() if any(CONFIGS[c][0] for c in configs) else None)
    weights_sha = sha256_of(weights) if weights else None

    for setting in settings:
        data = load_dataset(SETTINGS[setting], 32)
        for config in configs:
            use_base, overrides = CONFIGS[config]
            identity = {"overrides": overrides, "weights_sha256": weights_sha if use_base else None}
            for method in methods:
                for seed in seeds:
                    key = run_key(config, setting, method, seed)
                    with locked(args.out):
                        stored = read_results(args.out)["runs"].get(key)
                    if stored and stored.get("identity") == identity:
                        continue
                    spec = resolve_spec({"preset": "cpu-small", "device": "cpu", "method": method, "seed": seed,
                                         "teacher_weights_mode": "backbone", **overrides})
                    work = args.work / config / setting / method / f"seed{seed}"
                    # a fresh run: the time must be the real one
                    shutil.rmtree(work, ignore_errors=True)
                    load_before = os.getloadavg()[0]
                    t, cpu = time.monotonic(), time.process_time()
                    info = pretrain(make_ctx(spec, data, work, weights if use_base else None)).info
                    elapsed, cpu_s = time.monotonic() - t, time.process_time() - cpu
                    shutil.rmtree(work, ignore_errors=True)
                    run = {
                        "identity": identity, "seed": seed, "source": data.source,
                        "backbone_test_accuracy": info["backbone_test_accuracy"],
                        "test_accuracy": info["test_accuracy"], "val_accuracy": info["val_accuracy"],
                        "best_epoch": max(range(len(info["history"])),
                                          key=lambda i: (info["history"][i]["val_accuracy"], i)),
                        "val_history": [round(h["val_accuracy"], 4) for h in info["history"]],
                        "time_s": round(elapsed, 1), "cpu_s": round(cpu_s, 1), "load_before": round(load_before, 2),
                        "load_after": round(os.getloadavg()[0], 2),
                    }
                    with locked(args.out):
                        results = read_results(args.out)
                        results["runs"][key] = run
                        results["configs"] = {
                            name: {"base_backbone": use, "overrides": o} for name, (use, o) in CONFIGS.items()
                        }
                        if weights:
                            results["base_backbone"] = {"path": os.path.relpath(weights, ROOT),
                                                        "sha256": weights_sha}
                        results["environment"] = {"torch": torch.__version__, "threads": args.threads,
                                                  "python": platform.python_version(), "cpus": os.cpu_count()}
                        results["summary"] = summarise(results["runs"])
                        write_results(args.out, results)
                    log(f"{config} {setting} {method} seed {seed}: backbone test {run['backbone_test_accuracy']:.3f}"
                        f" (teacher {run['test_accuracy']:.3f}), {elapsed:.0f} s")
    with locked(args.out):
        print(table(summarise(read_results(args.out)["runs"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
