"""`run(spec, dataset, workdir, on_event, should_stop) -> PipelineResult`: the whole FD² job.

pretrain → distill → relabel → evaluate → package. Each stage writes its outputs under `workdir/stages`
atomically and a re-run with the same workdir skips finished work, so a killed run resumes.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision

from . import __version__
from .admission import JobCounts, admission_problems
from .artifacts import MEDIA_TYPES, copy_file, sha256_of, write_distilled_tar, write_preview
from .atomic import load_tensors, read_json, save_tensors, write_json
from .cost import DatasetSize, stage_image_passes
from .data.dataset import DataSource, ImageDataset, load_dataset
from .data.errors import DataError
from .data.limits import DataLimits
from .metrics import BOOTSTRAP_RESAMPLES, CONFIDENCE, bootstrap_interval, hlr, verdict
from .models import read_state_dict
from .progress import EventSink, PipelineEvent, ProgressTracker, StageReporter, StopCheck, StopRequested
from .runtime import autocast, derive_seed, pick_device
from .spec import JobSpec, resolve_spec
from .stages.context import RunContext
from .stages.distill import distill, init_drift, random_real_indices
from .stages.evaluate import StudentResult, train_student
from .stages.full_data import full_data_steps, train_full_data_student
from .stages.pretrain import pretrain
from .stages.relabel import SOFT_LABELS_FILE, relabel
from .stages.teacher import check_teacher_weights

__all__ = ["PipelineEvent", "PipelineResult", "StopRequested", "run", "check_dataset", "check_workdir"]

ARTIFACT_NAMES = tuple(MEDIA_TYPES)


@dataclass
class PipelineResult:
    artifacts: dict[str, Path]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


def _job_counts(data: ImageDataset) -> JobCounts:
    train = torch.bincount(data.train_labels, minlength=len(data.classes)).tolist()
    return JobCounts(dict(zip(data.classes, train, strict=True)), int(data.test_images.shape[0]))


def check_dataset(spec: JobSpec, data: ImageDataset) -> None:
    """What makes a spec unrunnable on a dataset (`fd2_core.admission`), caught before any stage starts.

    Raises DataError with the first problem's code and message; `details.field` names the spec field.
    """
    problems = admission_problems(spec, _job_counts(data))
    if problems:
        first = problems[0]
        details = {"field": first.field, **first.details} if first.field else dict(first.details)
        raise DataError(first.code, first.message, details or None, fix="")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _spec_changes(earlier: Any, resolved: dict[str, Any]) -> list[str]:
    if not isinstance(earlier, dict):
        return ["spec"]
    return sorted(k for k in set(earlier) | set(resolved) if earlier.get(k) != resolved.get(k))


def check_workdir(workdir: Path, resolved: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Refuse a work folder that cannot take this run: a file, not writable, or holding a run of another spec
    or other teacher weights. Reads only, so a refused run leaves the folder as it was."""
    existing = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DataError("bad_workdir", f"{existing} is a file, so {workdir} cannot be a work folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise DataError("bad_workdir", f"{existing} is not writable")
    spec_path = workdir / "spec.json"
    if spec_path.is_file():
        try:
            earlier = read_json(spec_path)
        except (OSError, ValueError):
            earlier = None
        changed = _spec_changes(earlier, resolved)
        if changed:
            shown = ", ".join(
                f"{k}: {_shown(earlier.get(k))} there, {_shown(resolved.get(k))} now" for k in changed[:3]
            ) if isinstance(earlier, dict) else "its spec.json cannot be read"
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise DataError("workdir_conflict", f"{workdir} holds a run with a different spec ({shown}{more})",
                            {"changed_fields": changed})
    inputs_path = workdir / "inputs.json"
    if inputs_path.is_file():
        try:
            earlier_inputs = read_json(inputs_path)
        except (OSError, ValueError):
            earlier_inputs = None
        earlier_weights = (earlier_inputs or {}).get("teacher_weights_sha256")
        if earlier_inputs is None or earlier_weights != inputs["teacher_weights_sha256"]:
            raise DataError("workdir_conflict", f"{workdir} holds a run started from other teacher weights",
                            fix="choose another work folder, or give the teacher weights file of that run")
        if earlier_inputs != inputs:
            done = "dropped" if earlier_inputs.get("drop_duplicates") else "kept"
            raise DataError("workdir_conflict", f"{workdir} holds a run that {done} duplicate images",
                            fix="resume it with the same --drop-duplicates choice, or choose another work folder")


def _teacher_weights_inputs(teacher_weights: str | Path | None) -> dict[str, Any]:
    """The run's recorded inputs; the weights file must exist and hold tensors (read here, before the data
    is loaded; whether they fit the backbone is checked once the number of classes is known)."""
    if not teacher_weights:
        return {"teacher_weights_sha256": None}
    path = Path(teacher_weights)
    if not path.is_file():
        raise DataError("not_found", f"teacher weights file {str(teacher_weights)!r} not found",
                        fix="check the path, or leave the teacher weights out to train the teacher from scratch")
    try:
        read_state_dict(path)
        return {"teacher_weights_sha256": sha256_of(path)}
    except OSError as exc:
        raise DataError("bad_teacher_weights",
                        f"teacher weights file {path.name!r} cannot be read: {exc.strerror or exc}",
                        fix="check the file's permissions") from None
    except Exception:  # safetensors, pickle and zip readers each raise their own errors on a bad file
        raise DataError("bad_teacher_weights",
                        f"{path.name} is neither a safetensors file nor a torch state dict of tensors") from None


def _stage_weights(spec: JobSpec, data: ImageDataset) -> dict[str, float]:
    """Progress weights: the cost model's image passes per stage (`fd2_core.cost`), so the progress bar and
    the operator's cost limit count the same work."""
    size = DatasetSize(len(data.classes), int(data.train_images.shape[0]), int(data.test_images.shape[0]))
    return stage_image_passes(spec, size)


def _quantize(ctx: RunContext, synthetic: torch.Tensor) -> torch.Tensor:
    """Normalised float [ipc,K,3,S,S] → uint8 [ipc·K,3,S,S]: what a user downloads is what we evaluate."""
    flat = synthetic.reshape(-1, *synthetic.shape[2:])
    return (ctx.denormalize(flat) * 255.0).round().to(torch.uint8).cpu()


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


def _clean(value: Any) -> Any:
    """JSON has no NaN: unknown numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _comparison(metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's comparison block: the set against a random real subset of the same size (IOR, its interval
    and the verdict, with both accuracies) and, when measured, hard-label recovery; definitions included."""
    block: dict[str, Any] = {
        "student_accuracy": metrics.get("student_accuracy"),
        "random_baseline_accuracy": metrics.get("random_baseline_accuracy"),
        "ior": metrics.get("ior"),
        "ior_ci95": metrics.get("ior_ci95"),
        "verdict": None,
        "protocol": "student trained only on the set from its stored soft labels; top-1 on the real "
        "test split; the random baseline is a random real subset of the same size, relabelled and "
        "trained identically",
        "definitions": {
            "ior": "improvement over random (DD-Ranking) = student_accuracy - random_baseline_accuracy",
            "ior_ci95": f"{100 * CONFIDENCE:.0f} % paired bootstrap interval of IOR over the test images "
            f"({BOOTSTRAP_RESAMPLES} resamples)",
            "hlr": "hard-label recovery (DD-Ranking) = full_data_accuracy - hard_label_accuracy: the student with "
            "hard labels on every real train image minus the same student with hard labels on the set",
        },
    }
    if metrics.get("ior_ci95") is not None:
        lo, hi = metrics["ior_ci95"]
        block["verdict"] = verdict(metrics["student_accuracy"], metrics["random_baseline_accuracy"], (lo, hi)).as_dict()
    if "hlr" in metrics:
        for key in ("hard_label_accuracy", "full_data_accuracy", "hlr", "hlr_ci95"):
            block[key] = metrics.get(key)
    return block


@torch.no_grad()
def _attention_of(ctx: RunContext, teacher, images_u8: torch.Tensor) -> torch.Tensor | None:
    if teacher.cal_head is None:
        return None
    teacher.eval()
    maps = []
    with autocast(ctx.device, ctx.amp):
        for start in range(0, images_u8.shape[0], 256):
            maps.append(teacher(ctx.normalize(images_u8[start : start + 256])).cal.attention.float().cpu())
    return torch.cat(maps)


def _student(
    ctx: RunContext,
    name: str,
    reporter: StageReporter,
    done_before: int,
    units: int,
    train: Callable[[int], StudentResult],
) -> StudentResult:
    """Train one evaluation student (`train(done_before)`), or reuse it: each finished student's per-test-image
    correctness is kept, so a killed evaluation resumes after its last finished student."""
    path = ctx.stage_dir / f"evaluate_{name}.safetensors"
    if path.exists():
        reporter.log(f"student {name!r} already trained; reusing it", fraction=(done_before + units) / reporter.total)
        return StudentResult.from_correct(load_tensors(path)["correct"].bool())
    result = train(done_before)
    save_tensors(path, {"correct": result.correct.to(torch.uint8)})
    return result


def _evaluate(ctx: RunContext, teacher, images_u8, labels, soft) -> dict[str, Any]:
    """Students trained on the set and tested on the real test split, and DD-Ranking's metrics (fd2_core.metrics).

    Always the student on the distilled set with its soft labels. With eval_random_baseline, the same protocol on
    a random real subset of the same size: IOR = distilled − random, its paired-bootstrap 95 % interval and the
    verdict (beats_random only when the whole interval is above 0). With eval_hlr, the same student with hard
    labels on the distilled set and the full-data student: HLR = full data − distilled (hard labels).
    """
    spec = ctx.spec
    path = ctx.stage_dir / "evaluate.json"
    reporter = ctx.tracker.stage("evaluate")
    if path.exists():
        reporter.begin(1)
        reporter.log("evaluation already finished; reusing it")
        reporter.end()
        return read_json(path)
    steps = len(soft)
    full_steps = full_data_steps(ctx) if spec.eval_hlr else 0
    reporter.begin(steps * (1 + int(spec.eval_random_baseline) + int(spec.eval_hlr)) + full_steps)
    result: dict[str, Any] = {}
    done = 0
    distilled = _student(
        ctx, "distilled", reporter, done, steps,
        lambda before: train_student(
            ctx, images_u8, labels, soft, stream="student", reporter=reporter, done_before=before
        ),
    )
    done += steps
    result["student_accuracy"] = distilled.accuracy
    if spec.eval_random_baseline:
        idx = random_real_indices(ctx, spec.ipc, "baseline-subset").reshape(-1)
        real_u8 = ctx.data.train_images[idx]
        real_labels = ctx.data.train_labels[idx]

        def train_random(before: int) -> StudentResult:
            baseline_soft = relabel(
                ctx, teacher, real_u8, real_labels, ctx.stage_dir / "baseline_soft_labels.safetensors",
                stream="baseline-relabel", parent=reporter,
            )
            return train_student(
                ctx, real_u8, real_labels, baseline_soft, stream="student", reporter=reporter, done_before=before
            )

        baseline = _student(ctx, "random", reporter, done, steps, train_random)
        done += steps
        interval = bootstrap_interval(
            distilled.correct, baseline.correct, seed=derive_seed(spec.seed, "bootstrap", "ior")
        )
        judged = verdict(distilled.accuracy, baseline.accuracy, interval)
        result["random_baseline_accuracy"] = baseline.accuracy
        result["ior"] = judged.ior
        result["ior_ci95"] = list(interval)
        result["beats_random"] = judged.beats_random
        result["verdict"] = judged.status
        reporter.log(judged.message)
    if spec.eval_hlr:
        hard = _student(
            ctx, "distilled_hard_labels", reporter, done, steps,
            lambda before: train_student(
                ctx, images_u8, labels, soft, stream="student", hard_labels=True, reporter=reporter,
                done_before=before,
            ),
        )
        done += steps
        full = _student(
            ctx, "full_data", reporter, done, full_steps,
            lambda before: train_full_data_student(ctx, reporter=reporter, done_before=before),
        )
        result["hard_label_accuracy"] = hard.accuracy
        result["full_data_accuracy"] = full.accuracy
        result["hlr"] = hlr(full.accuracy, hard.accuracy)
        result["hlr_ci95"] = list(
            bootstrap_interval(full.correct, hard.correct, seed=derive_seed(spec.seed, "bootstrap", "hlr"))
        )
    write_json(path, result)
    reporter.end(f"student accuracy {result['student_accuracy']:.3f}")
    return result


def _loading_reporter(on_event: EventSink | None, should_stop: StopCheck | None):
    """Decoding a large dataset takes minutes: report it (as the start of pretraining) and honour a stop."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise StopRequested("stop requested while loading the data")
        now = time.monotonic()
        if on_event is not None and (now - last[0] >= 1.0 or done == total):
            last[0] = now
            on_event(PipelineEvent("log", "pretrain", 0.0, 0.0, None, f"loading data: {done}/{total} images"))

    return report


def run(
    spec: JobSpec | dict[str, Any],
    dataset: DataSource,
    workdir: str | Path,
    on_event: EventSink | None = None,
    should_stop: StopCheck | None = None,
    limits: DataLimits | None = None,
    teacher_weights: str | Path | None = None,
    drop_duplicates: bool = False,
) -> PipelineResult:
    """Run (or resume) a whole job in `workdir`; raises DataError for bad input, StopRequested on stop.

    Bad input (spec against the data, the work folder, the teacher weights, the device) is refused before
    anything is written, so a refused run leaves `workdir` as it was.

    `limits` bounds what the data loader accepts (a service passes its operator settings; default: the
    library's own limits). `teacher_weights` is a local weights file the teacher starts from (safetensors or a
    torch state dict, e.g. an earlier job's `teacher.safetensors`) in the spec's `teacher_weights_mode`; it is
    checked against the dataset's classes before anything is written (DataError `teacher_classes_mismatch`,
    `bad_teacher_weights`), and a file without class names runs with a `warning` event. A resumed run must
    name the same file.
    `drop_duplicates` makes the loader drop copies within a split and test images that occur in train (a
    resumed run must ask the same); `report.json` → `dataset.duplicates` counts them either way.
    """
    spec = spec if isinstance(spec, JobSpec) else resolve_spec(spec)
    workdir = Path(workdir)
    resolved = spec.model_dump(mode="json")
    # Every check comes before the first write, so that a refused run leaves the work folder as it was.
    inputs = _teacher_weights_inputs(teacher_weights)
    if drop_duplicates:  # only when set, so that earlier work folders still resume
        inputs["drop_duplicates"] = True
    check_workdir(workdir, resolved, inputs)
    device = pick_device(spec.device)

    timings: dict[str, float] = {}
    started = time.monotonic()
    data = dataset if isinstance(dataset, ImageDataset) else load_dataset(
        dataset, spec.image_size, seed=spec.seed, test_fraction=spec.test_fraction, limits=limits or DataLimits(),
        on_progress=_loading_reporter(on_event, should_stop), drop_duplicates=drop_duplicates,
    )
    timings["load"] = time.monotonic() - started
    check_dataset(spec, data)
    weights_load = check_teacher_weights(spec, data.classes, Path(teacher_weights)) if teacher_weights else None

    resumed = (workdir / "stages").exists()
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "spec.json", resolved)
    write_json(workdir / "inputs.json", inputs)
    tracker = ProgressTracker(_stage_weights(spec, data), on_event, should_stop)
    warnings = list(weights_load.warnings) if weights_load else []
    for warning in warnings:
        tracker.stage("pretrain").warn(warning["message"])
    for data_warning in data.warnings:  # said at once, not only in the report at the end
        tracker.stage("pretrain").warn(f"data warning: {data_warning.message}")
    ctx = RunContext(
        spec=spec, data=data, workdir=workdir, device=device, tracker=tracker,
        teacher_weights=Path(teacher_weights) if teacher_weights else None,
    )
    torch.manual_seed(spec.seed)

    t = time.monotonic()
    teacher = pretrain(ctx)
    timings["pretrain"] = time.monotonic() - t

    t = time.monotonic()
    synthetic = distill(ctx, teacher.model)
    timings["distill"] = time.monotonic() - t
    images_u8 = _quantize(ctx, synthetic)
    k = ctx.num_classes
    labels = torch.arange(k).repeat(spec.ipc)
    ipc_index = torch.arange(spec.ipc).repeat_interleave(k)

    t = time.monotonic()
    soft = relabel(ctx, teacher.model, images_u8, labels, ctx.stage_dir / SOFT_LABELS_FILE)
    timings["relabel"] = time.monotonic() - t

    metrics: dict[str, Any] = {
        "teacher_accuracy": teacher.info.get("test_accuracy"),
        "teacher_val_accuracy": teacher.info.get("val_accuracy"),
        "teacher_backbone_accuracy": teacher.info.get("backbone_test_accuracy"),
    }
    if spec.evaluate:
        t = time.monotonic()
        metrics.update(_evaluate(ctx, teacher.model, images_u8, labels, soft))
        timings["evaluate"] = time.monotonic() - t

    t = time.monotonic()
    reporter = tracker.stage("package")
    reporter.begin(1)
    out = workdir / "artifacts"
    out.mkdir(exist_ok=True)
    versions = _versions()
    dataset_summary = {
        "source": data.source,
        "num_classes": k,
        "classes": data.classes,
        "splits": {"train": int(data.train_images.shape[0]), "test": int(data.test_images.shape[0])},
        "per_class_train": torch.bincount(data.train_labels, minlength=k).tolist(),
        "skipped_files": len(data.errors),
        "mean": list(data.mean),
        "std": list(data.std),
    }
    manifest = {
        "format": "fd2.distilled.v1",
        "method": spec.method,
        "spec": resolved,
        "dataset": dataset_summary,
        "versions": versions,
        "seed": spec.seed,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
    }
    artifacts = {
        "distilled.tar.gz": write_distilled_tar(
            out / "distilled.tar.gz", images_u8, labels, ipc_index, data.classes, manifest
        ),
        "soft_labels.safetensors": copy_file(ctx.stage_dir / SOFT_LABELS_FILE, out / "soft_labels.safetensors"),
        "teacher.safetensors": copy_file(ctx.stage_dir / "teacher.safetensors", out / "teacher.safetensors"),
        "preview.png": write_preview(
            out / "preview.png", images_u8, labels, ipc_index, k, spec.ipc,
            attention=_attention_of(ctx, teacher.model, images_u8),
        ),
    }
    timings["package"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    report = _clean(
        {
            "format": "fd2.report.v1",
            "created_at": datetime.now(timezone.utc).isoformat(),
            "method": spec.method,
            "spec": resolved,
            "metrics": metrics,
            "comparison": _comparison(metrics),
            "teacher": {
                **teacher.info,
                "initial_weights": inputs["teacher_weights_sha256"],
                "initial_weights_load": weights_load.as_dict() if weights_load else None,
            },
            "warnings": warnings,
            "distill": init_drift(ctx),
            "dataset": {**dataset_summary, "duplicates": data.duplicates,
                        "errors": [e.as_dict() for e in data.errors[:100]],
                        "warnings": [w.as_dict() for w in data.warnings]},
            "timings_s": {name: round(v, 3) for name, v in timings.items()},
            "resumed": resumed,
            "device": _device_info(device),
            "versions": versions,
        }
    )
    artifacts["report.json"] = write_json(out / "report.json", report)
    reporter.end()
    return PipelineResult(artifacts=artifacts, metrics=_clean(metrics), report=report)
