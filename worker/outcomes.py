"""How a run ends and how that end is recorded: the one outcome table and the one job recorder.

Both runners (`worker.job_runner` for a job on one worker, `worker.shard_runner` for a shard of a
job spread over several) turn whatever their run raised into an `Outcome` through `outcome_of`, and
hold a `JobRecorder` that claims the job, writes its final state and registers its artifacts. Every
write is its own short transaction (`worker.outages.transact`), retried through a database outage.

The table (`outcome_of`):

| raised                                    | outcome                                              |
|-------------------------------------------|------------------------------------------------------|
| `SourceRejected`                          | failed, with its code                                |
| `StopRequested`, cancel requested         | cancelled                                            |
| `StopRequested`, worker shutting down     | released: back to the queue, resumed elsewhere       |
| `StopRequested` past the time limit       | time limit: failed, `time_limit`                     |
| `SoftTimeLimitExceeded`                   | time limit: failed, `time_limit`                     |
| `ShardNotReady`                           | failed, `shard_inputs_missing`                       |
| `DataError`                               | failed, with its code                                |
| pydantic `ValidationError` (stored spec)  | failed, `invalid_spec`                               |
| anything else                             | failed, `internal_error` (traceback in the log only) |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fd2_config.settings import Settings
from store.artifacts import register_artifacts
from store.job_states import ClaimedJob, claim_for_run, record_job_end
from store.jobs import add_event, job_workdir
from store.models import EventKind, JobStatus
from worker.callbacks import start_callback
from worker.liveness import StopReason
from worker.outages import transact
from worker.source_check import SourceRejected
from worker.storage_sweep import discard_workdir, prune_checkpoints

log = logging.getLogger(__name__)

# A job whose runs keep dying (say, the kernel's OOM killer) is failed instead of being retried
# forever.
MAX_ATTEMPTS = 5
MESSAGE_LIMIT = 300
SKIPPED = "skipped"  # a task's result when there was nothing to do


class Ending(Enum):
    FAILED = "failed"
    TIME_LIMIT = "time_limit"  # the job fails with `time_limit`; a shard stops as cancelled
    CANCELLED = "cancelled"
    RELEASED = "released"


@dataclass(frozen=True)
class Outcome:
    """How a run that raised ends: failed or past its time limit (with `error`), cancelled, or
    released (the worker shuts down)."""

    ending: Ending
    error: dict[str, str] | None = None


def error_of(code: str, message: str) -> dict[str, str]:
    """A job or shard error: `code` and a one-line message of at most `MESSAGE_LIMIT` characters."""
    return {"code": code, "message": " ".join(message.split())[:MESSAGE_LIMIT]}


def failure(code: str, message: str) -> Outcome:
    return Outcome(Ending.FAILED, error_of(code, message))


def outcome_of(exc: BaseException, *, stop_reason: StopReason | None, settings: Settings,
               soft_time_limit_s: float, where: str) -> Outcome:
    """The row of the table above that `exc` falls in; `where` ("job …", "job …: shard …") names the
    run in the log."""
    # Imported here: they are loaded once a run has started,
    # and the worker's parent process must not load torch.
    from celery.exceptions import SoftTimeLimitExceeded
    from pydantic import ValidationError

    from fd2_core.data.errors import DataError
    from fd2_core.pipeline import StopRequested
    from fd2_core.shards import ShardNotReady

    time_limit = Outcome(Ending.TIME_LIMIT,
                         error_of("time_limit", f"the job ran past its {soft_time_limit_s:.0f} s limit"))
    if isinstance(exc, SourceRejected):
        return failure(exc.code, exc.message)
    if isinstance(exc, StopRequested):
        reason = stop_reason or StopReason.CANCELLED
        if reason is StopReason.SHUTDOWN:
            return Outcome(Ending.RELEASED)
        return time_limit if reason is StopReason.TIME_LIMIT else Outcome(Ending.CANCELLED)
    if isinstance(exc, SoftTimeLimitExceeded):
        return time_limit
    if isinstance(exc, ShardNotReady):
        return failure("shard_inputs_missing", f"{exc}, but they are recorded as finished: every worker of a job "
                      "must see the same FD2_HOME storage")
    if isinstance(exc, DataError):
        return failure(exc.code, str(exc))
    if isinstance(exc, ValidationError):  # a stored spec the current schema no longer accepts
        log.warning("%s: stored spec is invalid: %s", where, exc)
        return failure("invalid_spec", validation_message(exc))
    # the traceback stays here, never in the job resource
    log.exception("%s failed", where, exc_info=exc)
    return Outcome(Ending.FAILED, unexpected_error(exc, settings))


def validation_message(exc: Any) -> str:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    where = ".".join(str(part) for part in first.get("loc", ())) or "spec"
    return f"the job's spec is not valid: {where}: {first.get('msg', '')}"


def unexpected_error(exc: BaseException, settings: Settings) -> dict[str, str]:
    """A one-line, path-free description of an unexpected failure for the job resource."""
    if type(exc).__name__ == "OutOfMemoryError":
        return error_of(
            "out_of_memory",
            "the device ran out of memory; lower distill_batch_classes, the batch sizes or image_size",
        )
    detail = (str(exc).strip().splitlines() or [""])[0].replace(str(settings.home), "<home>")
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return error_of("internal_error", f"the job failed on the worker ({text})")


@dataclass
class JobRecorder:
    """Claims a job for `me`, writes its end, registers its artifacts, and applies the disk rule.

    The disk rule: after success only the artifacts stay (`prune_checkpoints`). A failed or
    cancelled job's folder is removed at once with `discard_stopped`; a sharded job's is removed by
    the last of its shards to stop instead, since the others may still write there.
    """

    settings: Settings
    me: str
    discard_stopped: bool = True

    def claim(self, job_id: str, stale_after_s: float) -> ClaimedJob | str:
        """Claim the job and write its `started` event. A string instead is how the run ends at
        once: `skipped` (finished, cancelled or held by a live worker), or the job's final status
        when it was interrupted too often or its dataset is gone."""
        claimed = transact(self.settings, claim_for_run, self.settings, job_id, self.me, stale_after_s,
                           what=f"job {job_id}: claim")
        if claimed is None:
            log.info("job %s: nothing to do (finished, cancelled or held by a live worker)", job_id)
            return SKIPPED
        if claimed.attempts > MAX_ATTEMPTS:
            return self.fail(job_id, "too_many_attempts", f"the job was interrupted {MAX_ATTEMPTS} times")
        if claimed.source is None:
            return self.fail(job_id, "not_found", "the job's dataset no longer exists")
        resuming = (job_workdir(self.settings, job_id) / "stages").exists()
        verb = "resuming from the checkpoints of an earlier run" if resuming else "starting"
        transact(self.settings, add_event, job_id, EventKind.STARTED, f"attempt {claimed.attempts} on "
                 f"{self.me}: {verb}", data={"worker": self.me}, what=f"job {job_id}: started event")
        return claimed

    def fail(self, job_id: str, code: str, message: str) -> str:
        return self.finish(job_id, JobStatus.FAILED, error=error_of(code, message))

    def end(self, job_id: str, outcome: Outcome) -> str:
        """Record a failed or cancelled outcome (a released one is the runner's to give back)."""
        assert outcome.ending is not Ending.RELEASED
        status = JobStatus.CANCELLED if outcome.ending is Ending.CANCELLED else JobStatus.FAILED
        return self.finish(job_id, status, error=outcome.error)

    def succeed(self, job_id: str, artifacts: dict[str, Any], metrics: dict[str, Any]) -> str:
        """Register the artifacts, then end the job `succeeded`
        (`failed` when registering fails)."""
        try:
            transact(self.settings, register_artifacts, job_id, artifacts, what=f"job {job_id}: artifacts")
        except Exception as exc:
            log.exception("job %s: registering artifacts failed", job_id)
            return self.finish(job_id, JobStatus.FAILED, error=unexpected_error(exc, self.settings))
        return self.finish(job_id, JobStatus.SUCCEEDED, metrics=dict(metrics))

    def finish(self, job_id: str, status: JobStatus, *, metrics: dict[str, Any] | None = None,
               error: dict[str, str] | None = None) -> str:
        """Write the final state (one transaction), free the disk, then start the callback if any.

        Returns the job's status now: another's when someone else finished it meanwhile (recovery
        cancelled it, another shard failed it).
        """
        ended = transact(self.settings, record_job_end, job_id, status, metrics=metrics, error=error,
                         what=f"job {job_id}: final state")
        if not ended.written:
            log.info("job %s was already %s", job_id, ended.status or "gone")
            return ended.status or status
        log.info("job %s: %s", job_id, status)
        self.free_disk(job_id, status)
        if ended.callback_url:
            start_callback(job_id, self.settings)
        return status

    def free_disk(self, job_id: str, status: JobStatus) -> None:
        workdir: Path = job_workdir(self.settings, job_id)
        if status == JobStatus.SUCCEEDED:
            prune_checkpoints(workdir)
        elif self.discard_stopped:
            discard_workdir(workdir)


__all__ = [
    "MAX_ATTEMPTS",
    "SKIPPED",
    "Ending",
    "JobRecorder",
    "Outcome",
    "error_of",
    "failure",
    "outcome_of",
    "unexpected_error",
]
