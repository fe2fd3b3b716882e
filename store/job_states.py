"""Every change of a job's status, and who holds a running job: the job's state machine.

`queued` → `running` (`claim_job`, `mark_running`) → `succeeded` / `failed` / `cancelled`
(`finish_job`); `running` → `queued` again when its holder is gone (`release_job`,
`requeue_stale_jobs`, `find_orphans`); a cancel request (`request_cancel`) ends a job at once where
nothing runs it.

A job row names its holder as `<host>:<pid>` of the process running it. A holder on this same host
whose process is gone (a worker killed with SIGKILL, a crashed `fd2 serve`) is known dead at once,
so its job is taken over without waiting for the heartbeat to go stale; a holder elsewhere is judged
by its heartbeat (`stale_heartbeat_s`). A live holder is never displaced, so a duplicate message
(Redis redelivery, a recovery re-send) cannot start a second run of the same job.

The worker calls these;
like the rest of `store` they never commit (the caller's `session_scope()` does).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.jobs import JobSource, add_event, get_job, job_source, json_column_value
from store.models import (
    ACTIVE_JOB_STATUSES,
    FINAL_EVENT_KINDS,
    FINISHED_JOB_STATUSES,
    EventKind,
    Job,
    JobShard,
    JobStatus,
    ShardStatus,
    utcnow,
)


def worker_identity() -> str:
    """`<host>:<pid>` of this process (the one that runs the pipeline), as stored in
    `Job.worker`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None, *, running_here: bool) -> bool:
    """True only when `holder` ran on this host and its process is gone.

    `holder` may name this very process (a restarted container reuses its predecessor's pid); it is
    then dead unless `running_here` says this process is running the job now.
    """
    if not holder:
        return False
    host, _, pid_text = holder.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return not running_here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a live process of another user
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child not yet reaped by its parent still answers kill(0); /proc tells it is dead."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def claim_job(session: Session, job_id: str, me: str, stale_after_s: float) -> Job | None:
    """Mark the job running for `me`;
    None means skip it (finished, cancelled, held by a live worker).

    The calling process is about to run the job, so it is not running it already.
    """
    job = get_job(session, job_id)
    if job is None or job.is_finished or (job.sharded and job.status == JobStatus.RUNNING):
        return None  # a running sharded job is its shards' to run (`store.shards`)
    if job.cancel_requested:
        if job.status == JobStatus.RUNNING and holder_is_dead(job.worker, running_here=False):
            finish_job(session, job_id, JobStatus.CANCELLED)  # cancelled while its worker was down
        return None
    takeover_after_s: float | None = stale_after_s
    if job.status == JobStatus.RUNNING and holder_is_dead(job.worker, running_here=False):
        takeover_after_s = None
    previous = job.worker if job.status == JobStatus.RUNNING else None
    claimed = mark_running(session, job_id, me, takeover_after_s=takeover_after_s)
    if claimed is not None and previous:
        add_event(session, job_id, EventKind.TAKEOVER, f"worker {previous} is gone; job taken over by {me}")
    return claimed


@dataclass(frozen=True)
class ClaimedJob:
    """What a run needs from the job row, read inside the claim transaction."""

    id: str
    spec: dict[str, Any]
    source: JobSource | None
    attempts: int
    callback_url: str | None
    tenant_id: str = ""


def claim_for_run(session: Session, settings: Settings, job_id: str, me: str, stale_after_s: float
                  ) -> ClaimedJob | None:
    """`claim_job`, and what the run needs of the row, in the same transaction;
    None: skip the job."""
    job = claim_job(session, job_id, me, stale_after_s)
    if job is None:
        return None
    return ClaimedJob(job.id, dict(job.spec), job_source(session, settings, job.id), job.attempts,
                      job.callback_url, job.tenant_id)


def release_job(session: Session, job_id: str, holder: str, reason: str) -> bool:
    """Put a job `holder` is running back to `queued` (kept checkpoints make the next run resume).

    Conditional on the holder, so a job another worker has taken over meanwhile is left alone.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == holder)
        .values(status=JobStatus.QUEUED, worker=None, heartbeat_at=None, eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    add_event(session, job_id, EventKind.REQUEUED, reason)
    return True


def find_orphans(
    session: Session,
    stale_after_s: float,
    *,
    running_here: Collection[str] = (),
    include_queued: bool = False,
    judge_heartbeats: bool = True,
) -> list[tuple[str, str]]:
    """Requeue the jobs of dead workers;
    returns the (job id, queue) pairs whose run message must be sent.

    1. a `running` job whose holder ran on this host and is gone is requeued (cancelled, when asked
       to be); `running_here` names the jobs this process runs, which are never orphans;
    2. with `judge_heartbeats`, a `running` job silent for `stale_after_s` (holder on any host) is
       requeued (`requeue_stale_jobs`);
    3. with `include_queued`, every `queued` job is returned too, oldest first
       (its message may be lost).
    """
    to_send: list[tuple[str, str]] = []
    running = session.execute(
        select(Job.id, Job.worker, Job.queue, Job.cancel_requested).where(Job.status == JobStatus.RUNNING)
    ).all()
    for job_id, holder, queue, cancel_requested in running:
        if not holder_is_dead(holder, running_here=job_id in running_here):
            continue
        if cancel_requested:
            finish_job(session, job_id, JobStatus.CANCELLED)
        elif release_job(session, job_id, holder, f"worker {holder} is gone; job requeued"):
            to_send.append((job_id, queue))
    stale_ids = requeue_stale_jobs(session, stale_after_s) if judge_heartbeats else []
    queues = dict(session.execute(select(Job.id, Job.queue).where(Job.id.in_(stale_ids))).all())
    to_send.extend((job_id, queues[job_id]) for job_id in stale_ids)
    if include_queued:
        sent = {job_id for job_id, _ in to_send}
        queued = session.execute(
            select(Job.id, Job.queue).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at)
        ).all()
        to_send.extend((job_id, queue) for job_id, queue in queued if job_id not in sent)
    return to_send


def request_cancel(session: Session, job_id: str) -> bool:
    """Flag a queued or running job for cancellation; a queued one is cancelled at once.

    False when the job is already finished (or unknown), which the API answers with 409.
    A sharded job none of whose shards is running (they wait in the broker) is cancelled at once as
    well; a running shard stops at its next poll and the job ends `cancelled` then.
    """
    now = utcnow()
    idle_sharded = (Job.status == JobStatus.RUNNING) & Job.sharded.is_(True) & ~exists().where(
        JobShard.job_id == Job.id, JobShard.status == ShardStatus.RUNNING)
    stops_now = (Job.status == JobStatus.QUEUED) | idle_sharded
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(
            cancel_requested=True,
            status=case((stops_now, JobStatus.CANCELLED), else_=Job.status),
            finished_at=case((stops_now, now), else_=Job.finished_at),
            eta_seconds=case((stops_now, None), else_=Job.eta_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def mark_running(session: Session, job_id: str, worker: str, *, takeover_after_s: float | None = None) -> Job | None:
    """Claim the job for `worker` and count the attempt; None means skip it
    (cancelled, finished, unknown).

    A job already `running` (a redelivered message after a crash) is taken
    over, unless `takeover_after_s` is given and its last heartbeat is
    younger than that (another worker is still alive on it).
    """
    now = utcnow()
    claimable = Job.status == JobStatus.QUEUED
    if takeover_after_s is None:
        claimable = or_(claimable, Job.status == JobStatus.RUNNING)
    else:
        cutoff = now - timedelta(seconds=takeover_after_s)
        claimable = or_(
            claimable,
            (Job.status == JobStatus.RUNNING) & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested.is_(False), claimable)
        .values(
            status=JobStatus.RUNNING,
            worker=worker,
            attempts=Job.attempts + 1,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return get_job(session, job_id)


def finish_job(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    metrics: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> Job | None:
    """Move an active job to `succeeded`, `failed` or `cancelled`; None if
    it had already finished."""
    if status not in FINISHED_JOB_STATUSES:
        raise ValueError(f"not a final status: {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "eta_seconds": None}
    if metrics is not None:
        values["metrics"] = json_column_value(metrics)
    if error is not None:
        values["error"] = {"code": str(error.get("code", "error")), "message": str(error.get("message", ""))}
    if status == JobStatus.SUCCEEDED:
        values.update(progress=1.0, stage_progress=1.0)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return get_job(session, job_id)


def requeue_stale_jobs(session: Session, older_than_s: float) -> list[str]:
    """Running jobs whose worker went silent for `older_than_s` go back to
    `queued`; returns their ids.

    For brokers that lose a crashed worker's message: the caller sends the returned ids again.
    A stale job whose cancellation was requested is finished as `cancelled` instead.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    # A sharded job has no single holder: its shards are judged one by one (`store.shards`).
    stale = Job.sharded.is_(False) & or_(Job.heartbeat_at < cutoff,
                                         Job.heartbeat_at.is_(None) & (Job.started_at < cutoff))
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.cancel_requested.is_(True), stale)
        .values(status=JobStatus.CANCELLED, finished_at=now, eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    ids = list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING, stale).order_by(Job.created_at)))
    requeued: list[str] = []
    for job_id in ids:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, stale)
            .values(status=JobStatus.QUEUED, worker=None, heartbeat_at=None, eta_seconds=None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            add_event(session, job_id, EventKind.REQUEUED, f"worker silent for over {older_than_s:.0f} s; job requeued")
            requeued.append(job_id)
    return requeued


def end_job(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    metrics: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> Job | None:
    """`finish_job` plus the job's final event
    (`succeeded`, `failed` or `cancelled`, with the error).

    None when the job had already finished: then no event is written.
    """
    job = finish_job(session, job_id, status, metrics=metrics, error=error)
    if job is not None:
        message = f"job {status}" + (f": {job.error['message']}" if error and job.error else "")
        add_event(session, job_id, FINAL_EVENT_KINDS[JobStatus(status)], message,
                  data={"error": job.error} if error else None)
    return job


@dataclass(frozen=True)
class JobEnded:
    """What `record_job_end` did:
    whether it wrote the end, the job's status now, and its callback URL."""

    written: bool
    status: str | None
    callback_url: str | None


def record_job_end(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    metrics: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> JobEnded:
    """`end_job`, or, when the job had already finished (recovery cancelled it, say),
    its status as it is."""
    job = end_job(session, job_id, status, metrics=metrics, error=error)
    if job is not None:
        return JobEnded(True, job.status, job.callback_url)
    current = get_job(session, job_id)
    return JobEnded(False, current.status if current else None, None)


def job_max_workers(session: Session, job_id: str) -> int:
    """The stored spec's `max_workers`: 1 where the job is unknown or the value is missing or not a
    number (the spec check reports that)."""
    spec = session.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    value = spec.get("max_workers", 1) if isinstance(spec, dict) else 1
    return value if isinstance(value, int) and not isinstance(value, bool) else 1
