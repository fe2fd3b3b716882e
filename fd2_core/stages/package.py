"""Stage 5 — package: the downloadable artifacts and `report.json` under `workdir/artifacts`.

The set is quantised to uint8 once, right after distillation (`quantize`), so that what a user
downloads is exactly what was relabelled and evaluated.
Packaging runs again on every resume; the artifact writers are deterministic (fd2_core.artifacts),
so a resumed run packages the same bytes.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL
import torch
import torchvision

from .. import __version__
from ..artifacts import copy_file, write_distilled_tar, write_preview
from ..atomic import write_json
from ..data.dataset import ImageDataset
from ..models import FD2Model
from ..models.weights import WeightsLoad
from ..storage_report import real_data, storage_report
from ..timings import Timings
from .committee import Committee
from .context import RunContext
from .drift import init_drift
from .evaluate import comparison
from .pretrain import TEACHER_FILE
from .relabel import SOFT_LABELS_FILE

ATTENTION_BATCH = 256  # images per teacher forward for the preview's attention maps
# Storage figures left out of the job's metrics: a sentence, and the archive's size, which the
# artifact list gives and which follows the manifest's spec (the same set made by more workers may
# gzip to another size).
NOT_METRICS = frozenset({"compression_ratio_formula", "distilled_archive_bytes"})


class QuantizedSet(NamedTuple):
    """The distilled images quantised to uint8, as they are relabelled, evaluated and downloaded.

    Image i is (ipc index j, class c) with i = j·K + c.
    """

    images: torch.Tensor  # uint8 [ipc·K, 3, S, S], on the CPU
    labels: torch.Tensor  # int64 [ipc·K], the class c of each image
    ipc_index: torch.Tensor  # int64 [ipc·K], the ipc index j of each image


@dataclass(frozen=True)
class Provenance:
    """How the run started, for the report: its recorded inputs
    (`inputs.json`), what loading the teacher weights did (None without a
    weights file) and whether the work folder already held stages."""

    inputs: dict[str, Any]
    weights_load: WeightsLoad | None
    resumed: bool

    @property
    def warnings(self) -> list[dict[str, str]]:
        """What the run accepted but a person should know (`{code,
        message}`), said at once and in the report."""
        return list(self.weights_load.warnings) if self.weights_load else []


def quantize(ctx: RunContext, synthetic: torch.Tensor) -> QuantizedSet:
    """Normalised float [ipc,K,3,S,S] → the uint8 set that is relabelled,
    evaluated and downloaded."""
    flat = synthetic.reshape(-1, *synthetic.shape[2:])
    images = (ctx.denormalize(flat) * 255.0).round().to(torch.uint8).cpu()
    k, ipc = ctx.num_classes, ctx.spec.ipc
    return QuantizedSet(images, torch.arange(k).repeat(ipc), torch.arange(ipc).repeat_interleave(k))


def image_storage(synthetic_format: str, method: str) -> dict[str, str]:
    """How the set's images were stored before relabel and evaluation read them (manifest and
    report): the PNGs of the artifact hold exactly those pixels, losslessly."""
    if method == "random":  # real images are never re-encoded, whatever the spec's format
        return {"format": "png", "stored_as": "the real images as read, lossless"}
    if synthetic_format == "jpeg":
        return {"format": "jpeg", "stored_as": "truncated to uint8, then JPEG quality 75; later stages and these "
                "PNGs hold the decoded JPEG pixels"}
    return {"format": synthetic_format, "stored_as": "rounded to uint8, lossless"}


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: unknown numbers become null
    (recursively through dicts and lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _versions() -> dict[str, str]:
    return {
        "fd2": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def _device_info(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}


def _dataset_summary(data: ImageDataset) -> dict[str, Any]:
    k = len(data.classes)
    return {
        "source": data.source,
        "num_classes": k,
        "classes": data.classes,
        "splits": {"train": int(data.train_images.shape[0]), "test": int(data.test_images.shape[0])},
        "per_class_train": torch.bincount(data.train_labels, minlength=k).tolist(),
        "skipped_files": len(data.errors),
        "mean": list(data.mean),
        "std": list(data.std),
    }


def _storage(artifacts: dict[str, Path], data: ImageDataset) -> dict[str, Any]:
    """The report's `storage` block (`fd2_core.storage_report`): the download against the real
    train data the loader read."""
    real_bytes, kind = real_data(data.train_bytes, int(data.train_images.shape[0]), data.image_size)
    return storage_report(artifacts, real_bytes, kind)


@torch.no_grad()
def _attention_of(ctx: RunContext, teacher: FD2Model, images_u8: torch.Tensor) -> torch.Tensor | None:
    """The teacher's CAL attention maps of the set, [N, M, H, W] on the
    CPU, for the preview (None without CAL)."""
    if teacher.cal_head is None:
        return None
    teacher.eval()
    maps = []
    with ctx.autocast():
        for start in range(0, images_u8.shape[0], ATTENTION_BATCH):
            maps.append(teacher(ctx.normalize(images_u8[start : start + ATTENTION_BATCH])).cal.attention.float().cpu())
    return torch.cat(maps)


def package(
    ctx: RunContext,
    teacher: Committee,
    distilled: QuantizedSet,
    metrics: dict[str, Any],
    timings: Timings,
    provenance: Provenance,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write `distilled.tar.gz`, `soft_labels.safetensors`, `teacher.safetensors`,
    `preview.png` and last `report.json` (with `timings_s`: this stage's seconds
    and the run's total, and `storage`: what the download weighs against the real data, also
    added to the report's `metrics` as flat keys but `NOT_METRICS`) under `workdir/artifacts`.

    Returns (artifact name → path, the report as written).
    """
    spec, data = ctx.spec, ctx.data
    resolved = spec.model_dump(mode="json")
    with timings.measure("package"):
        reporter = ctx.tracker.stage("package")
        reporter.begin(1)
        out = ctx.workdir / "artifacts"
        out.mkdir(exist_ok=True)
        versions = _versions()
        summary = _dataset_summary(data)
        manifest = {
            "format": "fd2.distilled.v1",
            "method": spec.method,
            "spec": resolved,
            "dataset": summary,
            "versions": versions,
            "seed": spec.seed,
            "normalization": {"mean": list(data.mean), "std": list(data.std)},
            "synthetic_format": image_storage(spec.synthetic_format, spec.method),
        }
        images, labels, ipc_index = distilled
        artifacts = {
            "distilled.tar.gz": write_distilled_tar(
                out / "distilled.tar.gz", images, labels, ipc_index, data.classes, manifest
            ),
            "soft_labels.safetensors": copy_file(ctx.stage_dir / SOFT_LABELS_FILE, out / "soft_labels.safetensors"),
            "teacher.safetensors": copy_file(ctx.stage_dir / TEACHER_FILE, out / "teacher.safetensors"),
            "preview.png": write_preview(
                out / "preview.png", images, labels, ipc_index, ctx.num_classes, spec.ipc,
                attention=_attention_of(ctx, teacher.model, images),
            ),
        }
        storage = _storage(artifacts, data)
    timings_s = timings.finish()
    metrics = {**metrics, **{k: v for k, v in storage.items() if k not in NOT_METRICS}}
    report = json_safe(
        {
            "format": "fd2.report.v1",
            "created_at": datetime.now(timezone.utc).isoformat(),
            "method": spec.method,
            "spec": resolved,
            "metrics": metrics,
            "comparison": comparison(metrics),
            "teacher": {
                **teacher.info,
                "initial_weights": provenance.inputs["teacher_weights_sha256"],
                "initial_weights_load": provenance.weights_load.as_dict() if provenance.weights_load else None,
            },
            "warnings": provenance.warnings,
            "distill": init_drift(ctx),
            "synthetic_format": image_storage(spec.synthetic_format, spec.method),
            "dataset": {**summary, "duplicates": data.duplicates,
                        "errors": [e.as_dict() for e in data.errors[:100]],
                        "warnings": [w.as_dict() for w in data.warnings]},
            "storage": storage,
            "timings_s": timings_s,
            "resumed": provenance.resumed,
            "device": _device_info(ctx.device),
            "versions": versions,
        }
    )
    artifacts["report.json"] = write_json(out / "report.json", report)
    reporter.end()
    return artifacts, report
