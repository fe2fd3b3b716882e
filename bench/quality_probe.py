"""Why does a method's student score what it scores?
Cross the distilled images with the soft-label sources.

Runs on a validation set only (default `fgsynth:seed=7`, whose test split plays validation), never
on the data the quality table reports.
Per teacher seed it trains the CAL and the plain-CE teacher, builds the
random subset and the sre2l++ and fd2 sets at the largest IPC, and then
trains the identical student on every combination of

- images: random real subset, sre2l++ set, fd2 set (and any extra fd2 variant named with --fd2-set);
- soft-label source: plain-CE teacher; CAL teacher's combined logits (1 − r)·backbone + r·CAL head;
  CAL head alone; CAL teacher's backbone alone — each recorded with the relabel stage's protocol
  (BatchNorm mode and forward split of the spec);
- temperature T of the student's KL loss.

Separating "which images" from "whose logits" says where a gap between methods comes from.

    .venv/bin/python bench/quality_probe.py --seeds 0 1 --temperatures 20 4
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import log, make_ctx, quantize  # noqa: E402
from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.label_formats import LabelEncoding  # noqa: E402
from fd2_core.runtime import frozen  # noqa: E402
from fd2_core.softlabels import SoftLabels, record_soft_labels, save_soft_labels  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.committee import as_committee  # noqa: E402
from fd2_core.stages.distill import distill  # noqa: E402
from fd2_core.stages.evaluate import train_student  # noqa: E402
from fd2_core.stages.pretrain import pretrain_teacher  # noqa: E402
from fd2_core.stages.relabel import augmentation_stream, recorded_epochs  # noqa: E402
from fd2_core.stages.teacher import relabel_mode, source_logits  # noqa: E402

LABEL_SOURCES: dict[str, tuple[str, str]] = {
    # name → (teacher kind, soft_label_source of that teacher)
    "ce": ("ce", "backbone"),
    "cal-combined": ("cal", "mixed"),
    "cal-head": ("cal", "cal"),
    "cal-backbone": ("cal", "backbone"),
}


def soft_labels(ctx, teacher, source: str, images_u8, path: Path) -> SoftLabels:
    """Record soft labels with the relabel stage's seeded augmentation
    stream and protocol, from `source`."""
    spec = ctx.spec
    protocol = {
        "soft_label_source": source,
        "relabel_bn_mode": spec.relabel_bn_mode,
        "forward_splits": spec.relabel_forward_splits,
    }
    if path.exists():
        cached = SoftLabels.load(path)
        if (cached.soft_label_source, cached.bn_mode, cached.forward_splits) == tuple(protocol.values()):
            return cached
    images = ctx.normalize(images_u8).float()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            return source_logits(teacher(x), source, spec.cal_ratio)

    with relabel_mode(teacher, spec.relabel_bn_mode):
        walk = augmentation_stream(spec, images.shape[0], "relabel")
        encoding = LabelEncoding.from_spec(spec).for_classes(ctx.num_classes)
        kept = recorded_epochs(spec, "relabel")
        tensors = record_soft_labels(logits_of, images, epochs=spec.relabel_epochs, stream=walk, encoding=encoding,
                                     kept=kept, forward_splits=spec.relabel_forward_splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"batch_size": spec.relabel_batch_size, "epochs": spec.relabel_epochs, "num_images": int(images.shape[0]),
            "augmentations": walk.as_metadata(), "label_encoding": encoding.as_metadata(), "epochs_kept": kept}
    save_soft_labels(path, tensors, meta | protocol | {"num_classes": ctx.num_classes, "topk": spec.topk})
    return SoftLabels.load(path)


def logit_stats(teacher, source: str, r: float, ctx) -> dict[str, float]:
    """Accuracy, mean per-image logit std and mean top probability at T
    (eval mode, on the validation images)."""
    images = ctx.normalize(ctx.data.test_images).float()
    with torch.no_grad(), frozen(teacher):
        logits = source_logits(teacher(images), source, r)
    acc = (logits.argmax(1) == ctx.data.test_labels).float().mean().item()
    t = ctx.spec.eval_temperature
    return {
        "accuracy": acc,
        "logit_std": logits.std(1).mean().item(),
        "p_max_at_T": torch.softmax(logits / t, 1).max(1).values.mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fgsynth:seed=7", help="validation data (never the reported test set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[20.0])
    parser.add_argument("--sources", nargs="+", default=list(LABEL_SOURCES), choices=list(LABEL_SOURCES))
    parser.add_argument("--images", nargs="+", default=["random", "sre2l++", "fd2"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override for all")
    parser.add_argument("--fd2-set", action="append", default=[], metavar="KEY=VALUE", help="override for fd2 only")
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "quality_probe")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality_probe.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def parse(items: list[str]) -> dict[str, Any]:
        return {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v for k, v in (i.split("=", 1) for i in items)}

    common = {"preset": "cpu-small", "device": "cpu", "distill_iterations": 200, "relabel_epochs": 300}
    common |= parse(args.set)
    fd2_extra = parse(args.fd2_set)
    ipc_max = max(args.ipcs)
    probe = resolve_spec({**common, "ipc": ipc_max})
    data = load_dataset(args.data, probe.image_size, seed=0, test_fraction=probe.test_fraction)
    k = len(data.classes)
    rows: list[dict[str, Any]] = []
    teacher_stats: dict[str, Any] = {}
    started = time.monotonic()
    for seed in args.seeds:
        base = {**common, "seed": seed, "ipc": ipc_max}
        root = args.work / f"seed{seed}"
        teachers = {}
        for kind, method in (("cal", "fd2"), ("ce", "sre2l++")):
            spec = resolve_spec({**base, "method": method})
            # the teacher alone: the published patch rule's plain scorer is the CE teacher here (below)
            teachers[kind] = pretrain_teacher(make_ctx(spec, data, root / f"teacher-{kind}")).model
        ctx0 = make_ctx(resolve_spec({**base, "method": "fd2"}), data, root)
        for name, (kind, source) in LABEL_SOURCES.items():
            teacher_stats[f"seed{seed}/{name}"] = logit_stats(teachers[kind], source, probe.cal_ratio, ctx0)
            log(f"seed {seed} teacher {name}: {teacher_stats[f'seed{seed}/{name}']}")
        sets = {}
        for name in args.images:
            overrides = {"method": name if name != "fd2" else "fd2", **(fd2_extra if name == "fd2" else {})}
            spec = resolve_spec({**base, **overrides})
            extra = "-".join(f"{a}{b}" for a, b in sorted(fd2_extra.items())) if name == "fd2" else ""
            tag = f"{name}-{extra}" if extra else name
            ctx = make_ctx(spec, data, root / tag)
            teacher = None if name == "random" else as_committee(ctx, teachers["cal" if spec.uses_cal else "ce"])
            if teacher is not None and spec.trains_scorer:  # the published patch rule under FD²: a plain scorer
                teacher = dataclasses.replace(teacher, scorer_model=teachers["ce"])
            sets[name] = (tag, quantize(ctx, distill(ctx, teacher)))
        for (_name, (tag, images)), ipc, src, temp in itertools.product(
            sets.items(), args.ipcs, args.sources, args.temperatures
        ):
            kind, source = LABEL_SOURCES[src]
            spec = resolve_spec({**base, "ipc": ipc, "eval_temperature": temp})
            ctx = make_ctx(spec, data, root)
            imgs, labels = images[: ipc * k], torch.arange(k).repeat(ipc)
            soft = soft_labels(ctx, teachers[kind], source, imgs, root / f"{tag}-ipc{ipc}-{src}.st")
            acc = train_student(ctx, imgs, labels, soft, stream="student").accuracy
            rows.append({"seed": seed, "images": tag, "ipc": ipc, "labels": src, "T": temp, "accuracy": acc})
            log(f"seed {seed} images {tag} ipc {ipc} labels {src} T {temp:g}: {acc:.3f}")

    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["images"], row["ipc"], row["labels"], row["T"]), []).append(100 * row["accuracy"])
    print(f"\nvalidation {args.data}, seeds {args.seeds}, {time.monotonic() - started:.0f} s")
    print("| images | IPC | soft labels | T | val top-1 (mean of seeds) | per seed |\n|---|---|---|---|---|---|")
    for (images, ipc, src, temp), vals in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][3], kv[0][2])):
        per = " / ".join(f"{v:.1f}" for v in vals)
        print(f"| {images} | {ipc} | {src} | {temp:g} | {statistics.fmean(vals):.1f} | {per} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"argv": argv or sys.argv[1:], "teachers": teacher_stats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
