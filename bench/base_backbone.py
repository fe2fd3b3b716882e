"""Make the shipped base backbone: a ConvNet-BN feature extractor pretrained
on FGSynth classes that no evaluated setting uses, so every teacher can
start from it the way the paper's teachers start from ImageNet weights.

Classes: 20–39 of both variants (`fgsynth:first=20,...`), 40 classes in all.
The generator numbers classes pattern-fastest (`fd2_core/data/fgsynth.py`): classes 0–19, the
evaluated birds-32 / cars-32 classes (and the validation sets, `seed=7`), are the first placement
(crest / headlight) × the first four shapes × five patterns; classes 20–39 are the same placement ×
the other four shapes × the same five patterns.
So the backbone learns where the part sits and how patterns look on the same objects, but never sees
a class (and, per object, never a part shape) that is evaluated.
The images use their own seed (`--data-seed`, not 0 or 7), so they share no pose, colour or
background draw with the evaluated or validation images either.

Recipe: the `cpu-small` plain-CE teacher (`sre2l++` pretrain stage: ConvNet-BN width 32, AdamW,
cosine, batch 16, shift + flip, checkpoint chosen on a 10 % validation share), run through the same
`pretrain` stage as any teacher; the classifier is dropped and the rest saved as safetensors marked
as a feature extractor (`fd2_core/models/weights.py`).
One thread by default, so the same seed gives the same tensors on a machine (their sha256 is in the
metadata, next to the classes, recipe, seeds, date, torch version and command).

    .venv/bin/python bench/base_backbone.py            # writes
fd2_core/weights/fgsynth_convnet32.safetensors .venv/bin/python bench/base_backbone.py --out
/tmp/b.safetensors --epochs 1 --train 20   # smoke run """

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fd2_core.data.dataset import ImageDataset, channel_stats, load_dataset  # noqa: E402
from fd2_core.models.base_backbone import BASE_BACKBONE_FILE, BASE_BACKBONE_SPEC, WEIGHTS_DIR  # noqa: E402
from fd2_core.models.weights import feature_extractor_state, save_feature_extractor  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.context import RunContext  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402

FORMAT_NOTE = "ConvNet-BN backbone without classifier, pretrained on FGSynth classes disjoint from classes 0-19"


def load_base_data(variants: list[str], first: int, classes: int, train: int, test: int, seed: int,
                   image_size: int) -> tuple[ImageDataset, list[str]]:
    """The variants' classes `first` … `first + classes − 1`, stacked with
    labels offset per variant.

    Returns the dataset (uint8 `[N, 3, S, S]`, names `<variant>/<fgsynth
    name>`) and the per-variant sources."""
    parts, sources = [], []
    for variant in variants:
        source = f"fgsynth:classes={classes},first={first},train={train},test={test},seed={seed},variant={variant}"
        parts.append(load_dataset(source, image_size))
        sources.append(source)
    offsets = [sum(p.num_classes for p in parts[:i]) for i in range(len(parts))]
    train_images = torch.cat([p.train_images for p in parts])
    mean, std = channel_stats(train_images)
    data = ImageDataset(
        train_images,
        torch.cat([p.train_labels + o for p, o in zip(parts, offsets, strict=True)]),
        torch.cat([p.test_images for p in parts]),
        torch.cat([p.test_labels + o for p, o in zip(parts, offsets, strict=True)]),
        [f"{v}/{name}" for v, p in zip(variants, parts, strict=True) for name in p.classes],
        mean, std, [], " + ".join(sources),
    )
    return data, sources


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes: equal exactly when the
    saved tensors are (metadata aside)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / BASE_BACKBONE_FILE)
    parser.add_argument("--variants", default="birds,cars", help="comma-separated fgsynth variants")
    parser.add_argument("--first", type=int, default=20, help="first generator class (evaluated: 0-19)")
    parser.add_argument("--classes", type=int, default=20, help="classes per variant")
    parser.add_argument("--train", type=int, default=300, help="train images per class")
    parser.add_argument("--test", type=int, default=50, help="test images per class (reported only)")
    parser.add_argument("--data-seed", type=int, default=100, help="fgsynth seed (evaluated: 0, validation: 7)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, val split, data order)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None, help="pretrain lr (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed, for repeatable tensors)")
    args = parser.parse_args(argv)
    if args.first < 20:
        parser.error("--first below 20 would include evaluated classes (0-19)")
    torch.set_num_threads(args.threads)

    started = time.monotonic()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    image_size = int(BASE_BACKBONE_SPEC["image_size"])
    data, sources = load_base_data(variants, args.first, args.classes, args.train, args.test, args.data_seed,
                                   image_size)
    load_s = time.monotonic() - started
    recipe: dict[str, Any] = {
        "preset": "cpu-small", "method": "sre2l++", "device": "cpu", "seed": args.seed,
        "pretrain_epochs": args.epochs, **{k: v for k, v in BASE_BACKBONE_SPEC.items()},
    }
    if args.lr is not None:
        recipe["pretrain_lr"] = args.lr
    spec = resolve_spec(recipe)
    print(f"{data.num_classes} classes, {len(data.train_labels)} train / {len(data.test_labels)} test images "
          f"({load_s:.0f} s to generate); training {spec.pretrain_epochs} epochs", flush=True)
    with tempfile.TemporaryDirectory(prefix="fd2_base_backbone_") as work:
        ctx = RunContext(spec=spec, data=data, workdir=Path(work), device=torch.device("cpu"),
                         tracker=ProgressTracker({}, None, None))
        t, cpu = time.monotonic(), time.process_time()
        result = pretrain(ctx)
        train_s, train_cpu_s = time.monotonic() - t, time.process_time() - cpu
    info = result.info
    tensors = feature_extractor_state(result.model)
    metadata: dict[str, Any] = {
        "description": FORMAT_NOTE,
        **{k: str(v) for k, v in BASE_BACKBONE_SPEC.items()},
        "classes": data.classes,
        "sources": sources,
        "disjoint_from": "fgsynth classes 0-19 of every variant (birds-32, cars-32 and their seed-7 validation sets)",
        "recipe": {k: v for k, v in spec.model_dump(mode="json").items() if k.startswith("pretrain_")}
        | {"preset": spec.preset, "method": spec.method, "val_fraction": spec.val_fraction},
        "seed": args.seed,
        "data_seed": args.data_seed,
        "base_val_accuracy": info["val_accuracy"],
        "base_test_accuracy": info["backbone_test_accuracy"],
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": shlex.join([".venv/bin/python", "bench/base_backbone.py", *(argv or sys.argv[1:])]),
        "tensors_sha256": tensors_sha256(tensors),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_extractor(result.model, args.out, metadata)
    size_kib = args.out.stat().st_size / 1024
    print(json.dumps({
        "out": str(args.out), "size_kib": round(size_kib, 1), "val_accuracy": info["val_accuracy"],
        "test_accuracy": info["backbone_test_accuracy"], "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "total_s": round(time.monotonic() - started, 1), "tensors_sha256": metadata["tensors_sha256"],
    }, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
