"""`run(spec, dataset, workdir, on_event, should_stop) -> PipelineResult`: the whole FD² job.

pretrain → distill → relabel → evaluate → package, each a module of `fd2_core.stages`.
Each stage runs its units (the shards of `fd2_core.shards`, in this process) and writes their
outputs under `workdir/stages` atomically. A re-run with the same workdir skips every saved unit, so
a killed run resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .admission import JobCounts, admission_problems
from .artifacts import MEDIA_TYPES, sha256_of
from .atomic import read_json, write_json
from .cost import DatasetSize, stage_image_passes
from .data.dataset import DataSource, ImageDataset, load_dataset
from .data.errors import DataError
from .data.limits import DataLimits
from .models import read_state_dict
from .progress import EventSink, PipelineEvent, ProgressTracker, StopCheck, StopRequested
from .runtime import pick_device
from .spec import JobSpec
from .spec_compat import data_path_changed, spec_changes
from .spec_resolution import ENCODING_FIELDS, fit_label_budget, resolve_spec
from .stages.context import RunContext
from .stages.distill import distill
from .stages.evaluate import evaluate, teacher_metrics
from .stages.package import Provenance, package, quantize
from .stages.pretrain import pretrain
from .stages.relabel import relabel
from .stages.teacher import check_teacher_weights
from .timings import Timings

__all__ = [
    "OpenedRun", "PipelineEvent", "PipelineResult", "StopRequested", "check_dataset", "check_workdir",
    "checked_inputs", "open_run", "run",
]

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
    """What makes a spec unrunnable on a dataset (`fd2_core.admission`),
    caught before any stage starts.

    Raises DataError with the first problem's code and message;
    `details.field` names the spec field.
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
    return spec_changes(earlier, resolved)


def check_workdir(workdir: Path, resolved: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Refuse a work folder that cannot take this run: a file, not writable, or holding a run of
    another spec or other teacher weights.
    Reads only, so a refused run leaves the folder as it was."""
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
        if isinstance(earlier, dict) and data_path_changed(earlier):
            raise DataError("workdir_conflict", f"{workdir} holds a run started on the earlier crop and resampling "
                            "rules, which this version no longer runs, so it cannot be resumed",
                            {"changed_fields": ["data_path"]},
                            fix="choose another work folder (the earlier run's finished artifacts stay valid)")
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


def _teacher_weights_inputs(teacher_weights: str | Path | None, spec: JobSpec) -> dict[str, Any]:
    """The run's recorded inputs; the weights file must exist and hold
    tensors (read here, before the data is loaded; whether they fit the
    backbone is checked once the number of classes is known).
    A weights file starts one teacher, so a committee refuses it."""
    if not teacher_weights:
        return {"teacher_weights_sha256": None}
    if spec.committee is not None:
        raise DataError("bad_teacher_weights", "a teacher weights file starts one teacher, and this spec names a "
                        f"committee of {len(spec.committee)}",
                        fix="drop the committee to start that teacher from the file, or drop the weights file")
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
    # safetensors, pickle and zip readers each raise their own errors on a bad file
    except Exception:
        raise DataError("bad_teacher_weights",
                        f"{path.name} is neither a safetensors file nor a torch state dict of tensors") from None


def stage_weights(spec: JobSpec, data: ImageDataset) -> dict[str, float]:
    """Progress weights: the cost model's image passes per stage (`fd2_core.cost`), so the progress
    bar and the operator's cost limit count the same work."""
    size = DatasetSize(len(data.classes), int(data.train_images.shape[0]), int(data.test_images.shape[0]))
    return stage_image_passes(spec, size)


def _loading_reporter(on_event: EventSink | None, should_stop: StopCheck | None):
    """Decoding a large dataset takes minutes: report it (as the start of
    pretraining) and honour a stop."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise StopRequested("stop requested while loading the data")
        now = time.monotonic()
        if on_event is not None and (now - last[0] >= 1.0 or done == total):
            last[0] = now
            on_event(PipelineEvent("log", "pretrain", 0.0, 0.0, None, f"loading data: {done}/{total} images"))

    return report


def _load(
    dataset: DataSource,
    spec: JobSpec,
    limits: DataLimits | None,
    on_progress: Callable[[int, int], None],
    drop_duplicates: bool,
) -> ImageDataset:
    """The data as tensors: an ImageDataset as it is, anything else through
    the loader at the spec's size."""
    if isinstance(dataset, ImageDataset):
        return dataset
    return load_dataset(
        dataset, spec.image_size, seed=spec.seed, test_fraction=spec.test_fraction, limits=limits or DataLimits(),
        on_progress=on_progress, drop_duplicates=drop_duplicates,
    )


def _open_workdir(workdir: Path, resolved: dict[str, Any], inputs: dict[str, Any]) -> bool:
    """The run's first writes: the folder, `spec.json` and `inputs.json`
    (what a resume is checked against).
    Returns whether the folder already held stages, i.e. whether this run resumes."""
    resumed = (workdir / "stages").exists()
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "spec.json", resolved)
    write_json(workdir / "inputs.json", inputs)
    return resumed


def _announce(tracker: ProgressTracker, provenance: Provenance, data: ImageDataset) -> None:
    """Warnings are said at once (as the start of pretraining), not only in
    the report at the end."""
    for warning in provenance.warnings:
        tracker.stage("pretrain").warn(warning["message"])
    for data_warning in data.warnings:
        tracker.stage("pretrain").warn(f"data warning: {data_warning.message}")


def checked_inputs(
    spec: JobSpec, workdir: Path, teacher_weights: str | Path | None, drop_duplicates: bool
) -> dict[str, Any]:
    """The run's recorded inputs (`inputs.json`) after the checks that need no data: the teacher
    weights file and the work folder (`check_workdir`).
    Writes nothing."""
    inputs = _teacher_weights_inputs(teacher_weights, spec)
    if drop_duplicates:  # only when set, so that earlier work folders still resume
        inputs["drop_duplicates"] = True
    check_workdir(workdir, spec.model_dump(mode="json"), inputs)
    return inputs


@dataclass
class OpenedRun:
    """A run whose inputs are checked, data loaded and work folder opened:
    what every stage (or shard) starts from."""

    spec: JobSpec
    workdir: Path
    data: ImageDataset
    device: torch.device
    provenance: Provenance
    timings: Timings
    teacher_weights: Path | None

    def context(self, tracker: ProgressTracker) -> RunContext:
        return RunContext(spec=self.spec, data=self.data, workdir=self.workdir, device=self.device, tracker=tracker,
                          teacher_weights=self.teacher_weights)


def budget_as_recorded(spec: JobSpec, workdir: Path) -> JobSpec:
    """The spec the work-folder check compares before the data is loaded: a label budget picks the
    encoding only once the classes are known, so until then the folder's earlier pick stands in (the
    check runs again after `fit_label_budget`)."""
    if spec.label_budget_bytes is None or not (workdir / "spec.json").is_file():
        return spec
    try:
        earlier = read_json(workdir / "spec.json")
        return JobSpec.model_validate({**spec.model_dump(), **{k: earlier[k] for k in ENCODING_FIELDS}})
    except (OSError, ValueError, TypeError, KeyError):  # check_workdir says what is wrong with it
        return spec


def open_run(
    spec: JobSpec | dict[str, Any],
    dataset: DataSource,
    workdir: str | Path,
    on_event: EventSink | None = None,
    should_stop: StopCheck | None = None,
    limits: DataLimits | None = None,
    teacher_weights: str | Path | None = None,
    drop_duplicates: bool = False,
) -> OpenedRun:
    """Check a run's inputs, load its data and open its work folder (`spec.json`, `inputs.json`);
    the arguments and errors are `run`'s.
    Every check comes before the first write, so a refused run leaves `workdir` as it was."""
    spec = spec if isinstance(spec, JobSpec) else resolve_spec(spec)
    workdir = Path(workdir)
    inputs = checked_inputs(budget_as_recorded(spec, workdir), workdir, teacher_weights, drop_duplicates)
    device = pick_device(spec.device)
    timings = Timings()
    with timings.measure("load"):
        data = _load(dataset, spec, limits, _loading_reporter(on_event, should_stop), drop_duplicates)
    check_dataset(spec, data)
    if spec.label_budget_bytes is not None:  # LabelBudgetError (a ValueError) when nothing fits
        spec = fit_label_budget(spec, len(data.classes), class_names=data.classes)
        check_workdir(workdir, spec.model_dump(mode="json"), inputs)
    resolved = spec.model_dump(mode="json")
    weights_load = check_teacher_weights(spec, data.classes, Path(teacher_weights)) if teacher_weights else None
    provenance = Provenance(inputs, weights_load, resumed=_open_workdir(workdir, resolved, inputs))
    return OpenedRun(spec, workdir, data, device, provenance, timings,
                     Path(teacher_weights) if teacher_weights else None)


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
    """Run (or resume) a whole job in `workdir`; raises DataError for bad
    input, StopRequested on stop.

    Bad input (spec against the data, the work folder, the teacher weights, the device) is refused
    before anything is written, so a refused run leaves `workdir` as it was.
    `limits` bounds what the data loader accepts (a service passes its
    operator settings; default: the library's own limits).
    `teacher_weights` is a local weights file the teacher starts from (safetensors or a torch state
    dict, e.g. an earlier job's `teacher.safetensors`) in the spec's `teacher_weights_mode`, checked
    against the dataset's classes first (DataError `teacher_classes_mismatch`,
    `bad_teacher_weights`; a file without class names runs with a `warning` event).
    `drop_duplicates` makes the loader drop copies within a split and test images that occur in
    train (`report.json` → `dataset.duplicates` counts them either way).
    A resumed run must name the same weights file and make the same `drop_duplicates` choice.

    Each stage runs the job's units of `fd2_core.shards.plan_shards` with `max_workers` 1, in plan
    order, through the same unit functions as a shard: the teachers, the class blocks and their
    merge, one range of relabel epochs and its join, the students; then the package. One resume rule
    holds for both: a unit whose outputs are saved is skipped. After every shard of the job ran
    elsewhere, `run` trains nothing.
    """
    opened = open_run(spec, dataset, workdir, on_event, should_stop, limits, teacher_weights, drop_duplicates)
    spec, data, timings, provenance = opened.spec, opened.data, opened.timings, opened.provenance
    tracker = ProgressTracker(stage_weights(spec, data), on_event, should_stop)
    _announce(tracker, provenance, data)
    ctx = opened.context(tracker)
    torch.manual_seed(spec.seed)

    with timings.measure("pretrain"):
        teacher = pretrain(ctx)
    with timings.measure("distill"):
        synthetic = distill(ctx, teacher)
    distilled = quantize(ctx, synthetic)
    with timings.measure("relabel"):
        soft = relabel(ctx, teacher, distilled.images, distilled.labels)
    metrics = teacher_metrics(teacher.info)
    if spec.evaluate:
        with timings.measure("evaluate"):
            metrics.update(evaluate(ctx, teacher, distilled.images, distilled.labels, soft))
    artifacts, report = package(ctx, teacher, distilled, metrics, timings, provenance)
    # the report's metrics: these plus the storage figures package measured, JSON-safe
    return PipelineResult(artifacts=artifacts, metrics=report["metrics"], report=report)
