"""Defence in depth: the worker checks the data a job will read again, just before the pipeline reads it.

The API validated the upload or the manifest at submit time, but files can change afterwards (a mounted share,
an operator's copy, a bug). So before any stage starts, with the worker's own settings:
- an uploaded dataset is read only from the folder the service made for it (`<datasets_dir>/<dataset id>/`),
  never through a link that leads elsewhere;
- a manifest job's stored manifest must sit in the job's own folder, be no larger than the manifest limit, and
  its root must still be under the worker's `allowed_data_roots`; a row leading out of the root (the API
  refused those at submission, so the file was edited) refuses the job;
- the layout is scanned again under the operator's limits (files, classes, manifest rows; links not followed);
- the job is admitted again (`fd2_core.admission`: classes, ipc, test split, cost and decoded size) with the
  counts actually found; a problem fails the job with its code and message.
The pipeline's loader then skips links again and checks each image's pixel count before decoding it.
Torch-free, so it can run before the pipeline is imported.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fd2_config.settings import Settings
from fd2_core.admission import JobCounts, admission_problems
from fd2_core.data.errors import DataWarning
from fd2_core.data.layout import PATH_ESCAPE_REASONS, DatasetLayout, scan_manifest_items, scan_source
from fd2_core.data.limits import DataLimits
from fd2_core.progress import EventSink, PipelineEvent, StopCheck, StopRequested
from fd2_core.spec import JobSpec
from store.datasets import dataset_path
from store.jobs import job_workdir


class SourceRejected(Exception):
    """The job's data may not be read; `code` is the job error's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class JobSource:
    """Where a job's data is, as recorded in the database (nothing on disk has been looked at yet)."""

    kind: Literal["dataset", "manifest", "objects"]
    path: str
    dataset_id: str | None = None
    # Intake findings a rescan cannot see again (names were decoded when the upload was unpacked), carried into
    # the job's report and events: `{code, message, details}` each.
    warnings: tuple[dict[str, Any], ...] = ()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def confined_dataset_folder(settings: Settings, dataset_id: str, recorded: str) -> Path:
    """The uploaded dataset's folder, refused when it (or a link on the way) leads out of its own folder."""
    folder = Path(recorded)
    own = dataset_path(settings, dataset_id)
    if _inside(folder, own.parent) and not _inside(folder.resolve(), own.resolve()):
        raise SourceRejected("path_escape", "the dataset folder leads outside the dataset's own storage")
    if folder.is_symlink() or not folder.is_dir():
        raise SourceRejected("not_found", "the dataset's files are missing")
    return folder.resolve()


def load_stored_manifest(settings: Settings, job_id: str, recorded: str, limits: DataLimits) -> dict[str, Any]:
    """The `{"root", "items"}` the API stored for a manifest job, with its root re-checked."""
    path = Path(recorded)
    workdir = job_workdir(settings, job_id).resolve()
    if path.is_symlink() or not _inside(path.resolve(), workdir) or not path.is_file():
        raise SourceRejected("not_found", "the job's manifest is missing or outside the job's folder")
    if path.stat().st_size > limits.max_manifest_bytes:
        raise SourceRejected("too_large", f"the job's manifest is larger than {limits.max_manifest_bytes} bytes")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise SourceRejected("bad_manifest", "the job's stored manifest is not valid JSON") from None
    root, items = (stored.get("root"), stored.get("items")) if isinstance(stored, dict) else (None, None)
    if not isinstance(root, str) or not isinstance(items, list):
        raise SourceRejected("bad_manifest", 'the job\'s stored manifest needs "root" and "items"')
    resolved = Path(root).resolve()
    if not any(_inside(resolved, allowed) for allowed in settings.allowed_data_roots):
        raise SourceRejected("data_root_not_allowed", "the manifest root is not under this worker's allowed data roots")
    if len(items) > limits.max_manifest_rows:
        raise SourceRejected("too_many_files", f"the manifest has more than {limits.max_manifest_rows} rows")
    return {"root": str(resolved), "items": items}


def fetched_objects(settings: Settings, job_id: str, recorded: str, spec: JobSpec, limits: DataLimits,
                    on_event: EventSink | None = None, should_stop: StopCheck | None = None) -> DatasetLayout:
    """The admitted objects of a job on an s3:// prefix (its `objects.json`, confined to the job's folder)
    fetched through the worker's object cache into `<job workdir>/data/`, laid out as admitted, and
    scanned as an upload's folder is. Progress goes to `on_event` as `log` lines at most once a second
    ("fetching 1 234 / 5 994 objects, …"); `should_stop` is polled before each object. Raises
    SourceRejected with the store's code (`object_changed` for an object that is not the admitted
    version, `no_such_key`, `insufficient_storage`, …) and StopRequested on a stop."""
    from fd2_core.data.object_fetch import FetchStopped, ObjectCache, Progress, fetch_objects
    from fd2_core.data.object_store import ObjectStore, StoredObject, StoreError

    path = Path(recorded)
    folder = job_workdir(settings, job_id)
    if not _inside(path.resolve(), folder.resolve()) or not path.is_file():
        raise SourceRejected("not_found", "the job's object list is missing or outside the job's folder")
    if path.stat().st_size > limits.max_manifest_bytes * 4:
        raise SourceRejected("too_large", "the job's object list is larger than the manifest limit allows")
    try:
        admitted = json.loads(path.read_text())
        items = admitted["items"]
        objects = [StoredObject(str(i["key"]), int(i["size"]), str(i["etag"]), str(i.get("bucket", "")))
                   for i in items]
        relative = [str(i["path"]) for i in items]
        bucket = str(admitted["bucket"])
    except (ValueError, KeyError, TypeError):
        raise SourceRejected("bad_manifest", "the job's object list is not the list the API wrote") from None
    if any(p.startswith("/") or ".." in p.split("/") for p in relative):
        raise SourceRejected("path_escape", "the job's object list names a path outside the job's data folder")
    data = folder / "data"
    assert settings.object_cache_dir is not None
    cache = ObjectCache(settings.object_cache_dir, settings.object_cache_max_bytes, settings.min_free_disk_bytes)
    last = [0.0]

    def report(progress: Progress) -> None:
        now = time.monotonic()
        if on_event is not None and (now - last[0] >= 1.0 or progress.done == progress.total):
            last[0] = now
            on_event(PipelineEvent("log", "pretrain", 0.0, 0.0, None, progress.message()))

    try:
        fetch_objects(ObjectStore(settings.s3_endpoint_url), bucket, objects, cache, data, relative,
                      workers=settings.fetch_concurrency, on_progress=report, should_stop=should_stop)
    except StoreError as exc:
        raise SourceRejected(exc.code, exc.message) from None
    except FetchStopped:
        raise StopRequested("stop requested while fetching the data") from None
    if admitted.get("kind") == "manifest":
        rows = [{"path": i["path"], "label": i["label"], "split": i["split"]} for i in items]
        layout = scan_manifest_items(data, rows, test_fraction=spec.test_fraction, seed=spec.seed, limits=limits)
    else:
        layout = scan_source(data, test_fraction=spec.test_fraction, seed=spec.seed, limits=limits)
    layout.shown_as = str(admitted.get("uri", ""))
    check_admission(settings, spec, layout)
    return layout


def check_admission(settings: Settings, spec: JobSpec, layout: DatasetLayout) -> None:
    """Admission with the counts found now (the files may have changed since submission): the first problem
    raises SourceRejected with its code and message."""
    problems = admission_problems(spec, JobCounts.of_splits(layout.per_class), settings)
    if problems:
        raise SourceRejected(problems[0].code, problems[0].message)


def prepare_source(settings: Settings, job_id: str, source: JobSource, spec: JobSpec,
                   on_event: EventSink | None = None, should_stop: StopCheck | None = None) -> DatasetLayout:
    """The checked layout of what this job may read, after every check above: scanned once here and handed to
    the pipeline as it is (the loader decodes it without a second scan).

    Raises SourceRejected, or DataError when the data as it is now cannot be used (its code is kept).
    """
    limits = DataLimits(**settings.data_limit_values())
    if source.kind == "dataset":
        assert source.dataset_id is not None
        folder = confined_dataset_folder(settings, source.dataset_id, source.path)
        layout = scan_source(folder, test_fraction=spec.test_fraction, seed=spec.seed, limits=limits)
        check_admission(settings, spec, layout)
        layout.warnings[:0] = [DataWarning(w["code"], w["message"], w.get("details") or {}) for w in source.warnings]
        return layout
    if source.kind == "objects":
        return fetched_objects(settings, job_id, source.path, spec, limits, on_event, should_stop)
    manifest = load_stored_manifest(settings, job_id, source.path, limits)
    layout = scan_manifest_items(Path(manifest["root"]), manifest["items"], test_fraction=spec.test_fraction,
                                 seed=spec.seed, limits=limits)
    escaping = [e.path for e in layout.errors if e.reason in PATH_ESCAPE_REASONS]
    if escaping:
        raise SourceRejected("path_escape", f"manifest row {escaping[0]!r} leads outside the manifest root")
    check_admission(settings, spec, layout)
    return layout


__all__ = ["JobSource", "SourceRejected", "confined_dataset_folder", "load_stored_manifest", "prepare_source"]
