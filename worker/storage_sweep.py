"""Job folders on disk: free a finished job's space, and the workers' periodic storage sweep.

A finished job never runs again (a late duplicate message is skipped). Checkpoints under
`<workdir>/stages` exist only so an interrupted run can resume. So after success only
`<workdir>/artifacts` is kept (`prune_checkpoints`; checkpoints such as the teacher and soft labels
were copied there), and a cancelled or failed job's folder is removed whole (`discard_workdir`). The
worker log keeps the reason of a failure.

The sweep:
1. With `FD2_ARTIFACT_RETENTION_DAYS` set, every finished job that finished longer ago than that
   loses its artifact files and work folder; its row stays, marked `artifacts_expired`
   (`store.retention`: files first, then the mark, so a crash in between is finished by the next
   sweep).
2. A job folder whose job row is gone (a crash between `DELETE /v1/jobs/{id}` committing and
   removing the files) is removed once it is older than `LEFTOVER_GRACE`.

Every worker runs it at start and then every `FD2_STORAGE_SWEEP_INTERVAL_S`, in the worker because
that is where the long-lived periodic machinery is (`worker.recovery`) and the job folders are
written; several workers sweeping at once only repeat idempotent removals and conditional updates.
The clock is an argument, so tests sweep with any `now` instead of waiting.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fd2_config.settings import Settings
from store.datasets import remove_tree
from store.job_files import leftover_job_folders, remove_job_files
from store.models import utcnow
from store.retention import jobs_past_retention, mark_artifacts_expired
from worker.outages import log_failure, transact

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "stages"


def prune_checkpoints(workdir: Path) -> None:
    """Keep the artifacts of a succeeded job, drop its resumable state."""
    _remove(workdir / CHECKPOINTS_DIR)


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
# row.
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
    while True:
        due = transact(settings, jobs_past_retention, finished_before, RETENTION_BATCH, retry=False)
        fresh = [job for job in due if job.id not in expired]
        for job in fresh:
            remove_job_files(settings, job.id, job.artifact_paths)
        transact(settings, mark_artifacts_expired, [job.id for job in fresh], now, retry=False)
        expired.extend(job.id for job in fresh)
        if len(due) < RETENTION_BATCH or not fresh:
            return expired


def remove_leftover_folders(settings: Settings, now: datetime) -> list[Path]:
    """Remove job folders without a job row that are older than `LEFTOVER_GRACE`; returns them."""
    leftovers = transact(settings, leftover_job_folders, settings, now - LEFTOVER_GRACE, retry=False)
    for folder in leftovers:
        remove_tree(folder)
    return leftovers


def sweep_storage(settings: Settings, now: datetime | None = None) -> SweepResult:
    """One sweep (module docstring) as of `now` (default: the current time)."""
    now = now or utcnow()
    result = SweepResult(expired=expire_old_artifacts(settings, now), leftovers=remove_leftover_folders(settings, now))
    if result.expired or result.leftovers:
        log.info("storage sweep: artifacts of %d job(s) expired, %d leftover job folder(s) removed",
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
