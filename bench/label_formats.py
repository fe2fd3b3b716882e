"""Soft-label formats: accuracy against size, on the validation data, to choose cpu-small's default.

What it measures: for fd2's distilled set at IPC 1, 3 and 5 on the validation settings (FGSynth birds
and cars drawn with seed 7), the top-1 on the real test split of a student trained from each storage
format of the soft labels (`fd2_core.label_formats`), paired with the student trained from full fp16
logits: same teacher, same images, same augmentation walk and student stream. Both protocols:
*end to end* (fd2's CAL teacher relabels) and *images only* (the plain-CE teacher relabels).

Design (docs/SOFT_LABELS.md; the results in docs/BENCHMARKS.md, "Soft-label formats"):
- Full logits are recorded once per (setting, seed, IPC, protocol); every stored format is derived
  from that recording (top-k, int8 and an epoch subset are row-wise encodings of it; an epoch subset
  keeps the rows of the epochs `relabel` would record), written as a real v5 file and measured by
  its size on disk. `online` stores no logits: its student forwards the teacher, and its size is the
  teacher file.
- Teachers and images come from `bench/quality.py`'s pair runner (its validation settings and
  work-folder layout), so a run beside the quality grid's `--validate` reuses them.
- The choice: the smallest format whose mean paired difference to full logits, pooled per (setting,
  seed) pair over its IPC × protocol cells, is ≥ −0.5 points over the pairs, with its 95 % t-interval;
  every cell is reported too, and a cell whose interval is wider than ±1 point cannot resolve 0.5 (the
  table says so).
- Resumable: the result file is written after every student; a re-run skips what it holds.

    .venv/bin/python bench/label_formats.py                 # 5 seeds × 2 validation settings
    .venv/bin/python bench/label_formats.py --seeds 0 --settings birds-val --ipcs 1   # a smoke run
    .venv/bin/python bench/label_formats.py --merge bench/results/label_formats.json \
        bench/results/label_formats_cars.json --docs    # one process per setting, joined
    .venv/bin/python bench/label_formats.py --render bench/results/label_formats.json --docs
                                                            # table + plot into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import (  # noqa: E402
    FULL,
    VALIDATION_SETTINGS,
    VARIANTS,
    PairRunner,
    accuracy_of,
    log,
    make_ctx,
    paired_interval,
    quantize,
    update_docs,
)
from fd2_core.label_codec import encode_logits, kept_epochs  # noqa: E402
from fd2_core.label_formats import LabelEncoding, kept_epoch_count  # noqa: E402
from fd2_core.softlabels import DIGESTS, SoftLabels, save_soft_labels  # noqa: E402
from fd2_core.stages.context import stage_folder  # noqa: E402
from fd2_core.stages.distill import distill  # noqa: E402
from fd2_core.stages.evaluate import train_student  # noqa: E402
from fd2_core.stages.pretrain import TEACHER_FILE  # noqa: E402
from fd2_core.stages.relabel import relabel_all_epochs, teacher_logits  # noqa: E402

FORMAT = "fd2.bench.label_formats.v1"
REFERENCE = LabelEncoding()
# every format measured, from the most faithful to the smallest (the budget order)
FORMATS: tuple[LabelEncoding, ...] = (
    REFERENCE,
    LabelEncoding("int8"),
    LabelEncoding("fp16", 5),
    LabelEncoding("int8", 5),
    LabelEncoding("int8", 0, 0.25),
    LabelEncoding("int8", 5, 0.25),
    LabelEncoding("int8", 0, 0.1),
    LabelEncoding("int8", 5, 0.1),
    LabelEncoding("int8", 2, 0.1),
    LabelEncoding("online"),
)
PROTOCOL_TEACHERS = {"end-to-end": "cal", "images-only": "ce"}
TOLERANCE_POINTS = -0.5
RESOLUTION_POINTS = 1.0
CFG: dict[str, Any] = {**FULL, "settings": tuple(VALIDATION_SETTINGS), "hard_label_methods": ()}
FD2 = next(v for v in VARIANTS if v.name == "fd2")


def derived(full: SoftLabels, encoding: LabelEncoding, seed: int, path: Path) -> SoftLabels:
    """The v5 file `relabel` would write with `encoding`, from a full fp16 recording of the same walk."""
    epochs = full.epochs
    kept = list(range(epochs)) if encoding.online else kept_epochs(
        epochs, kept_epoch_count(epochs, encoding.epoch_fraction), seed, "relabel")
    tensors = {DIGESTS: full.tensors[DIGESTS][kept], **encode_logits(full.tensors["logits"][kept].float(), encoding)}
    meta = {k: v for k, v in full.metadata.items() if k not in ("format", "layout")}
    meta.update(label_encoding=json.dumps(encoding.as_metadata()), epochs_kept=json.dumps(kept))
    return SoftLabels.load(save_soft_labels(path, tensors, meta))


def measure_pair(setting: str, seed: int, work: Path, record: dict[str, Any], save, ipcs: tuple[int, ...]) -> None:
    """Every (IPC, protocol, format) student of one (setting, seed) not yet in `record`."""
    cfg = {**CFG, "ipcs": ipcs}
    runner = PairRunner(setting, VALIDATION_SETTINGS[setting][0], seed, cfg, work, record, save)
    cells = record.setdefault("cells", {})
    wanted = [f"{p}/ipc{i}" for i in ipcs for p in PROTOCOL_TEACHERS]
    if all(len(cells.get(key, {})) == len(FORMATS) for key in wanted):
        log(f"{setting} seed {seed}: complete in the result file")
        return
    spec = runner.spec(FD2)
    own = runner.teacher("cal")
    wd = runner.root / "fd2"
    ctx = make_ctx(spec, runner.data, wd, notes=runner.shared_notes(spec))
    images = quantize(ctx, distill(ctx, runner.distilling_teachers(ctx, spec, own)))
    k = len(runner.data.classes)
    for ipc in ipcs:
        imgs, labels = images[: ipc * k], torch.arange(k).repeat(ipc)
        spec_k = runner.spec(FD2, ipc=ipc)
        for protocol, kind in PROTOCOL_TEACHERS.items():
            cell = cells.setdefault(f"{protocol}/ipc{ipc}", {})
            teacher = runner.teacher(kind)
            ctx_k = make_ctx(spec_k, runner.data, wd)
            full = relabel_all_epochs(ctx_k, teacher, imgs, labels, wd / f"{protocol}_ipc{ipc}_full.safetensors")
            # the fp16 logits of every recorded position, E·N·K·2 bytes: what the targets are measured against
            reference = full.epochs * full.num_images * full.num_classes * 2
            for encoding in FORMATS:
                if encoding.name in cell:
                    continue
                path = wd / "formats" / f"{protocol}_ipc{ipc}_{encoding.name}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                soft = derived(full, encoding, spec_k.seed, path)
                size = path.stat().st_size
                if encoding.online:
                    size = (stage_folder(runner.teacher_root / f"teacher-{kind}") / TEACHER_FILE).stat().st_size
                t = time.monotonic()
                with teacher_logits(ctx_k, teacher) if encoding.online else contextlib.nullcontext() as logits_of:
                    result = train_student(ctx_k, imgs, labels, soft, stream="student", teacher=logits_of)
                cell[encoding.name] = {"accuracy": accuracy_of(result), "bytes": size, "fp16_all_bytes": reference,
                                       "time_s": round(time.monotonic() - t, 1)}
                save()
                log(f"{setting} seed {seed}: {protocol} ipc {ipc} {encoding.name}: "
                    f"{cell[encoding.name]['accuracy']:.3f}, {size} B (×{reference / size:.1f})")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per format: per cell the paired difference to full logits (points, 95 % interval) and the mean
    size ratio; the chosen format (module docstring)."""
    runs = list(results["runs"].values())
    cells = sorted({key for run in runs for key in run.get("cells", {})})
    table: dict[str, Any] = {}
    for encoding in FORMATS:
        row: dict[str, Any] = {"cells": {}, "ratio": None}
        ratios = []
        for setting in results["settings"]:
            for key in cells:
                pairs = [run["cells"][key] for run in runs
                         if run.get("setting") == setting and encoding.name in run.get("cells", {}).get(key, {})]
                if not pairs:
                    continue
                diff = paired_interval([p[encoding.name]["accuracy"] for p in pairs],
                                       [p[REFERENCE.name]["accuracy"] for p in pairs])
                ratios += [p[encoding.name]["fp16_all_bytes"] / p[encoding.name]["bytes"] for p in pairs]
                row["cells"][f"{setting} {key}"] = diff
        row["ratio"] = sum(ratios) / len(ratios) if ratios else None
        row["pooled"] = _pooled(runs, cells, encoding.name)
        table[encoding.name] = row
    chosen = None
    for encoding in FORMATS:  # the smallest whose pooled mean holds
        pooled = table[encoding.name]["pooled"]
        if pooled is not None and pooled["mean"] >= TOLERANCE_POINTS:
            chosen = encoding.name if chosen is None or _smaller(table, encoding.name, chosen) else chosen
    return {"formats": table, "chosen": chosen}


def _pooled(runs: list[dict[str, Any]], cells: list[str], name: str) -> dict[str, Any] | None:
    """The paired difference over (setting, seed) pairs of each pair's mean over its complete cells
    (IPC × protocol): one number per pair, so the interval is over pairs, not over correlated cells."""
    mine, reference = [], []
    for run in runs:
        done = [run["cells"][key] for key in cells if name in run.get("cells", {}).get(key, {})]
        if len(done) == len(cells):
            mine.append(sum(cell[name]["accuracy"] for cell in done) / len(done))
            reference.append(sum(cell[REFERENCE.name]["accuracy"] for cell in done) / len(done))
    return paired_interval(mine, reference) if mine else None


def _smaller(table: dict[str, Any], a: str, b: str) -> bool:
    return (table[a]["ratio"] or 0.0) > (table[b]["ratio"] or 0.0)


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    keys = sorted({key for row in summary["formats"].values() for key in row["cells"]})
    lines = ["| format | size ×smaller than fp16 of every position | pooled over pairs | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for name, row in summary["formats"].items():
        cells = []
        for key in keys:
            cell = row["cells"].get(key)
            if cell is None or cell["lo"] is None:
                cells.append("–" if cell is None else f"{cell['mean']:+.1f}")
                continue
            wide = " (cannot resolve 0.5)" if cell["hi"] - cell["lo"] > 2 * RESOLUTION_POINTS else ""
            cells.append(f"{cell['mean']:+.1f} [{cell['lo']:+.1f}, {cell['hi']:+.1f}]{wide}")
        ratio = "–" if row["ratio"] is None else f"×{row['ratio']:.1f}"
        pooled = row.get("pooled")
        pooled_text = "–" if pooled is None or pooled["lo"] is None else (
            f"**{pooled['mean']:+.1f}** [{pooled['lo']:+.1f}, {pooled['hi']:+.1f}] (n={pooled['n']})")
        lines.append(f"| {name} | {ratio} | {pooled_text} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Chosen (smallest whose pooled mean paired difference is ≥ {TOLERANCE_POINTS} points): "
                 f"**{summary['chosen'] or 'none'}**. Cells: mean paired difference to full fp16 logits in points "
                 "with the 95 % t-interval over seeds; pooled: each (setting, seed) pair's mean over its IPC × "
                 "protocol cells, paired over pairs.")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Paired difference to full logits (mean over cells, the bar spans the cells' means) against how
    many times smaller than the fp16 logits of every position each format is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for name, row in results["summary"]["formats"].items():
        means = [cell["mean"] for cell in row["cells"].values()]
        if not means or row["ratio"] is None:
            continue
        centre = sum(means) / len(means)
        ax.errorbar([row["ratio"]], [centre], yerr=[[centre - min(means)], [max(means) - centre]], marker="o",
                    capsize=3)
        ax.annotate(name, (row["ratio"], centre), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(TOLERANCE_POINTS, color="black", linestyle="--", linewidth=1, label=f"{TOLERANCE_POINTS} points")
    ax.set_xscale("log")
    ax.set_xlabel("× smaller than the fp16 logits of every position (E·N·K·2 bytes)")
    ax.set_ylabel("student top-1 − full logits (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_docs(results: dict[str, Any], doc: Path, plot_path: Path) -> None:
    plot(results, plot_path)
    seeds = sorted({int(key.rsplit("/", 1)[1]) for key in results["runs"]})
    body = (f"Command: `{results['command']}` (seeds {', '.join(map(str, seeds))}; "
            f"settings {', '.join(results['settings'])}).\n\n{markdown(results)}\n\n"
            f"![size against accuracy]({plot_path.name})")
    update_docs(doc, "label-formats", body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FULL["seeds"]))
    parser.add_argument("--settings", nargs="+", choices=sorted(VALIDATION_SETTINGS), default=list(CFG["settings"]))
    parser.add_argument("--ipcs", type=int, nargs="+", default=list(FULL["ipcs"]))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "quality_v3", help="stage outputs (resumable)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "label_formats.json")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only print the table of a result file")
    parser.add_argument("--docs", action="store_true", help="write the table and plot into docs/BENCHMARKS.md")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="join result files (e.g. one process per setting) into --json, then render it")
    args = parser.parse_args(argv)
    if args.merge:
        docs = [json.loads(path.read_text()) for path in args.merge]
        merged = {**docs[0], "runs": {}, "settings": [], "seeds": []}
        for doc in docs:
            overlap = set(merged["runs"]) & set(doc["runs"])
            if overlap:
                parser.error(f"the files hold the same pairs twice: {', '.join(sorted(overlap))}")
            merged["runs"].update(doc["runs"])
            merged["settings"] = sorted({*merged["settings"], *doc.get("settings", [])})
            merged["seeds"] = sorted({*merged["seeds"], *doc.get("seeds", [])})
        merged["command"] = " && ".join(doc["command"] for doc in docs)
        merged["summary"] = summarise(merged)
        args.json.write_text(json.dumps(merged, indent=1))
        args.render = args.json
    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = summarise(results)
        if args.docs:
            write_docs(results, ROOT / "docs" / "BENCHMARKS.md", ROOT / "docs" / "label_formats.png")
        print(markdown(results))
        return 0
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.exists() else {
        "format": FORMAT, "formats": [e.as_metadata() for e in FORMATS], "runs": {}}
    results.update(settings=sorted(set(results.get("settings", [])) | set(args.settings)),
                   seeds=sorted(set(results.get("seeds", [])) | set(args.seeds)),
                   command=" ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/label_formats.py",
                                                             *(argv or sys.argv[1:])]))

    def save() -> None:
        results["summary"] = summarise(results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)

    for setting in args.settings:
        for seed in args.seeds:
            record = results["runs"].setdefault(f"{setting}/{seed}", {})
            measure_pair(setting, seed, args.work, record, save, tuple(sorted(args.ipcs)))
    save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
