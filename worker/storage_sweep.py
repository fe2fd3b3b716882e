"""Files on disk: free a finished job's space, and the workers' periodic storage sweep over every
folder the service writes.

A finished job never runs again (a late duplicate message is skipped). Checkpoints under
`<workdir>/stages` exist only so an interrupted run can resume. So after success only
`<workdir>/artifacts` is kept (`prune_checkpoints`; checkpoints such as the teacher and soft labels
were copied there), and a cancelled or failed job's folder is removed whole (`discard_workdir`). The
worker log keeps the reason of a failure.

The sweep:
1. With `FD2_ARTIFACT_RETENTION_DAYS` set, every finished job that finished longer ago than that
   loses its artifact files and work folder; its row stays, marked `artifacts_expired`
   (`store.retention`: files first, then the mark, so a crash in between is finished by the next
   sweep; a job whose files the disk keeps, e.g. read-only, stays unmarked until they are gone).
2. Whatever no row and no live request owns is removed (`store.folders` lists the paths and their
   owners): an upload's staging and lease files once no request holds the lease and they were
   last written more than `FD2_UPLOAD_BODY_TIMEOUT_S` ago (a crash mid-body); a dataset folder
   without a dataset row and without a held lease (a crash mid-extraction, or between a dataset
   delete's commit and its files) and a job folder without a job row (the same for a job delete)
   once older than `LEFTOVER_GRACE`. Each owner's lease is taken before its rows are read and kept
   until its paths are gone, so a request that ends meanwhile has committed its row.

Every worker runs it at start and then every `FD2_STORAGE_SWEEP_INTERVAL_S`, in the worker because
that is where the long-lived periodic machinery is (`worker.recovery`) and the job folders are
written; several workers sweeping at once only repeat idempotent removals and conditional updates.
The clock is an argument, so tests sweep with any `now` instead of waiting.
"""

from __future__ import annotations

import logging
import shutil
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fd2_config.settings import Settings
from store.datasets import remove_tree
from store.folders import LEASE_SUFFIX, LOOKUP_BATCH, Leftover, lease_if_free, owners_with_rows, stale_paths
from store.job_files import remove_job_files
from store.models import utcnow
from store.retention import jobs_past_retention, mark_artifacts_expired
from worker.outages import log_failure, transact

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "stages"
FETCHED_DIR = "data"  # a job's objects fetched from the object store (`worker.source_check`)


def prune_checkpoints(workdir: Path) -> None:
    """Keep the artifacts of a succeeded job, drop its resumable state and the objects it fetched
    (`data/`; the object cache keeps them)."""
    _remove(workdir / CHECKPOINTS_DIR)
    _remove(workdir / FETCHED_DIR)


def discard_workdir(workdir: Path) -> None:
    """Remove everything a cancelled or failed job left behind."""
    _remove(workdir)


def _remove(path: Path) -> None:
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("could not remove %s completely", path)


RETENTION_BATCH = 200
# Longer than any submission takes between writing a manifest into the job folder and committing the
# row, and than an extraction, where a shared file system's locks do not reach the sweeping host.
LEFTOVER_GRACE = timedelta(hours=1)


@dataclass
class SweepResult:
    expired: list[str] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)


def expire_old_artifacts(settings: Settings, now: datetime) -> list[str]:
    """Remove the files of jobs finished before `now - retention` and mark them;
    returns the marked job ids."""
    days = settings.artifact_retention_days
    if days is None:
        return []
    finished_before = now - timedelta(days=days)
    expired: list[str] = []
    tried: set[str] = set()
    while True:
        due = transact(settings, jobs_past_retention, finished_before, RETENTION_BATCH, retry=False)
        fresh = [job for job in due if job.id not in tried]
        tried.update(job.id for job in fresh)
        # a job whose files the disk keeps (read-only) stays unmarked: the mark says the files are
        # gone, and the next sweep tries again
        gone = [job.id for job in fresh if remove_job_files(settings, job.id, job.artifact_paths)]
        if len(gone) < len(fresh):
            log.warning("storage sweep: the files of %d expired job(s) could not be removed; retried "
                        "at the next sweep", len(fresh) - len(gone))
        transact(settings, mark_artifacts_expired, gone, now, retry=False)
        expired.extend(gone)
        if len(due) < RETENTION_BATCH or not fresh:
            return expired


def remove_leftover_folders(settings: Settings, now: datetime) -> list[Path]:
    """Remove what no row and no live upload owns (module docstring, step 2); returns the paths."""
    stale = stale_paths(settings, now, settings.upload_body_timeout_s, LEFTOVER_GRACE.total_seconds())
    removed: list[Path] = []
    for start in range(0, len(stale), LOOKUP_BATCH):
        removed.extend(_remove_unowned(settings, stale[start:start + LOOKUP_BATCH]))
    return removed


def _remove_unowned(settings: Settings, batch: list[Leftover]) -> list[Path]:
    removed: list[Path] = []
    with ExitStack() as leases:
        free = [item for item in batch
                if not item.is_dataset or leases.enter_context(lease_if_free(settings, item.owner))]
        owners = [item.owner for item in free if item.folder is not None]
        owned = transact(settings, owners_with_rows, owners, retry=False) if owners else set()
        for item in free:
            if item.folder is not None and item.owner not in owned and remove_tree(item.folder):
                removed.append(item.folder)
            # the lease file last: while it is there, no other sweep removes this owner's files
            for path in sorted(item.files, key=lambda path: path.suffix == LEASE_SUFFIX):
                try:
                    path.unlink(missing_ok=True)
                    removed.append(path)
                except OSError as exc:  # the rest of the sweep still runs; the next one tries again
                    log.warning("could not remove %s: %s", path, exc)
    return removed


def sweep_storage(settings: Settings, now: datetime | None = None) -> SweepResult:
    """One sweep (module docstring) as of `now` (default: the current time)."""
    now = now or utcnow()
    result = SweepResult(expired=expire_old_artifacts(settings, now), leftovers=remove_leftover_folders(settings, now))
    if result.expired or result.leftovers:
        log.info("storage sweep: artifacts of %d job(s) expired, %d leftover file(s) and folder(s) removed",
                 len(result.expired), len(result.leftovers))
    return result


class StorageSweepLoop:
    """Daemon thread: a sweep at start, then one every `interval_s` until `stop()`; a failed sweep
    (database down) is logged and tried again next round."""

    def __init__(self, settings: Settings, interval_s: float) -> None:
        self._settings, self._interval_s = settings, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd2-storage-sweep", daemon=True)

    def start(self) -> StorageSweepLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sweep_storage(self._settings)
            except Exception as exc:  # the database may be briefly away; the next round tries again
                log_failure(log, "storage sweep failed; next try in the next round", exc)
            if self._stop.wait(self._interval_s):
                break
