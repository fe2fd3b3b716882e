"""Quality benchmark: top-1 of a student trained on each method's distilled set, on the real test split.

Methods: `random`, `sre2l++`, `fd2` and the ablations fd2 − FC, fd2 − SC, fd2 − CAL, at IPC 1, 3 and 5, on two
fine-grained settings of the built-in data (FGSynth birds and FGSynth cars, 32 px), several seeds each. Every
method is evaluated with the identical student protocol: the same student network and initialisation, the same
epochs, the same recorded augmentations (crop boxes, flips, CutMix, replayed from the soft-label file), and soft
labels from the teacher the method distilled with. Also reported per setting and seed: the same student on
hard labels only (same replayed augmentations, CE on the true classes), and the same student trained on the
whole real train set (the upper bound).

Work is shared, not repeated:
- teachers are trained once per (setting, seed): the CAL teacher serves fd2, fd2 − FC, fd2 − SC; the
  plain-CE teacher serves sre2l++, random and fd2 − CAL;
- each method is distilled once at the largest IPC; the IPC-k set is its first k ipc indices, which is exactly
  what a run with ipc=k produces (index j is seeded by (seed, j) and SC only looks at indices < j);
- fd2 − CAL switches off CAL and, because FC and SC need the CAL head (its prototypes and attention maps),
  FC and SC too: it runs the same code path as sre2l++ (same teacher, same losses, same seeds), so its
  numbers are those of sre2l++ and are reused (run with `--no-reuse` to recompute them and see).

Stage outputs land under `--work` (default .fd2/quality_work, git-ignored); a re-run resumes from finished stages.
Results: bench/results/quality_<mode>.json, a table in docs/BENCHMARKS.md and a plot of accuracy vs IPC.

    .venv/bin/python bench/quality.py            # full grid, about 70 minutes on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # smoke run, under 10 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fd2_core.augment import train_augment  # noqa: E402
from fd2_core.data.dataset import ImageDataset, load_dataset  # noqa: E402
from fd2_core.models import build_model  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.runtime import generator, to_device  # noqa: E402
from fd2_core.spec import JobSpec, resolve_spec  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.distill import distill  # noqa: E402
from fd2_core.stages.evaluate import train_student  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402
from fd2_core.stages.relabel import relabel  # noqa: E402
from fd2_core.stages.teacher import accuracy  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]


VARIANTS: tuple[Variant, ...] = (
    Variant("random", {"method": "random"}),
    Variant("sre2l++", {"method": "sre2l++"}),
    Variant("fd2", {"method": "fd2"}),
    Variant("fd2 − FC", {"method": "fd2", "fc": False}),
    Variant("fd2 − SC", {"method": "fd2", "sc": False}),
    Variant("fd2 − CAL", {"method": "fd2", "cal": False, "fc": False, "sc": False}),
)

# name → (dataset source, short description)
SETTINGS: dict[str, tuple[str, str]] = {
    "birds-32": ("fgsynth", "FGSynth birds, 20 classes, 150 train / 50 test per class, 32 px (the default set)"),
    "cars-32": ("fgsynth:variant=cars", "FGSynth cars, 20 classes, 150 train / 50 test per class, 32 px"),
}

# The paper runs 10 000 distill iterations and 400 relabel epochs at 224 px on a GPU. Here the teacher keeps the
# cpu-small schedule (it must be good for the comparison to mean anything) and the other stages are scaled down.
FULL = {
    "spec": {"distill_iterations": 200, "relabel_epochs": 300},
    "ipcs": (1, 3, 5),
    "seeds": (0, 1, 2),
    "settings": ("birds-32", "cars-32"),
    "classes": None,
    "upper_bound_epochs": None,  # None = the teacher's pretrain_epochs
}
QUICK = {
    "spec": {"distill_iterations": 100, "relabel_epochs": 150},
    "ipcs": (1, 3, 5),
    "seeds": (0,),
    "settings": ("birds-32", "cars-32"),
    "classes": 10,
    "upper_bound_epochs": None,
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "-", text.lower()).strip("-")


def effective_key(spec: JobSpec) -> tuple[bool, bool, bool, bool]:
    """What a method actually runs: two variants with the same key run identical code with identical seeds."""
    return (spec.method == "random", spec.uses_cal, spec.uses_fc, spec.uses_sc)


def make_ctx(spec: JobSpec, data: ImageDataset, workdir: Path) -> RunContext:
    tracker = ProgressTracker({}, None, None)
    return RunContext(spec=spec, data=data, workdir=workdir, device=torch.device("cpu"), tracker=tracker)


def quantize(ctx: RunContext, synthetic: torch.Tensor) -> torch.Tensor:
    """Normalised [ipc, K, 3, S, S] → uint8 [ipc·K, 3, S, S] (index-major), as the pipeline stores them."""
    flat = synthetic.reshape(-1, *synthetic.shape[2:])
    return (ctx.denormalize(flat) * 255.0).round().to(torch.uint8).cpu()


def train_full_real(ctx: RunContext, epochs: int) -> float:
    """Upper bound: the same student network trained with hard labels on every real train image (validation share
    included) with the recipe calibrated for full real data, the teacher's: AdamW at pretrain_lr and
    pretrain_weight_decay, cosine, `epochs` passes at `pretrain_batch_size`, shift + flip augmentation. Top-1 on
    the real test split; the last epoch counts (no checkpoint selection)."""
    spec, data = ctx.spec, ctx.data
    torch.manual_seed(int(generator(spec.seed, "student-init", "full-real").initial_seed() & 0x7FFFFFFF))
    student = build_model(spec.student, ctx.num_classes, spec.image_size, cal=False, width=spec.model_width)
    student = to_device(student, ctx.device, channels_last=False)
    student.train()
    lr = spec.pretrain_lr
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=spec.pretrain_weight_decay)
    n, bs = data.train_images.shape[0], spec.pretrain_batch_size
    steps_per_epoch = max(1, n // bs)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        g = generator(spec.seed, "full-real", epoch)
        for x, y in ctx.iterate(data.train_images, data.train_labels, bs, g, drop_last=True):
            optimizer.param_groups[0]["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / max(total, 1)))
            loss = F.cross_entropy(student(train_augment(x, g)).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return accuracy(student, ctx, data.test_images, data.test_labels)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_setting_seed(
    setting: str,
    source: str,
    seed: int,
    cfg: dict[str, Any],
    work: Path,
    variants: tuple[Variant, ...] = VARIANTS,
    reuse: bool = True,
) -> dict[str, Any]:
    """Every method at every IPC for one (setting, seed); returns the records of the result file."""
    ipcs = tuple(sorted(cfg["ipcs"]))
    base = {"preset": "cpu-small", "device": "cpu", "seed": seed, "ipc": ipcs[-1], **cfg["spec"]}
    if cfg["classes"]:
        source = f"{source}{',' if ':' in source else ':'}classes={cfg['classes']}"
    probe = resolve_spec(base)
    data = load_dataset(source, probe.image_size, seed=0, test_fraction=probe.test_fraction)
    root = work / setting / f"seed{seed}"
    out: dict[str, Any] = {
        "setting": setting, "seed": seed, "source": source, "num_classes": len(data.classes), "teachers": {},
        "methods": {},
    }

    teachers: dict[bool, Any] = {}
    for cal in (True, False):
        spec = resolve_spec({**base, "method": "fd2" if cal else "sre2l++"})
        kind = "cal" if cal else "ce"
        t = time.monotonic()
        result = pretrain(make_ctx(spec, data, root / f"teacher-{kind}"))
        teachers[cal] = result.model
        out["teachers"][kind] = {
            "test_accuracy": result.info["test_accuracy"],
            "val_accuracy": result.info["val_accuracy"],
            "backbone_test_accuracy": result.info["backbone_test_accuracy"],
            "time_s": round(time.monotonic() - t, 1),
        }
        log(f"{setting} seed {seed}: {kind} teacher test {result.info['test_accuracy']:.3f}")

    done: dict[tuple, str] = {}
    for variant in variants:
        spec = resolve_spec({**base, **variant.overrides})
        key = effective_key(spec)
        if reuse and key in done:
            out["methods"][variant.name] = {**out["methods"][done[key]], "same_as": done[key]}
            log(f"{setting} seed {seed}: {variant.name} runs the same code as {done[key]}; reusing it")
            continue
        teacher = teachers[spec.uses_cal]
        wd = root / slug(variant.name)
        ctx = make_ctx(spec, data, wd)
        t = time.monotonic()
        synthetic = distill(ctx, None if spec.method == "random" else teacher)
        distill_s = time.monotonic() - t
        images = quantize(ctx, synthetic)
        k = ctx.num_classes
        record: dict[str, Any] = {"teacher": "cal" if spec.uses_cal else "ce", "distill_s": round(distill_s, 1)}
        student_s = 0.0
        for ipc in ipcs:
            ctx_k = make_ctx(resolve_spec({**base, **variant.overrides, "ipc": ipc}), data, wd)
            imgs, labels = images[: ipc * k], torch.arange(k).repeat(ipc)
            t = time.monotonic()
            soft = relabel(ctx_k, teacher, imgs, labels, wd / f"soft_labels_ipc{ipc}.safetensors")
            soft_acc = train_student(ctx_k, imgs, labels, soft, stream="student")
            hard_acc = train_student(ctx_k, imgs, labels, soft, stream="student", hard_labels=True)
            student_s += time.monotonic() - t
            record[f"ipc{ipc}"] = {"soft": soft_acc, "hard": hard_acc}
            log(f"{setting} seed {seed}: {variant.name} ipc {ipc}: soft {soft_acc:.3f} hard {hard_acc:.3f}")
        record["student_s"] = round(student_s, 1)
        out["methods"][variant.name] = record
        done.setdefault(key, variant.name)

    spec = resolve_spec({**base, "method": "sre2l++"})
    epochs = cfg["upper_bound_epochs"] or spec.pretrain_epochs
    t = time.monotonic()
    out["upper_bound"] = {
        "accuracy": train_full_real(make_ctx(spec, data, root / "full-real"), epochs),
        "epochs": epochs,
        "time_s": round(time.monotonic() - t, 1),
    }
    log(f"{setting} seed {seed}: full real train set {out['upper_bound']['accuracy']:.3f}")
    return out


# ---------------------------------------------------------------- summary, table, plot


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [100.0 * v for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.1f} ± {s:.1f}"


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per setting: mean/std over seeds of every method × ipc (soft and hard), teachers, upper bound, times."""
    summary: dict[str, Any] = {}
    for setting in results["settings"]:
        runs = [r for r in results["runs"] if r["setting"] == setting]
        if not runs:
            continue
        entry: dict[str, Any] = {"methods": {}, "teachers": {}, "upper_bound": None}
        for name in results["methods"]:
            rows = [r["methods"][name] for r in runs if name in r["methods"]]
            if not rows:
                continue
            m: dict[str, Any] = {"same_as": rows[0].get("same_as")}
            for ipc in results["ipcs"]:
                for label in ("soft", "hard"):
                    vals = [row[f"ipc{ipc}"][label] for row in rows]
                    m[f"ipc{ipc}_{label}"] = {"values": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1]}
            m["time_s"] = statistics.fmean(row["distill_s"] + row["student_s"] for row in rows)
            m["teacher"] = rows[0]["teacher"]
            entry["methods"][name] = m
        for kind in ("cal", "ce"):
            vals = [r["teachers"][kind]["test_accuracy"] for r in runs]
            entry["teachers"][kind] = {
                "values": vals,
                "mean": mean_std(vals)[0],
                "std": mean_std(vals)[1],
                "time_s": statistics.fmean(r["teachers"][kind]["time_s"] for r in runs),
            }
        vals = [r["upper_bound"]["accuracy"] for r in runs]
        entry["upper_bound"] = {
            "values": vals,
            "mean": mean_std(vals)[0],
            "std": mean_std(vals)[1],
            "time_s": statistics.fmean(r["upper_bound"]["time_s"] for r in runs),
            "epochs": runs[0]["upper_bound"]["epochs"],
        }
        summary[setting] = entry
    return summary


def markdown(results: dict[str, Any], plot_rel: str | None) -> str:
    ipcs = results["ipcs"]
    summary = results["summary"]
    lines = [
        f"Command ({results['date']}, {results['environment']['cpu']}, {results['environment']['threads']} torch "
        f"threads, torch {results['environment']['torch']}; load average {results['load_average_start']} at the "
        f"start, {results['load_average_end']} at the end; {results['total_s'] / 60:.1f} min in all):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Seeds {', '.join(map(str, results['seeds']))}"
        + (" (one seed: ± 0.0 is no spread)" if len(results["seeds"]) == 1 else "")
        + f"; mean ± std top-1 (%) on the real test split. Spec: "
        f"`cpu-small` with {', '.join(f'{k}={v}' for k, v in results['spec_overrides'].items())}"
        + (f"; {results['classes']} classes per setting" if results["classes"] else "")
        + f"; the full-real-set student trains for {results['upper_bound_epochs_note']}.",
        "",
    ]
    for setting, entry in summary.items():
        n_classes = results["num_classes"][setting]
        head = " | ".join(f"IPC {i}" for i in ipcs)
        lines += [
            f"**{setting}** — {results['setting_descriptions'][setting]} (chance {100 / n_classes:.1f} %). "
            f"Teachers: CAL {fmt(entry['teachers']['cal']['values'])} "
            f"({entry['teachers']['cal']['time_s']:.0f} s), plain CE {fmt(entry['teachers']['ce']['values'])} "
            f"({entry['teachers']['ce']['time_s']:.0f} s) per seed.",
            "",
            f"| method (teacher) | {head} | wall s / seed |",
            "|---|" + "---|" * len(ipcs) + "---|",
        ]
        for name, m in entry["methods"].items():
            cells = " | ".join(fmt(m[f"ipc{i}_soft"]["values"]) for i in ipcs)
            note = f" ≡ {m['same_as']}" if m["same_as"] else ""
            wall = "reused" if m["same_as"] else f"{m['time_s']:.0f}"
            lines.append(f"| {name}{note} ({m['teacher']}) | {cells} | {wall} |")
        for name, m in entry["methods"].items():
            if m["same_as"]:
                continue
            cells = " | ".join(fmt(m[f"ipc{i}_hard"]["values"]) for i in ipcs)
            lines.append(f"| {name}, hard labels only | {cells} | (in the row above) |")
        ub = entry["upper_bound"]
        cells = " | ".join([fmt(ub["values"])] * len(ipcs))
        lines.append(f"| full real train set (upper bound) | {cells} | {ub['time_s']:.0f} |")
        lines.append("")
    if plot_rel:
        lines += [f"![accuracy vs IPC]({plot_rel})", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, ipcs = results["summary"], results["ipcs"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.2), squeeze=False)
    for ax, (setting, entry) in zip(axes[0], summary.items(), strict=True):
        for name, m in entry["methods"].items():
            if m["same_as"]:
                continue
            means = [m[f"ipc{i}_soft"]["mean"] for i in ipcs]
            stds = [m[f"ipc{i}_soft"]["std"] for i in ipcs]
            ax.errorbar(ipcs, means, yerr=stds, marker="o", capsize=3, label=name)
        ub = entry["upper_bound"]
        ax.axhline(ub["mean"], color="black", linestyle="--", linewidth=1, label="full real set")
        ax.axhline(100 / results["num_classes"][setting], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(setting)
        ax.set_xlabel("images per class (IPC)")
        ax.set_ylabel("student top-1 on real test (%)")
        ax.set_xticks(ipcs)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(doc: Path, mode: str, body: str) -> None:
    """Replace the block between this mode's markers in the benchmarks page (appended when missing)."""
    begin, end = f"<!-- quality:{mode}:begin -->", f"<!-- quality:{mode}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def run_grid(cfg: dict[str, Any], work: Path, mode: str, command: str, reuse: bool = True) -> dict[str, Any]:
    """Every (setting, seed) of `cfg`; returns the result document (runs + summary)."""
    started, load_start = time.monotonic(), load_average()
    runs, num_classes = [], {}
    sources = {**{name: src for name, (src, _) in SETTINGS.items()}, **cfg.get("sources", {})}
    for setting in cfg["settings"]:
        for seed in cfg["seeds"]:
            record = run_setting_seed(setting, sources[setting], seed, cfg, work, reuse=reuse)
            runs.append(record)
            num_classes[setting] = record["num_classes"]
    ub_note = f"{cfg['upper_bound_epochs']} epochs" if cfg["upper_bound_epochs"] else "the teacher's pretrain_epochs"
    descriptions = {}
    for s in cfg["settings"]:
        text = SETTINGS[s][1] if s in SETTINGS else sources[s]
        if cfg["classes"]:
            text = text.replace("20 classes", f"{cfg['classes']} classes").replace(" (the default set)", "")
        descriptions[s] = text
    results: dict[str, Any] = {
        "format": "fd2.quality.v1",
        "mode": mode,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "spec_overrides": cfg["spec"],
        "classes": cfg["classes"],
        "ipcs": list(cfg["ipcs"]),
        "seeds": list(cfg["seeds"]),
        "settings": list(cfg["settings"]),
        "setting_descriptions": descriptions,
        "num_classes": num_classes,
        "methods": [v.name for v in VARIANTS],
        "upper_bound_epochs_note": ub_note,
        "runs": runs,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "total_s": round(time.monotonic() - started, 1),
    }
    results["summary"] = summarise(results)
    return results


def write_outputs(results: dict[str, Any], json_path: Path, plot_path: Path, docs: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    plot(results, plot_path)
    log(f"wrote {json_path} and {plot_path}")
    if docs is not None:
        rel = os.path.relpath(plot_path, docs.parent)
        update_docs(docs, results["mode"], markdown(results, rel))
        log(f"updated {docs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, 10 classes, short schedules")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds of the mode")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="override the settings of the mode")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "quality_work", help="stage outputs (resumable)")
    parser.add_argument("--json", type=Path, help="result file (default bench/results/quality_<mode>.json)")
    parser.add_argument("--plot", type=Path, help="plot file (default docs/quality.png, quick: docs/quality_quick.png)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="page to update")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the benchmarks page")
    parser.add_argument("--no-reuse", action="store_true", help="also run fd2 − CAL although it equals sre2l++")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only redo the plot and table of a result file")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        default_plot = "quality_quick.png" if results["mode"] == "quick" else "quality.png"
        plot_path = args.plot or ROOT / "docs" / default_plot
        write_outputs(results, args.render, plot_path, None if args.no_docs else args.docs)
        return 0

    mode = "quick" if args.quick else "full"
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = tuple(args.seeds)
    if args.settings:
        cfg["settings"] = tuple(args.settings)
    torch.set_num_threads(args.threads)
    json_path = args.json or ROOT / "bench" / "results" / f"quality_{mode}.json"
    plot_path = args.plot or ROOT / "docs" / ("quality_quick.png" if args.quick else "quality.png")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/quality.py", *(argv or sys.argv[1:])])
    results = run_grid(cfg, args.work / mode, mode, command, reuse=not args.no_reuse)
    write_outputs(results, json_path, plot_path, None if args.no_docs else args.docs)
    print(markdown(results, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
