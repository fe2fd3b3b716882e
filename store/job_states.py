"""Who holds a running job, and every change of hands: claim, release, and the search for orphans.

A job row names its holder as `<host>:<pid>` of the process running it. A holder on this same host whose
process is gone (a worker killed with SIGKILL, a crashed `fd2 serve`) is known dead at once, so its job is
taken over without waiting for the heartbeat to go stale; a holder elsewhere is judged by its heartbeat
(`stale_heartbeat_s`). A live holder is never displaced, so a duplicate message (Redis redelivery, a
recovery re-send) cannot start a second run of the same job.

The worker calls these; like the rest of `store` they never commit (the caller's `session_scope()` does).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.jobs import add_event, finish_job, get_job, mark_running, requeue_stale_jobs
from store.models import Job


def worker_identity() -> str:
    """`<host>:<pid>` of this process (the one that runs the pipeline), as stored in `Job.worker`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None, *, running_here: bool) -> bool:
    """True only when `holder` ran on this host and its process is gone.

    `holder` may name this very process (a restarted container reuses its predecessor's pid); it is then
    dead unless `running_here` says this process is running the job now.
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
    """Mark the job running for `me`; None means skip it (finished, cancelled, held by a live worker).

    The calling process is about to run the job, so it is not running it already.
    """
    job = get_job(session, job_id)
    if job is None or job.is_finished or (job.sharded and job.status == "running"):
        return None  # a running sharded job is its shards' to run (`store.shards`)
    if job.cancel_requested:
        if job.status == "running" and holder_is_dead(job.worker, running_here=False):
            finish_job(session, job_id, "cancelled")  # cancelled while its worker was down
        return None
    takeover_after_s: float | None = stale_after_s
    if job.status == "running" and holder_is_dead(job.worker, running_here=False):
        takeover_after_s = None
    previous = job.worker if job.status == "running" else None
    claimed = mark_running(session, job_id, me, takeover_after_s=takeover_after_s)
    if claimed is not None and previous:
        add_event(session, job_id, "takeover", f"worker {previous} is gone; job taken over by {me}")
    return claimed


def release_job(session: Session, job_id: str, holder: str, reason: str) -> bool:
    """Put a job `holder` is running back to `queued` (kept checkpoints make the next run resume).

    Conditional on the holder, so a job another worker has taken over meanwhile is left alone.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.worker == holder)
        .values(status="queued", worker=None, heartbeat_at=None, eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    add_event(session, job_id, "requeued", reason)
    return True


def find_orphans(
    session: Session,
    stale_after_s: float,
    *,
    running_here: Collection[str] = (),
    include_queued: bool = False,
    judge_heartbeats: bool = True,
) -> list[tuple[str, str]]:
    """Requeue the jobs of dead workers; returns the (job id, queue) pairs whose run message must be sent.

    1. a `running` job whose holder ran on this host and is gone is requeued (cancelled, when asked to be);
       `running_here` names the jobs this process runs, which are never orphans;
    2. with `judge_heartbeats`, a `running` job silent for `stale_after_s` (holder on any host) is requeued
       (`store.jobs.requeue_stale_jobs`);
    3. with `include_queued`, every `queued` job is returned too, oldest first (its message may be lost).
    """
    to_send: list[tuple[str, str]] = []
    running = session.execute(
        select(Job.id, Job.worker, Job.queue, Job.cancel_requested).where(Job.status == "running")
    ).all()
    for job_id, holder, queue, cancel_requested in running:
        if not holder_is_dead(holder, running_here=job_id in running_here):
            continue
        if cancel_requested:
            finish_job(session, job_id, "cancelled")
        elif release_job(session, job_id, holder, f"worker {holder} is gone; job requeued"):
            to_send.append((job_id, queue))
    stale_ids = requeue_stale_jobs(session, stale_after_s) if judge_heartbeats else []
    queues = dict(session.execute(select(Job.id, Job.queue).where(Job.id.in_(stale_ids))).all())
    to_send.extend((job_id, queues[job_id]) for job_id in stale_ids)
    if include_queued:
        sent = {job_id for job_id, _ in to_send}
        queued = session.execute(
            select(Job.id, Job.queue).where(Job.status == "queued").order_by(Job.created_at)
        ).all()
        to_send.extend((job_id, queue) for job_id, queue in queued if job_id not in sent)
    return to_send
