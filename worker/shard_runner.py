"""Split a job into shards, and run one shard of a job spread over several workers
(`fd2.run_shard`).

A job whose spec asks for `max_workers` > 1 is planned by the worker that takes its `fd2.run_job`
message (`ShardRunner.plan_job`): the shards of `fd2_core.shards.plan_shards` become rows
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
from typing import TYPE_CHECKING, Any

from celery import Celery

from fd2_config.settings import Settings
from store.job_states import ClaimedJob
from store.jobs import add_event, get_job, heartbeat, job_source, job_workdir
from store.models import EventKind, JobStatus, ShardStatus, utcnow
from store.shards import (
    PlannedShard,
    ShardClaim,
    beat_shard,
    claim_shard,
    end_shard,
    give_back_shard,
    job_ended_and_idle,
    record_shard_progress,
    record_sharded_plan,
    shard_key,
    shard_should_stop,
)
from worker.liveness import Heartbeat, StopPoller
from worker.outages import log_failure, transact
from worker.outcomes import MAX_ATTEMPTS, SKIPPED, Ending, JobRecorder, Outcome, error_of, failure, outcome_of
from worker.progress import EventRecord, ProgressReporter, ProgressUpdate
from worker.shard_dispatch import dispatch_tenant
from worker.source_check import SourceRejected, prepare_source
from worker.storage_sweep import discard_workdir

if TYPE_CHECKING:
    from worker.celery_app import WorkerState

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
        transact(self.settings, self.record, update, events, what=f"job {self.job_id}: shard {self.shard_id} progress")

    def record(self, session: Any, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        """The shard's progress and its events, in the caller's transaction."""
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


class ShardRunner:
    """Plans sharded jobs and runs their shards for one worker process;
    `app` publishes the shard messages."""

    def __init__(self, state: WorkerState, me: str, app: Celery | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.limits = state.limits
        self.me = me
        self._celery = app  # default: the worker's own app
        # A stopped job's folder is removed by the last of its shards to stop (`_cleanup_if_last`).
        self.recorder = JobRecorder(self.settings, me, discard_stopped=False)

    def _app(self) -> Celery:
        if self._celery is None:
            from worker.celery_app import app

            self._celery = app
        return self._celery

    # ---------------------------------------------------------------- planning

    def plan_job(self, job_id: str) -> str:
        """Claim the job, split it into shards, record them and dispatch the first.

        Returns `running`, `skipped` when there was nothing to do,
        or the final state when the job is refused.
        """
        # before the claim commits, so recovery never sees it unheld
        self.state.running_here.add(job_id)
        try:
            claimed = self.recorder.claim(job_id, self.limits.stale_after_s)
            if isinstance(claimed, str):
                return claimed
            # reading the data is a long scan
            with Heartbeat(lambda: transact(self.settings, heartbeat, job_id, retry=False),
                           self.limits.heartbeat_interval_s):
                return self._plan(claimed)
        finally:
            self.state.running_here.discard(job_id)

    def _plan(self, job: ClaimedJob) -> str:
        from fd2_core.cost import DatasetSize, stage_image_passes
        from fd2_core.shards import plan_shards
        from fd2_core.spec_resolution import resolve_spec

        assert job.source is not None
        try:
            spec = resolve_spec(job.spec)
            layout = prepare_source(self.settings, job.id, job.source, spec)
            splits = [item.split for item in layout.items]
            size = DatasetSize(len(layout.classes), splits.count("train") or len(splits), splits.count("test"))
            planned = _with_weights(plan_shards(spec, len(layout.classes)), stage_image_passes(spec, size))
        except Exception as exc:
            outcome = outcome_of(exc, stop_reason=None, settings=self.settings,
                                 soft_time_limit_s=self.limits.soft_time_limit_s, where=f"job {job.id}: planning")
            return self.recorder.end(job.id, outcome)
        transact(self.settings, record_sharded_plan, job.id, planned, spec.max_workers,
                 what=f"job {job.id}: shard plan")
        dispatch_tenant(self._app(), self.settings, job.tenant_id)
        return JobStatus.RUNNING

    # ---------------------------------------------------------------- one shard

    def run_shard(self, job_id: str, shard_id: str) -> str:
        """Run the shard to an end;
        returns its final status, or `skipped` when there was nothing to do.

        Raises ShardReleased when the worker shuts down meanwhile.
        """
        key = shard_key(job_id, shard_id)
        # before the claim commits, so recovery never sees it unheld here
        self.state.running_here.add(key)
        try:
            claim = transact(self.settings, claim_shard, job_id, shard_id, self.me, self.limits.stale_after_s,
                             what=f"job {job_id}: claim of shard {shard_id}")
            if claim is None:
                log.info("job %s: shard %s: nothing to do (finished, not ready, held or job stopped)", job_id,
                         shard_id)
                # a job cancelled while its shards waited leaves its folder
                self._cleanup_if_last(job_id)
                return SKIPPED
            try:
                return self._run_claimed_shard(claim)
            finally:
                self._after_shard(claim)
        finally:
            self.state.running_here.discard(key)

    def _run_claimed_shard(self, claim: ShardClaim) -> str:
        job_id, shard_id = claim.job_id, claim.shard_id
        if claim.attempts > MAX_ATTEMPTS:
            return self._shard_failed(claim, failure("too_many_attempts",
                                                    f"it was interrupted {MAX_ATTEMPTS} times"))
        elapsed = (utcnow() - claim.job_started_at).total_seconds() if claim.job_started_at else 0.0
        deadline = time.monotonic() + self.limits.soft_time_limit_s - max(elapsed, 0.0)
        poller = StopPoller(
            lambda: transact(self.settings, shard_should_stop, job_id, shard_id, self.me, retry=False),
            deadline=deadline, shutdown=self.state.shutdown)
        reporter = ProgressReporter(ShardProgressSink(self.settings, job_id, shard_id, self.me, claim.stage))
        with Heartbeat(lambda: transact(self.settings, beat_shard, job_id, shard_id, self.me, retry=False),
                       self.limits.heartbeat_interval_s):
            return self._run_shard_pipeline(claim, reporter, poller)

    def _run_shard_pipeline(self, claim: ShardClaim, reporter: ProgressReporter, poller: StopPoller) -> str:
        from fd2_core.data.limits import DataLimits
        from fd2_core.shards import run_shard
        from fd2_core.spec_resolution import resolve_spec

        job_id, shard_id = claim.job_id, claim.shard_id
        workdir = job_workdir(self.settings, job_id)
        try:
            source = transact(self.settings, job_source, self.settings, job_id, retry=False)
            if source is None:
                raise SourceRejected("not_found", "the job's dataset no longer exists")
            spec = resolve_spec(claim.spec)
            data = prepare_source(self.settings, job_id, source, spec, reporter, poller)
            limits = DataLimits(**self.settings.data_limit_values())
            result = run_shard(spec, data, workdir, shard_id, on_event=reporter, should_stop=poller, limits=limits)
        except Exception as exc:
            reporter.flush()
            outcome = outcome_of(exc, stop_reason=poller.reason, settings=self.settings,
                                 soft_time_limit_s=self.limits.soft_time_limit_s,
                                 where=f"job {job_id}: shard {shard_id}")
            if outcome.ending in (Ending.FAILED, Ending.TIME_LIMIT):
                return self._shard_failed(claim, outcome)
            return self._shard_stopped(claim, outcome)
        reporter.flush()
        if not self._end_shard(claim, ShardStatus.DONE, message=result.message):
            return self._lost(claim)
        if result.pipeline_result is None:
            return ShardStatus.DONE
        return self.recorder.succeed(job_id, result.pipeline_result.artifacts, result.pipeline_result.metrics)

    # ---------------------------------------------------------------- outcomes

    def _shard_stopped(self, claim: ShardClaim, outcome: Outcome) -> str:
        """Released (the worker shuts down) or cancelled: the shard stops;
        a cancel ends the job too."""
        if outcome.ending is Ending.RELEASED:
            transact(self.settings, give_back_shard, claim, self.me, what=f"job {claim.job_id}: shard release")
            raise ShardReleased(shard_key(claim.job_id, claim.shard_id))
        if not self._end_shard(claim, ShardStatus.CANCELLED):
            # the poller stopped it because another worker holds the shard now
            return self._lost(claim)
        # a no-op when another shard failed the job
        self.recorder.finish(claim.job_id, JobStatus.CANCELLED)
        return ShardStatus.CANCELLED

    def _shard_failed(self, claim: ShardClaim, outcome: Outcome) -> str:
        """The shard fails, and the job with it, with the shard named in the error. A time limit
        stops the shard as cancelled and fails the job with `time_limit`."""
        assert outcome.error is not None
        if outcome.ending is Ending.TIME_LIMIT:
            if not self._end_shard(claim, ShardStatus.CANCELLED):
                return self._lost(claim)
            return self.recorder.end(claim.job_id, outcome)
        error = error_of(outcome.error["code"], f"shard {claim.shard_id} failed: {outcome.error['message']}")
        if not self._end_shard(claim, ShardStatus.FAILED, error=error):
            return self._lost(claim)
        self.recorder.finish(claim.job_id, JobStatus.FAILED, error=error)
        return ShardStatus.FAILED

    def _lost(self, claim: ShardClaim) -> str:
        """The shard was given to another worker while this one ran it (its heartbeat went stale,
        e.g. through a database outage): this run's outcome is dropped, the job is the new
        holder's."""
        log.warning("job %s: shard %s is held by another worker now; this run's outcome is dropped",
                    claim.job_id, claim.shard_id)
        return "lost"

    def _end_shard(self, claim: ShardClaim, status: ShardStatus, *, error: dict[str, str] | None = None,
                   message: str | None = None) -> bool:
        """Record the shard's end; False when this worker no longer holds it."""
        return transact(self.settings, end_shard, claim, self.me, status, error=error, message=message,
                        what=f"job {claim.job_id}: end of shard {claim.shard_id}")

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
            last = transact(self.settings, job_ended_and_idle, job_id, retry=False)
        except Exception as exc:  # the storage sweep removes what is left
            log.warning("job %s: could not check for running shards (%s)", job_id, exc)
            return
        if last:
            discard_workdir(job_workdir(self.settings, job_id))


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
