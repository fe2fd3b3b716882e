"""Run one job on this worker: claim it, run the pipeline in its working folder, record the outcome.

No database session is held while the pipeline runs. Every write (claim, progress, heartbeat, cancel
poll, final state) is its own short transaction (`worker.outages.transact`), so a long job never
pins a connection or a SQLite write lock. Writes that record the job are retried through a database
outage. The heartbeat and the cancel poll are not: they run again seconds later anyway.

The working folder `<FD2_HOME>/jobs/<job id>/` keeps the pipeline's checkpoints. So running the same
job again after a crash, a redelivery or a worker shutdown resumes where it stopped. A job whose
spec asks for several workers is not run here but planned into shards (`worker.shard_runner`); the
task entry (`worker.tasks`) chooses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from store.job_states import ClaimedJob, release_job
from store.jobs import add_event, heartbeat, is_cancel_requested, job_workdir, update_progress
from worker.liveness import Heartbeat, StopPoller
from worker.outages import transact
from worker.outcomes import Ending, JobRecorder, outcome_of
from worker.progress import EventRecord, ProgressReporter, ProgressUpdate
from worker.source_check import prepare_source

if TYPE_CHECKING:
    from worker.celery_app import WorkerState

log = logging.getLogger(__name__)


class JobReleased(Exception):
    """The worker is shutting down:
    the job went back to `queued` and its message must be requeued."""


@dataclass
class DatabaseProgressSink:
    """Writes one throttled batch of progress and events in its own transaction."""

    settings: Any
    job_id: str

    def write(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        transact(self.settings, record_progress, self.job_id, update, events,
                 what=f"job {self.job_id}: progress write")


def record_progress(session: Any, job_id: str, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
    """The job's latest progress, then its new events, in the caller's transaction."""
    if update is not None:
        update_progress(session, job_id, stage=update.stage, progress=update.progress,
                        stage_progress=update.stage_progress, eta_seconds=update.eta_seconds)
    for record in events:
        add_event(session, job_id, record.kind, record.message, stage=record.stage, progress=record.progress,
                  data=record.data)


class JobRunner:
    """Runs jobs on one worker for one worker process (`me` is its `<host>:<pid>` identity)."""

    def __init__(self, state: WorkerState, me: str) -> None:
        self.state = state
        self.settings = state.settings
        self.limits = state.limits
        self.me = me
        self.recorder = JobRecorder(self.settings, me, discard_stopped=True)

    def run(self, job_id: str) -> str:
        """Run the job to a final state;
        returns that state, or `skipped` when there was nothing to do.

        Raises JobReleased when the worker shuts down meanwhile.
        """
        # before the claim commits, so recovery never sees it unheld here
        self.state.running_here.add(job_id)
        try:
            claimed = self.recorder.claim(job_id, self.limits.stale_after_s)
            if isinstance(claimed, str):
                return claimed
            deadline = time.monotonic() + self.limits.soft_time_limit_s
            poller = StopPoller(lambda: transact(self.settings, is_cancel_requested, job_id, retry=False),
                                deadline=deadline, shutdown=self.state.shutdown)
            reporter = ProgressReporter(DatabaseProgressSink(self.settings, job_id))
            with Heartbeat(lambda: transact(self.settings, heartbeat, job_id, retry=False),
                           self.limits.heartbeat_interval_s):
                return self._run_pipeline(claimed, reporter, poller)
        finally:
            self.state.running_here.discard(job_id)

    def _run_pipeline(self, job: ClaimedJob, reporter: ProgressReporter, poller: StopPoller) -> str:
        # Imported here, not at module level:
        # the worker parent process must not load torch (celery_app).
        from fd2_core.data.limits import DataLimits
        from fd2_core.pipeline import run
        from fd2_core.spec_resolution import resolve_spec

        assert job.source is not None
        try:
            spec = resolve_spec(job.spec)
            # Re-checked here, not trusted from submission: the files may have changed since.
            data = prepare_source(self.settings, job.id, job.source, spec, reporter, poller)
            limits = DataLimits(**self.settings.data_limit_values())
            result = run(spec, data, job_workdir(self.settings, job.id), on_event=reporter, should_stop=poller,
                         limits=limits)
        except Exception as exc:
            reporter.flush()
            outcome = outcome_of(exc, stop_reason=poller.reason, settings=self.settings,
                                 soft_time_limit_s=self.limits.soft_time_limit_s, where=f"job {job.id}")
            if outcome.ending is Ending.RELEASED:
                transact(self.settings, release_job, job.id, self.me,
                         "worker shutting down; job requeued to resume later", what=f"job {job.id}: release")
                raise JobReleased(job.id) from None
            return self.recorder.end(job.id, outcome)
        reporter.flush()
        return self.recorder.succeed(job.id, result.artifacts, result.metrics)


__all__ = ["DatabaseProgressSink", "JobReleased", "JobRunner", "record_progress"]
