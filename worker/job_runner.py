"""Run one job: claim it, run the pipeline in its working folder, record the outcome.

No database session is held while the pipeline runs: every write (claim,
progress, heartbeat, cancel poll, final state) is its own short
transaction, so a long job never pins a connection or a SQLite write lock.
Writes that record the job are retried through a database outage (`worker.outages`); the heartbeat
and the cancel poll are not: they run again seconds later anyway.
The working folder `<FD2_HOME>/jobs/<job id>/` keeps the pipeline's checkpoints, so running the same
job again after a crash, a redelivery or a worker shutdown resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.datasets import dataset_path, get_dataset
from store.db import session_scope
from store.job_states import claim_job, end_job, release_job
from store.jobs import (
    add_event,
    get_job,
    heartbeat,
    is_cancel_requested,
    job_workdir,
    update_progress,
)
from store.models import EventKind, Job, JobStatus
from worker.callback_delivery import start_callback
from worker.heartbeat import Heartbeat
from worker.outages import with_retries
from worker.progress import EventRecord, ProgressReporter, ProgressUpdate
from worker.source_check import JobSource, SourceRejected, prepare_source
from worker.state import WorkerState
from worker.stopping import StopPoller, StopReason
from worker.workdir_cleanup import discard_workdir, prune_checkpoints

log = logging.getLogger(__name__)

# Dataset warnings made while the upload was unpacked (member names decoded); a job's own scan
# cannot see them again, so they travel with the job.
# Duplicate warnings are not carried: the job's loader finds them itself.
UNPACKING_WARNINGS = ("names_",)

# A job whose runs keep dying (say, the kernel's OOM killer) is failed
# instead of being retried forever.
MAX_ATTEMPTS = 5
MESSAGE_LIMIT = 300


class JobReleased(Exception):
    """The worker is shutting down: the job went back to `queued` and its
    message must be requeued."""


@dataclass(frozen=True)
class ClaimedJob:
    """What the run needs from the job row, read inside the claim transaction."""

    id: str
    spec: dict[str, Any]
    source: JobSource | None
    attempts: int
    callback_url: str | None
    tenant_id: str = ""


@dataclass
class DatabaseProgressSink:
    """Writes one throttled batch of progress and events in its own transaction."""

    settings: Settings
    job_id: str

    def write(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        with_retries(self.settings, lambda: self._write_once(update, events), f"job {self.job_id}: progress write")

    def _write_once(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        with session_scope(self.settings) as session:
            if update is not None:
                update_progress(
                    session,
                    self.job_id,
                    stage=update.stage,
                    progress=update.progress,
                    stage_progress=update.stage_progress,
                    eta_seconds=update.eta_seconds,
                )
            for record in events:
                add_event(
                    session,
                    self.job_id,
                    record.kind,
                    record.message,
                    stage=record.stage,
                    progress=record.progress,
                    data=record.data,
                )


class JobRunner:
    """Runs jobs for one worker process (`me` is its `<host>:<pid>`
    identity, `state` its `WorkerState`)."""

    def __init__(self, state: WorkerState, me: str, app: Any = None) -> None:
        self.state = state
        self.settings = state.settings
        self.limits = state.limits
        self.me = me
        self.app = app  # the Celery app that publishes shard messages (default: the worker's own)

    def run(self, job_id: str) -> str:
        """Run the job to a final state; returns that state, or `skipped`
        when there was nothing to do."""
        # before the claim commits, so recovery never sees it unheld here
        self.state.running_here.add(job_id)
        try:
            claimed = self._claim(job_id)
            if claimed is None:
                log.info("job %s: nothing to do (finished, cancelled or held by a live worker)", job_id)
                return "skipped"
            return self._run_claimed(claimed)
        finally:
            self.state.running_here.discard(job_id)

    def _run_claimed(self, claimed: ClaimedJob) -> str:
        job_id = claimed.id
        if claimed.attempts > MAX_ATTEMPTS:
            return self._fail(job_id, "too_many_attempts", f"the job was interrupted {MAX_ATTEMPTS} times")
        if claimed.source is None:
            return self._fail(job_id, "not_found", "the job's dataset no longer exists")
        workdir = job_workdir(self.settings, job_id)
        self._event(job_id, EventKind.STARTED, self._start_message(claimed, workdir), {"worker": self.me})
        if _max_workers(claimed.spec) > 1:  # spread over several workers: docs/ARCHITECTURE.md
            from worker.shard_runner import ShardRunner

            # a long data scan
            with Heartbeat(lambda: self._beat(job_id), self.limits.heartbeat_interval_s):
                return ShardRunner(self.state, self.me, self.app).plan(claimed, claimed.tenant_id)
        deadline = time.monotonic() + self.limits.soft_time_limit_s
        poller = StopPoller(lambda: self._cancel_requested(job_id), deadline=deadline, shutdown=self.state.shutdown)
        reporter = ProgressReporter(DatabaseProgressSink(self.settings, job_id))
        with Heartbeat(lambda: self._beat(job_id), self.limits.heartbeat_interval_s):
            return self._run_pipeline(claimed, workdir, reporter, poller)

    # ---------------------------------------------------------------- the run and its outcomes

    def _run_pipeline(
        self, job: ClaimedJob, workdir: Path, reporter: ProgressReporter, poller: StopPoller
    ) -> str:
        # Imported here, not at module level: the worker parent process
        # must not load torch (celery_app).
        from celery.exceptions import SoftTimeLimitExceeded
        from pydantic import ValidationError

        from fd2_core.data.errors import DataError
        from fd2_core.data.limits import DataLimits
        from fd2_core.pipeline import StopRequested, run
        from fd2_core.spec_resolution import resolve_spec

        assert job.source is not None
        try:
            spec = resolve_spec(job.spec)
            # Re-checked here, not trusted from submission: the files may have changed since.
            data = prepare_source(self.settings, job.id, job.source, spec)
            limits = DataLimits(**self.settings.data_limit_values())
            result = run(spec, data, workdir, on_event=reporter, should_stop=poller, limits=limits)
        except SourceRejected as exc:
            reporter.flush()
            return self._fail(job.id, exc.code, exc.message)
        except StopRequested:
            reporter.flush()
            return self._stopped(job.id, poller.reason or StopReason.CANCELLED)
        except SoftTimeLimitExceeded:
            reporter.flush()
            return self._stopped(job.id, StopReason.TIME_LIMIT)
        except DataError as exc:
            reporter.flush()
            return self._fail(job.id, exc.code, str(exc))
        except ValidationError as exc:  # a stored spec the current schema no longer accepts
            log.warning("job %s: stored spec is invalid: %s", job.id, exc)
            return self._fail(job.id, "invalid_spec", _validation_message(exc))
        except Exception as exc:  # the traceback stays in the worker log, never in the job resource
            log.exception("job %s failed", job.id)
            reporter.flush()
            return self._finish(job.id, JobStatus.FAILED, error=_unexpected_error(exc, self.settings))
        reporter.flush()
        try:
            self._register_artifacts(job.id, result.artifacts)
        except Exception as exc:
            log.exception("job %s: registering artifacts failed", job.id)
            return self._finish(job.id, JobStatus.FAILED, error=_unexpected_error(exc, self.settings))
        return self._finish(job.id, JobStatus.SUCCEEDED, metrics=dict(result.metrics))

    def _stopped(self, job_id: str, reason: StopReason) -> str:
        if reason is StopReason.SHUTDOWN:
            with_retries(self.settings, lambda: self._release(job_id), f"job {job_id}: release")
            raise JobReleased(job_id)
        if reason is StopReason.TIME_LIMIT:
            limit = f"{self.limits.soft_time_limit_s:.0f} s"
            return self._fail(job_id, "time_limit", f"the job ran past its {limit} limit")
        return self._finish(job_id, JobStatus.CANCELLED)

    def _fail(self, job_id: str, code: str, message: str) -> str:
        return self._finish(job_id, JobStatus.FAILED, error=_error(code, message))

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        metrics: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> str:
        """Write the final state (one transaction), free the disk, then
        start the callback if any."""
        written, current, callback_url = with_retries(
            self.settings, lambda: self._write_final(job_id, status, metrics, error), f"job {job_id}: final state"
        )
        if not written:  # someone else finished it meanwhile (e.g. recovery cancelled it)
            log.info("job %s was already %s", job_id, current or "gone")
            return current or status
        log.info("job %s: %s", job_id, status)
        self._free_disk(job_id, status)
        if callback_url:
            start_callback(job_id, self.settings)
        return status

    def _free_disk(self, job_id: str, status: JobStatus) -> None:
        """A succeeded job keeps its artifacts only; a failed or cancelled
        one leaves nothing (`workdir_cleanup`)."""
        workdir = job_workdir(self.settings, job_id)
        if status == JobStatus.SUCCEEDED:
            prune_checkpoints(workdir)
        else:
            discard_workdir(workdir)

    # ---------------------------------------------------------------- short transactions

    def _write_final(
        self, job_id: str, status: JobStatus, metrics: dict[str, Any] | None, error: dict[str, str] | None
    ) -> tuple[bool, str | None, str | None]:
        """(written, the job's status now, its callback URL) in one transaction."""
        with session_scope(self.settings) as session:
            job = end_job(session, job_id, status, metrics=metrics, error=error)
            if job is None:
                current = get_job(session, job_id)
                return False, current.status if current else None, None
            return True, job.status, job.callback_url

    def _release(self, job_id: str) -> None:
        with session_scope(self.settings) as session:
            release_job(session, job_id, self.me, "worker shutting down; job requeued to resume later")

    def _claim(self, job_id: str) -> ClaimedJob | None:
        return with_retries(self.settings, lambda: self._claim_once(job_id), f"job {job_id}: claim")

    def _claim_once(self, job_id: str) -> ClaimedJob | None:
        with session_scope(self.settings) as session:
            job = claim_job(session, job_id, self.me, self.limits.stale_after_s)
            if job is None:
                return None
            source = self._source_of(session, job)
            return ClaimedJob(job.id, dict(job.spec), source, job.attempts, job.callback_url, job.tenant_id)

    def _source_of(self, session: Any, job: Job) -> JobSource | None:
        """Where the job's data is recorded to be: an operator-side
        manifest, or the uploaded dataset's folder.

        Only the rows are read here; the files are checked
        (`worker.source_check`) when the run starts.
        A manifest job's stored `{"root", "items"}` resolves against the operator-approved `root`,
        not against the job folder the file sits in.
        """
        if job.manifest_path:
            return JobSource("manifest", job.manifest_path)
        if not job.dataset_id:
            return None
        dataset = get_dataset(session, job.dataset_id)
        if dataset is None:
            return None
        unpacked = tuple(w for w in dataset.warnings or [] if str(w.get("code", "")).startswith(UNPACKING_WARNINGS))
        return JobSource("dataset", dataset.path or str(dataset_path(self.settings, dataset.id)), dataset.id,
                         unpacked)

    def _register_artifacts(self, job_id: str, artifacts: dict[str, Any]) -> None:
        with_retries(self.settings, lambda: self._register_artifacts_once(job_id, artifacts),
                     f"job {job_id}: artifacts")

    def _register_artifacts_once(self, job_id: str, artifacts: dict[str, Any]) -> None:
        with session_scope(self.settings) as session:
            for name, path in sorted(artifacts.items()):
                register_artifact(session, job_id, name, path)

    def _cancel_requested(self, job_id: str) -> bool:
        with session_scope(self.settings) as session:
            return is_cancel_requested(session, job_id)

    def _beat(self, job_id: str) -> None:
        with session_scope(self.settings) as session:
            heartbeat(session, job_id)

    def _event(self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        with_retries(self.settings, lambda: self._event_once(job_id, kind, message, data),
                     f"job {job_id}: {kind} event")

    def _event_once(self, job_id: str, kind: str, message: str, data: dict[str, Any] | None) -> None:
        with session_scope(self.settings) as session:
            add_event(session, job_id, kind, message, data=data)

    def _start_message(self, job: ClaimedJob, workdir: Path) -> str:
        resuming = (workdir / "stages").exists()
        verb = "resuming from the checkpoints of an earlier run" if resuming else "starting"
        return f"attempt {job.attempts} on {self.me}: {verb}"


def _max_workers(spec: dict[str, Any]) -> int:
    """The stored spec's `max_workers` (1 where it is missing or not a
    number: the spec check reports that)."""
    value = spec.get("max_workers", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": " ".join(message.split())[:MESSAGE_LIMIT]}


def _validation_message(exc: Any) -> str:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    where = ".".join(str(part) for part in first.get("loc", ())) or "spec"
    return f"the job's spec is not valid: {where}: {first.get('msg', '')}"


def _unexpected_error(exc: BaseException, settings: Settings) -> dict[str, str]:
    """A one-line, path-free description of an unexpected failure for the job resource."""
    if type(exc).__name__ == "OutOfMemoryError":
        return _error(
            "out_of_memory",
            "the device ran out of memory; lower distill_batch_classes, the batch sizes or image_size",
        )
    detail = (str(exc).strip().splitlines() or [""])[0].replace(str(settings.home), "<home>")
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return _error("internal_error", f"the job failed on the worker ({text})")


__all__ = ["MAX_ATTEMPTS", "JobReleased", "JobRunner"]
