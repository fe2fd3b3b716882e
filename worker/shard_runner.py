"""Run one shard of a job spread over several workers (`fd2.run_shard`),
and split a job into shards.

A job whose spec asks for `max_workers` > 1 is planned by the worker that takes its `fd2.run_job`
message (`ShardRunner.plan`): the shards of `fd2_core.shards.plan_shards` become rows
(`store.shards`) and the first ready ones are dispatched.
Each `fd2.run_shard` message then runs one shard (`ShardRunner.run_shard`) in the job's working
folder on shared storage, through `fd2_core.shards.run_shard`, which writes its outputs atomically
and skips a shard whose outputs exist.
After a shard ends, the next ready ones are dispatched; the `package` shard
registers the artifacts and ends the job `succeeded`.

Outcomes of a shard: a stop because the job was cancelled (or ended: another shard failed it)
cancels the shard; a worker shutdown gives it back (its message is requeued); any other failure
fails the job with the shard named in the error.
A worker killed while it holds a shard is noticed by the recovery pass of any worker
(`worker.recovery`), which requeues the shard.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from fd2_config.settings import Settings
from store.db import session_scope
from store.jobs import add_event, get_job, job_workdir
from store.models import SHARD_END_EVENT_KINDS, EventKind, JobStatus, ShardStatus, utcnow
from store.shards import (
    PlannedShard,
    ShardClaim,
    beat_shard,
    claim_shard,
    finish_shard,
    job_stop_requested,
    record_plan,
    record_shard_progress,
    release_shard,
    running_shards,
    shard_held,
    shard_key,
)
from worker.heartbeat import Heartbeat
from worker.job_runner import MAX_ATTEMPTS, ClaimedJob, JobRunner, _error, _unexpected_error, _validation_message
from worker.outages import log_failure, with_retries
from worker.progress import EventRecord, ProgressReporter, ProgressUpdate
from worker.shard_dispatch import dispatch_tenant
from worker.source_check import SourceRejected, prepare_source
from worker.stopping import StopPoller, StopReason
from worker.workdir_cleanup import discard_workdir, prune_checkpoints

log = logging.getLogger(__name__)


class ShardReleased(Exception):
    """The worker is shutting down: the shard went back to `dispatched` and
    its message must be requeued."""


class ShardProgressSink:
    """Writes a shard's throttled progress (the job's progress follows from
    all its shards) and its events.

    Each event names the shard in its message and `data.shard` and is filed under the shard's own
    stage (the package shard walks every stage to reuse what the others saved).
    It carries the job's progress and ETA, not the shard's (that is `data.shard_progress`), so a
    client following the events sees the job move; a shard's own stage start and end are `log`
    events, since the job's stage does not start again with each shard.
    Only progress reported in the shard's own stage counts as the shard's progress.
    """

    def __init__(self, settings: Settings, job_id: str, shard_id: str, me: str, stage: str) -> None:
        self.settings, self.job_id, self.shard_id, self.me, self.stage = settings, job_id, shard_id, me, stage

    def write(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        with_retries(self.settings, lambda: self._write_once(update, events),
                     f"job {self.job_id}: shard {self.shard_id} progress")

    def _write_once(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        with session_scope(self.settings) as session:
            if update is not None and update.stage == self.stage:
                record_shard_progress(session, self.job_id, self.shard_id, self.me, update.stage_progress)
            if not events:
                return
            job = get_job(session, self.job_id)
            for record in events:
                data = dict(record.data or {})
                own = record.stage == self.stage
                data["shard"], data["shard_progress"] = self.shard_id, data.pop("stage_progress", None) if own else None
                if job is not None:
                    data["eta_seconds"] = job.eta_seconds
                    if job.stage == self.stage:
                        data["stage_progress"] = job.stage_progress
                kind = EventKind.LOG if record.kind in ("stage_start", "stage_end") else record.kind
                add_event(session, self.job_id, kind, f"[{self.shard_id}] {record.message}", stage=self.stage,
                          progress=job.progress if job is not None else None, data=data)


class ShardRunner(JobRunner):
    """Plans sharded jobs and runs their shards for one worker process;
    `app` publishes the shard messages."""

    def _app(self) -> Celery:
        if self.app is None:
            from worker.celery_app import app

            self.app = app
        return self.app

    # ---------------------------------------------------------------- planning

    def plan(self, job: ClaimedJob, tenant_id: str) -> str:
        """Split a claimed job into shards, record them and dispatch the first; returns `running`
        (or the final state when the job's data is refused)."""
        from pydantic import ValidationError

        from fd2_core.cost import DatasetSize, stage_image_passes
        from fd2_core.data.errors import DataError
        from fd2_core.shards import plan_shards
        from fd2_core.spec_resolution import resolve_spec

        assert job.source is not None
        try:
            spec = resolve_spec(job.spec)
            layout = prepare_source(self.settings, job.id, job.source, spec)
        except SourceRejected as exc:
            return self._fail(job.id, exc.code, exc.message)
        except DataError as exc:
            return self._fail(job.id, exc.code, str(exc))
        except ValidationError as exc:
            return self._fail(job.id, "invalid_spec", _validation_message(exc))
        try:
            splits = [item.split for item in layout.items]
            size = DatasetSize(len(layout.classes), splits.count("train") or len(splits), splits.count("test"))
            planned = _with_weights(plan_shards(spec, len(layout.classes)), stage_image_passes(spec, size))
        except Exception as exc:  # the traceback stays in the worker log
            log.exception("job %s: planning its shards failed", job.id)
            return self._finish(job.id, JobStatus.FAILED, error=_unexpected_error(exc, self.settings))

        def record() -> int:
            with session_scope(self.settings) as session:
                count = record_plan(session, job.id, planned)
                add_event(session, job.id, EventKind.SHARDED,
                          f"split into {count} shards; up to {spec.max_workers} workers run them at once",
                          data={"shards": [s.id for s in planned], "max_workers": spec.max_workers})
                return count

        with_retries(self.settings, record, f"job {job.id}: shard plan")
        dispatch_tenant(self._app(), self.settings, tenant_id)
        return JobStatus.RUNNING

    # ---------------------------------------------------------------- one shard

    def run_shard(self, job_id: str, shard_id: str) -> str:
        """Run the shard to an end; returns its final status, or `skipped`
        when there was nothing to do.
        Raises ShardReleased when the worker shuts down meanwhile."""
        key = shard_key(job_id, shard_id)
        # before the claim commits, so recovery never sees it unheld here
        self.state.running_here.add(key)
        try:
            claim = with_retries(self.settings, lambda: self._claim_shard(job_id, shard_id),
                                 f"job {job_id}: claim of shard {shard_id}")
            if claim is None:
                log.info("job %s: shard %s: nothing to do (finished, not ready, held or job stopped)", job_id,
                         shard_id)
                # a job cancelled while its shards waited leaves its folder
                self._cleanup_if_last(job_id)
                return "skipped"
            try:
                return self._run_claimed_shard(claim)
            finally:
                self._after_shard(claim)
        finally:
            self.state.running_here.discard(key)

    def _claim_shard(self, job_id: str, shard_id: str) -> ShardClaim | None:
        with session_scope(self.settings) as session:
            claim = claim_shard(session, job_id, shard_id, self.me, self.limits.stale_after_s)
            if claim is not None:
                add_event(session, job_id, EventKind.SHARD_STARTED,
                          f"shard {shard_id}: attempt {claim.attempts} on {self.me}", stage=claim.stage,
                          data={"shard": shard_id, "worker": self.me, "attempt": claim.attempts})
            return claim

    def _run_claimed_shard(self, claim: ShardClaim) -> str:
        job_id, shard_id = claim.job_id, claim.shard_id
        if claim.attempts > MAX_ATTEMPTS:
            return self._shard_failed(claim, "too_many_attempts", f"it was interrupted {MAX_ATTEMPTS} times")
        elapsed = (utcnow() - claim.job_started_at).total_seconds() if claim.job_started_at else 0.0
        deadline = time.monotonic() + self.limits.soft_time_limit_s - max(elapsed, 0.0)
        poller = StopPoller(lambda: self._should_stop(job_id, shard_id), deadline=deadline,
                            shutdown=self.state.shutdown)
        reporter = ProgressReporter(ShardProgressSink(self.settings, job_id, shard_id, self.me, claim.stage))
        with Heartbeat(lambda: self._beat_shard(job_id, shard_id), self.limits.heartbeat_interval_s):
            return self._run_shard_pipeline(claim, reporter, poller)

    def _run_shard_pipeline(self, claim: ShardClaim, reporter: ProgressReporter, poller: StopPoller) -> str:
        from celery.exceptions import SoftTimeLimitExceeded
        from pydantic import ValidationError

        from fd2_core.data.errors import DataError
        from fd2_core.data.limits import DataLimits
        from fd2_core.pipeline import StopRequested
        from fd2_core.shards import ShardNotReady, run_shard
        from fd2_core.spec_resolution import resolve_spec

        job_id, shard_id = claim.job_id, claim.shard_id
        workdir = job_workdir(self.settings, job_id)
        try:
            source = self._job_source(job_id)
            if source is None:
                raise SourceRejected("not_found", "the job's dataset no longer exists")
            spec = resolve_spec(claim.spec)
            data = prepare_source(self.settings, job_id, source, spec)
            limits = DataLimits(**self.settings.data_limit_values())
            result = run_shard(spec, data, workdir, shard_id, on_event=reporter, should_stop=poller, limits=limits)
        except StopRequested:
            reporter.flush()
            return self._shard_stopped(claim, poller.reason or StopReason.CANCELLED)
        except SoftTimeLimitExceeded:
            reporter.flush()
            return self._shard_stopped(claim, StopReason.TIME_LIMIT)
        except SourceRejected as exc:
            reporter.flush()
            return self._shard_failed(claim, exc.code, exc.message)
        except ShardNotReady as exc:
            reporter.flush()
            return self._shard_failed(claim, "shard_inputs_missing", (
                f"{exc}, but they are recorded as finished: every worker of a job must see the same FD2_HOME "
                "storage"))
        except DataError as exc:
            reporter.flush()
            return self._shard_failed(claim, exc.code, str(exc))
        except ValidationError as exc:
            return self._shard_failed(claim, "invalid_spec", _validation_message(exc))
        except Exception as exc:  # the traceback stays in the worker log, never in the job resource
            log.exception("job %s: shard %s failed", job_id, shard_id)
            reporter.flush()
            error = _unexpected_error(exc, self.settings)
            return self._shard_failed(claim, error["code"], error["message"])
        reporter.flush()
        if not self._end_shard(claim, ShardStatus.DONE, message=result.message):
            return self._lost(claim)
        if result.pipeline_result is None:
            return ShardStatus.DONE
        try:
            self._register_artifacts(job_id, result.pipeline_result.artifacts)
        except Exception as exc:
            log.exception("job %s: registering artifacts failed", job_id)
            return self._finish(job_id, JobStatus.FAILED, error=_unexpected_error(exc, self.settings))
        return self._finish(job_id, JobStatus.SUCCEEDED, metrics=dict(result.pipeline_result.metrics))

    # ---------------------------------------------------------------- outcomes

    def _shard_stopped(self, claim: ShardClaim, reason: StopReason) -> str:
        if reason is StopReason.SHUTDOWN:
            with_retries(self.settings, lambda: self._release_shard(claim), f"job {claim.job_id}: shard release")
            raise ShardReleased(shard_key(claim.job_id, claim.shard_id))
        if not self._end_shard(claim, ShardStatus.CANCELLED):
            # the poller stopped it because another worker holds the shard now
            return self._lost(claim)
        if reason is StopReason.TIME_LIMIT:
            limit = f"{self.limits.soft_time_limit_s:.0f} s"
            return self._fail(claim.job_id, "time_limit", f"the job ran past its {limit} limit")
        self._finish(claim.job_id, JobStatus.CANCELLED)  # a no-op when another shard failed the job
        return ShardStatus.CANCELLED

    def _shard_failed(self, claim: ShardClaim, code: str, message: str) -> str:
        error = _error(code, f"shard {claim.shard_id} failed: {message}")
        if not self._end_shard(claim, ShardStatus.FAILED, error=error):
            return self._lost(claim)
        self._finish(claim.job_id, JobStatus.FAILED, error=error)
        return ShardStatus.FAILED

    def _lost(self, claim: ShardClaim) -> str:
        """The shard was given to another worker while this one ran it (its
        heartbeat went stale, e.g. through a database outage): this run's
        outcome is dropped, the job is the new holder's."""
        log.warning("job %s: shard %s is held by another worker now; this run's outcome is dropped",
                    claim.job_id, claim.shard_id)
        return "lost"

    def _end_shard(self, claim: ShardClaim, status: ShardStatus, *, error: dict[str, str] | None = None,
                   message: str | None = None) -> bool:
        """Record the shard's end; False when this worker no longer holds it."""
        def write() -> bool:
            with session_scope(self.settings) as session:
                if not finish_shard(session, claim.job_id, claim.shard_id, self.me, status, error=error):
                    return False
                text = message or (error["message"] if error else status)
                add_event(session, claim.job_id, SHARD_END_EVENT_KINDS[status],
                          f"shard {claim.shard_id}: {text}", stage=claim.stage,
                          data={"shard": claim.shard_id, "worker": self.me, "status": status})
                return True

        return with_retries(self.settings, write, f"job {claim.job_id}: end of shard {claim.shard_id}")

    def _free_disk(self, job_id: str, status: JobStatus) -> None:
        """A succeeded job keeps its artifacts only; a failed or cancelled
        job's folder is removed by the last of its shards to stop
        (`_cleanup_if_last`), since others may still be writing there."""
        if status == JobStatus.SUCCEEDED:
            prune_checkpoints(job_workdir(self.settings, job_id))

    def _after_shard(self, claim: ShardClaim) -> None:
        """Free a stopped job's folder, then dispatch what may run now (not while shutting down: the
        recovery pass of another worker does it)."""
        self._cleanup_if_last(claim.job_id)
        if self.state.shutdown.is_set():
            return
        try:
            dispatch_tenant(self._app(), self.settings, claim.tenant_id)
        except Exception as exc:  # the next recovery pass dispatches
            log_failure(log, f"job {claim.job_id}: dispatch after shard {claim.shard_id} failed", exc)

    def _cleanup_if_last(self, job_id: str) -> None:
        """Remove a failed or cancelled job's folder once none of its shards runs any more."""
        try:
            with session_scope(self.settings) as session:
                job = get_job(session, job_id)
                last = job is not None and job.status in (JobStatus.FAILED, JobStatus.CANCELLED) and not running_shards(
                    session, job_id)
        except Exception as exc:  # the storage sweep removes what is left
            log.warning("job %s: could not check for running shards (%s)", job_id, exc)
            return
        if last:
            discard_workdir(job_workdir(self.settings, job_id))

    # ---------------------------------------------------------------- short transactions

    def _job_source(self, job_id: str) -> Any:
        with session_scope(self.settings) as session:
            job = get_job(session, job_id)
            return None if job is None else self._source_of(session, job)

    def _release_shard(self, claim: ShardClaim) -> None:
        with session_scope(self.settings) as session:
            if release_shard(session, claim.job_id, claim.shard_id, self.me, requeued_message=True):
                add_event(session, claim.job_id, EventKind.SHARD_REQUEUED,
                          f"shard {claim.shard_id}: worker shutting down; shard requeued", stage=claim.stage,
                          data={"shard": claim.shard_id, "worker": self.me})

    def _should_stop(self, job_id: str, shard_id: str) -> bool:
        """The job stopped (cancelled, or ended by another shard), or the
        shard is another worker's now."""
        with session_scope(self.settings) as session:
            return job_stop_requested(session, job_id) or not shard_held(session, job_id, shard_id, self.me)

    def _beat_shard(self, job_id: str, shard_id: str) -> None:
        with session_scope(self.settings) as session:
            beat_shard(session, job_id, shard_id, self.me)


def _with_weights(shards: list[Any], stage_weights: dict[str, float]) -> list[PlannedShard]:
    """Each shard's share of the job's progress: its stage's share of the
    work (`fd2_core.cost`) split evenly among the stage's working shards
    (the merges, which copy tensors, count for nothing)."""
    total = sum(stage_weights.values()) or 1.0
    working: dict[str, int] = {}
    for shard in shards:
        if not shard.id.endswith(":merge"):
            working[shard.stage] = working.get(shard.stage, 0) + 1
    planned = []
    for shard in shards:
        share = 0.0
        if not shard.id.endswith(":merge"):
            share = stage_weights.get(shard.stage, 0.0) / total / working[shard.stage]
        planned.append(PlannedShard(shard.id, shard.stage, tuple(shard.depends_on), share))
    return planned


__all__ = ["ShardReleased", "ShardRunner"]
