"""The shards of a job spread over several workers (spec `max_workers` > 1):
their rows, claims and dispatch.

The design (docs/ARCHITECTURE.md, "One job on many workers"): the worker that takes a job's
`fd2.run_job` message plans its shards (`record_plan`), and from then on every shard is a row here
and an `fd2.run_shard(job id, shard id)` message. `select_dispatch` moves ready shards (every shard
they depend on is `done`) from `queued` to `dispatched`; the caller publishes one message per
dispatched shard after committing. A worker claims a shard (`claim_shard`) with a conditional
UPDATE, so a duplicate message never runs a shard twice, and a shard whose holder died is taken over
like a job (`store.job_states.holder_is_dead`, or a stale heartbeat).

Fair share: a job never has more than `max_workers` shards running or waiting in the broker, so
shards of running jobs reach the broker's FIFO queue one by one, each behind every message already
there, among them the first messages of jobs submitted meanwhile; and an optional per-tenant cap
bounds the shards one tenant has running or waiting across all its jobs.

Dispatch for one tenant is serialised by a no-op write to the tenant's row first (a row lock on
PostgreSQL, the write lock on SQLite), so two workers finishing shards at once cannot both fill the
same free slot. Like the rest of `store`, nothing here commits.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from store.job_states import end_job, finish_job, holder_is_dead
from store.jobs import add_event, get_job
from store.keys import lock_tenant
from store.models import (
    ACTIVE_SHARD_STATUSES,
    FINAL_SHARD_STATUSES,
    SHARD_END_EVENT_KINDS,
    WAITING_SHARD_STATUSES,
    EventKind,
    Job,
    JobShard,
    JobStatus,
    ShardStatus,
    utcnow,
)


@dataclass(frozen=True)
class PlannedShard:
    """A shard as the planner hands it over
    (`fd2_core.shards.Shard` plus its share of the job's progress)."""

    id: str
    stage: str
    depends_on: tuple[str, ...] = ()
    weight: float = 0.0


@dataclass(frozen=True)
class ShardClaim:
    """What a worker needs from a claimed shard and its job, read in the claim transaction."""

    job_id: str
    shard_id: str
    stage: str
    attempts: int
    tenant_id: str
    spec: dict[str, Any]
    job_started_at: Any


def shard_key(job_id: str, shard_id: str) -> str:
    """How a worker names a shard it runs in `WorkerState.running_here`
    (job ids never contain `/`)."""
    return f"{job_id}/{shard_id}"


# ---------------------------------------------------------------- plan and summary


def record_plan(session: Session, job_id: str, shards: Iterable[PlannedShard]) -> int:
    """Insert the job's shards that are not recorded yet (a re-planned job keeps its rows and their
    states) and mark the job sharded, held by no single worker from now on. Returns the number of
    shards of the job."""
    known = set(session.scalars(select(JobShard.shard_id).where(JobShard.job_id == job_id)))
    for position, shard in enumerate(shards):
        if shard.id not in known:
            session.add(JobShard(job_id=job_id, shard_id=shard.id, position=position, stage=shard.stage,
                                 depends_on=list(shard.depends_on), weight=float(shard.weight),
                                 status=ShardStatus.QUEUED, progress=0.0, attempts=0))
    session.flush()
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(sharded=True, worker=None, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return refresh_summary(session, job_id)


def record_sharded_plan(session: Session, job_id: str, shards: list[PlannedShard], max_workers: int) -> int:
    """`record_plan` and the job's `sharded` event (the plan and `max_workers`)."""
    count = record_plan(session, job_id, shards)
    add_event(session, job_id, EventKind.SHARDED,
              f"split into {count} shards; up to {max_workers} workers run them at once",
              data={"shards": [shard.id for shard in shards], "max_workers": max_workers})
    return count


def job_shards(session: Session, job_id: str) -> list[JobShard]:
    """The job's shards in plan order, read fresh."""
    query = select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.position)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def shard_summary(rows: list[JobShard]) -> dict[str, Any]:
    """The job resource's `shards`: counts by status and one item per shard (docs/INTERFACES.md)."""
    counts = {str(status): 0 for status in ShardStatus}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    items = [
        {"id": row.shard_id, "stage": row.stage, "status": row.status, "worker": row.worker,
         "attempts": row.attempts, "progress": round(float(row.progress), 4)}
        for row in rows
    ]
    return {"total": len(rows), **counts, "items": items}


def _job_progress(rows: list[JobShard]) -> tuple[str | None, float, float]:
    """(stage, progress, stage progress) of the job from its shards: progress is the shards'
    progress weighted by their shares;
    the stage is that of the first unfinished shard (a running one first)."""
    total = sum(row.weight for row in rows) or 1.0
    progress = sum(row.weight * (1.0 if row.status == ShardStatus.DONE else row.progress) for row in rows) / total
    unfinished = [row for row in rows if row.status != ShardStatus.DONE]
    running = [row for row in unfinished if row.status == ShardStatus.RUNNING]
    current = (running or unfinished or [None])[0]
    if current is None:
        return (rows[-1].stage if rows else None), progress, 1.0
    same = [row for row in rows if row.stage == current.stage]
    weight = sum(row.weight for row in same)
    done = [1.0 if row.status == ShardStatus.DONE else row.progress for row in same]
    if weight:
        stage_progress = sum(row.weight * d for row, d in zip(same, done, strict=True)) / weight
    else:
        stage_progress = sum(done) / len(done)
    return current.stage, progress, stage_progress


def refresh_summary(session: Session, job_id: str) -> int:
    """Rewrite the job's `shards` summary and its progress, stage and ETA from the shard rows; the
    ETA is the elapsed time scaled by the work left (`elapsed · (1 − p) / p`).
    Returns the number of shards.

    The job row is locked first (PostgreSQL; SQLite serialises writers anyway), and only then are
    the shards read: two workers ending shards at once must not each write a summary that misses the
    other's change.
    """
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    rows = job_shards(session, job_id)
    job = get_job(session, job_id)
    if job is None:
        return 0
    values: dict[str, Any] = {"shards": shard_summary(rows)}
    if job.status == JobStatus.RUNNING and rows:
        stage, progress, stage_progress = _job_progress(rows)
        eta = None
        if job.started_at is not None and progress >= 0.01:
            elapsed = (utcnow() - job.started_at).total_seconds()
            eta = max(0.0, elapsed * (1.0 - progress) / progress)
        values.update(stage=stage, progress=min(max(progress, 0.0), 1.0),
                      stage_progress=min(max(stage_progress, 0.0), 1.0), eta_seconds=eta)
    session.execute(update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False))
    return len(rows)


# ---------------------------------------------------------------- a worker and its shard


def claim_shard(
    session: Session, job_id: str, shard_id: str, me: str, stale_after_s: float
) -> ShardClaim | None:
    """Mark the shard running for `me`; None means skip it: the job is not running or asked to stop,
    the shard is finished, `queued` (not dispatched: the message is an old one), held by a live
    worker, or not ready (then it goes back to `queued` for a later dispatch)."""
    job = get_job(session, job_id)
    row = session.get(JobShard, (job_id, shard_id), populate_existing=True)
    if job is None or row is None or job.status != JobStatus.RUNNING or job.cancel_requested or not job.sharded:
        return None
    # before any reload
    previous_status, previous_worker, attempts = row.status, row.worker, row.attempts
    if row.status not in ACTIVE_SHARD_STATUSES:
        # finished, or `queued`: an old message must not bypass max_workers and the tenant cap
        return None
    if row.status == ShardStatus.RUNNING:
        stale = row.heartbeat_at is None or row.heartbeat_at < utcnow() - timedelta(seconds=stale_after_s)
        if not (stale or holder_is_dead(row.worker, running_here=False)):
            return None
    done = set(session.scalars(select(JobShard.shard_id).where(
        JobShard.job_id == job_id, JobShard.shard_id.in_(list(row.depends_on or [])),
        JobShard.status == ShardStatus.DONE)))
    if set(row.depends_on or []) - done:
        _set_status(session, row, ShardStatus.QUEUED, only_from=(previous_status,))
        refresh_summary(session, job_id)
        return None
    now = utcnow()
    claimed = session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.status == previous_status,
               or_(JobShard.worker.is_(None), JobShard.worker == previous_worker))
        .values(status=ShardStatus.RUNNING, worker=me, attempts=JobShard.attempts + 1, heartbeat_at=now, started_at=now,
                finished_at=None, progress=0.0, error=None)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        return None
    if previous_status == ShardStatus.RUNNING and previous_worker:
        add_event(session, job_id, EventKind.SHARD_TAKEOVER,
                  f"shard {shard_id}: worker {previous_worker} is gone; taken over by {me}", stage=row.stage,
                  data={"shard": shard_id, "worker": me, "previous": previous_worker})
    add_event(session, job_id, EventKind.SHARD_STARTED, f"shard {shard_id}: attempt {attempts + 1} on {me}",
              stage=row.stage, data={"shard": shard_id, "worker": me, "attempt": attempts + 1})
    refresh_summary(session, job_id)
    return ShardClaim(job_id, shard_id, row.stage, attempts + 1, job.tenant_id, dict(job.spec), job.started_at)


def _set_status(session: Session, row: JobShard, status: ShardStatus, *, only_from: Collection[str]) -> bool:
    result = session.execute(
        update(JobShard)
        .where(JobShard.job_id == row.job_id, JobShard.shard_id == row.shard_id, JobShard.status.in_(only_from))
        .values(status=status)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_shard(
    session: Session, job_id: str, shard_id: str, me: str, status: ShardStatus, *, error: dict[str, str] | None = None
) -> bool:
    """Move the shard `me` runs to `done`, `failed` or `cancelled`;
    False when another worker holds it now."""
    if status not in FINAL_SHARD_STATUSES:
        raise ValueError(f"not a final shard status: {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if status == ShardStatus.DONE:
        values["progress"] = 1.0
    result = session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.status == ShardStatus.RUNNING,
               JobShard.worker == me)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    refresh_summary(session, job_id)
    return result.rowcount == 1


def end_shard(
    session: Session,
    claim: ShardClaim,
    me: str,
    status: ShardStatus,
    *,
    error: dict[str, str] | None = None,
    message: str | None = None,
) -> bool:
    """`finish_shard` and its event (`shard_finished`, `shard_failed` or `shard_cancelled`); False
    when `me` no longer holds the shard (nothing is written then)."""
    if not finish_shard(session, claim.job_id, claim.shard_id, me, status, error=error):
        return False
    text = message or (error["message"] if error else status)
    add_event(session, claim.job_id, SHARD_END_EVENT_KINDS[status], f"shard {claim.shard_id}: {text}",
              stage=claim.stage, data={"shard": claim.shard_id, "worker": me, "status": status})
    return True


def release_shard(session: Session, job_id: str, shard_id: str, me: str, *, requeued_message: bool) -> bool:
    """Give back the shard `me` runs (its worker shuts down): `dispatched` when its message goes
    back to the broker (`requeued_message`), else `queued` for the next dispatch."""
    result = session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.status == ShardStatus.RUNNING,
               JobShard.worker == me)
        .values(status=ShardStatus.DISPATCHED if requeued_message else ShardStatus.QUEUED, worker=None,
                heartbeat_at=None)
        .execution_options(synchronize_session=False)
    )
    refresh_summary(session, job_id)
    return result.rowcount == 1


def give_back_shard(session: Session, claim: ShardClaim, me: str) -> bool:
    """Its worker shuts down: the shard goes back to `dispatched` (its message is requeued), with a
    `shard_requeued` event; False when `me` no longer held it."""
    if not release_shard(session, claim.job_id, claim.shard_id, me, requeued_message=True):
        return False
    add_event(session, claim.job_id, EventKind.SHARD_REQUEUED,
              f"shard {claim.shard_id}: worker shutting down; shard requeued", stage=claim.stage,
              data={"shard": claim.shard_id, "worker": me})
    return True


def beat_shard(session: Session, job_id: str, shard_id: str, me: str) -> None:
    """Heartbeat of a running shard, which is also its job's
    (a sharded job has no single holder)."""
    now = utcnow()
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.worker == me,
               JobShard.status == ShardStatus.RUNNING)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING).values(heartbeat_at=now)
                    .execution_options(synchronize_session=False))


def record_shard_progress(session: Session, job_id: str, shard_id: str, me: str, progress: float) -> None:
    """The shard's own progress (0–1) and, from all shards, the job's progress, stage and ETA."""
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.worker == me,
               JobShard.status == ShardStatus.RUNNING)
        .values(progress=min(max(float(progress), 0.0), 1.0), heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    refresh_summary(session, job_id)


def shard_held(session: Session, job_id: str, shard_id: str, me: str) -> bool:
    """Whether `me` still holds the shard (recovery may have given it to another worker after `me`
    went silent)."""
    query = select(JobShard.shard_id).where(JobShard.job_id == job_id, JobShard.shard_id == shard_id,
                                            JobShard.status == ShardStatus.RUNNING, JobShard.worker == me)
    return session.scalar(query) is not None


def job_stop_requested(session: Session, job_id: str) -> bool:
    """True when the shard's job was cancelled,
    has ended (another shard failed it) or no longer exists."""
    row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
    return row is None or row.status != JobStatus.RUNNING or bool(row.cancel_requested)


def shard_should_stop(session: Session, job_id: str, shard_id: str, me: str) -> bool:
    """The job stopped (cancelled, or ended by another shard),
    or the shard is another worker's now."""
    return job_stop_requested(session, job_id) or not shard_held(session, job_id, shard_id, me)


def job_ended_and_idle(session: Session, job_id: str) -> bool:
    """The job failed or was cancelled and none of its shards runs any more: its folder may go."""
    job = get_job(session, job_id)
    return (job is not None and job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
            and not running_shards(session, job_id))


def running_shards(session: Session, job_id: str) -> int:
    query = select(JobShard.shard_id).where(JobShard.job_id == job_id, JobShard.status == ShardStatus.RUNNING)
    return len(session.scalars(query).all())


# ---------------------------------------------------------------- dispatch


def select_dispatch(session: Session, tenant_id: str, tenant_cap: int = 0) -> list[tuple[str, str, str]]:
    """Mark the tenant's ready shards `dispatched` and return their (job id, shard id, queue),
    oldest job first.

    A job gets at most `max_workers` (its spec) shards running or dispatched; the tenant at most
    `tenant_cap` across its jobs (0: no cap). A shard is ready when every shard it depends on is
    `done`. The caller publishes one `fd2.run_shard` message per pair after committing, and puts a
    shard whose message could not be published back with `undo_dispatch`.
    """
    lock_tenant(session, tenant_id)  # serialises dispatch per tenant
    jobs = session.execute(
        select(Job.id, Job.spec, Job.queue)
        .where(Job.tenant_id == tenant_id, Job.status == JobStatus.RUNNING, Job.sharded.is_(True),
               Job.cancel_requested.is_(False))
        .order_by(Job.started_at, Job.id)
    ).all()
    if not jobs:
        return []
    rows = list(session.scalars(
        select(JobShard).where(JobShard.job_id.in_([job.id for job in jobs])).order_by(JobShard.position)
        .execution_options(populate_existing=True)
    ))
    by_job: dict[str, list[JobShard]] = {}
    for row in rows:
        by_job.setdefault(row.job_id, []).append(row)
    tenant_active = sum(row.status in ACTIVE_SHARD_STATUSES for row in rows)
    picked: list[tuple[str, str, str]] = []
    now = utcnow()
    for job in jobs:
        shards = by_job.get(job.id, [])
        done = {row.shard_id for row in shards if row.status == ShardStatus.DONE}
        free = max(1, int((job.spec or {}).get("max_workers") or 1)) - sum(
            row.status in ACTIVE_SHARD_STATUSES for row in shards)
        for row in shards:
            if free <= 0 or (tenant_cap and tenant_active >= tenant_cap):
                break
            if row.status != ShardStatus.QUEUED or set(row.depends_on or []) - done:
                continue
            result = session.execute(
                update(JobShard)
                .where(JobShard.job_id == job.id, JobShard.shard_id == row.shard_id,
                       JobShard.status == ShardStatus.QUEUED)
                .values(status=ShardStatus.DISPATCHED, dispatched_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                picked.append((job.id, row.shard_id, job.queue))
                free -= 1
                tenant_active += 1
    # one lock order for job rows everywhere
    for job_id in sorted({job_id for job_id, _, _ in picked}):
        refresh_summary(session, job_id)
    return picked


def undo_dispatch(session: Session, job_id: str, shard_id: str) -> None:
    """A dispatched shard whose message never reached the broker goes back to `queued`."""
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_id == shard_id, JobShard.status == ShardStatus.DISPATCHED)
        .values(status=ShardStatus.QUEUED, dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    refresh_summary(session, job_id)


def tenants_with_sharded_jobs(session: Session) -> list[str]:
    """Tenants that have a running sharded job (whose shards a recovery pass dispatches)."""
    query = select(Job.tenant_id).where(Job.status == JobStatus.RUNNING, Job.sharded.is_(True)).distinct()
    return sorted(session.scalars(query))


def dispatched_shards(session: Session, older_than_s: float = 0.0) -> list[tuple[str, str, str]]:
    """(job id, shard id, queue) of the dispatched shards of running jobs whose message went out at
    least `older_than_s` ago (0: all of them), oldest job first: re-sent when the broker may have
    lost their messages (restarted empty, or a worker killed between the commit and the publish).
    Their `dispatched_at` is reset, so a shard is re-sent at most once per `older_than_s`; a
    duplicate is skipped by the claim."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    query = (
        select(JobShard.job_id, JobShard.shard_id, Job.queue)
        .join(Job, Job.id == JobShard.job_id)
        .where(JobShard.status == ShardStatus.DISPATCHED, Job.status == JobStatus.RUNNING,
               or_(JobShard.dispatched_at.is_(None), JobShard.dispatched_at <= cutoff))
        .order_by(Job.started_at, JobShard.position)
    )
    shards = [(job_id, shard_id, queue) for job_id, shard_id, queue in session.execute(query)]
    for job_id, shard_id, _ in shards:
        session.execute(update(JobShard).where(JobShard.job_id == job_id, JobShard.shard_id == shard_id,
                                               JobShard.status == ShardStatus.DISPATCHED)
                        .values(dispatched_at=utcnow()).execution_options(synchronize_session=False))
    return shards


@dataclass(frozen=True)
class Reconciled:
    """What `reconcile_sharded_jobs` did to one job, and the job's status after it.

    Actions: `job_failed` or `job_cancelled` (the job ended now: its folder and callback are the
    caller's), `package_again` (the package shard is queued again) or `closed` (the open shards of
    an ended job were cancelled; its folder is the caller's to remove).
    """

    job_id: str
    action: str
    status: str
    callback_url: str | None

    @property
    def job_ended_now(self) -> bool:
        return self.action in ("job_failed", "job_cancelled")


def reconcile_sharded_jobs(session: Session, grace_s: float) -> list[Reconciled]:
    """Bring each sharded job in line with its shards where a worker stopped between two writes:

    - a running job with a failed shard and no shard running ends `failed` with that shard's error;
    - a running job asked to cancel with no shard running ends `cancelled`;
    - a running job whose shards are all done, the package shard for over `grace_s` (it ended but
      the job was not recorded), gets its package shard queued again: run again, it finds the
      artifacts and records the job;
    - an ended job's shards that never ran are `cancelled`.
    """
    open_shards = select(JobShard.job_id).where(JobShard.job_id == Job.id,
                                                JobShard.status.in_(WAITING_SHARD_STATUSES)).exists()
    candidates = session.scalars(
        select(Job.id).where(Job.sharded.is_(True), or_(Job.status == JobStatus.RUNNING, open_shards)).order_by(Job.id)
    ).all()
    done: list[Reconciled] = []
    for job_id in candidates:
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        job = get_job(session, job_id)
        rows = job_shards(session, job_id)
        if job is None or any(row.status == ShardStatus.RUNNING for row in rows):
            continue
        action = _reconcile_one(session, job, rows, utcnow() - timedelta(seconds=grace_s))
        if action:
            refresh_summary(session, job_id)
            current = get_job(session, job_id)
            done.append(Reconciled(job_id, action, current.status if current else "gone", job.callback_url))
    return done


def _reconcile_one(session: Session, job: Job, rows: list[JobShard], cutoff: Any) -> str | None:
    failed = next((row for row in rows if row.status == ShardStatus.FAILED), None)
    action = None
    if job.status == JobStatus.RUNNING and failed is not None:
        error = failed.error or {"code": "shard_failed", "message": f"shard {failed.shard_id} failed"}
        if end_job(session, job.id, JobStatus.FAILED, error=error) is not None:
            action = "job_failed"
    elif job.status == JobStatus.RUNNING and job.cancel_requested:
        if end_job(session, job.id, JobStatus.CANCELLED) is not None:
            action = "job_cancelled"
    elif job.status == JobStatus.RUNNING and rows and all(row.status == ShardStatus.DONE for row in rows):
        package = rows[-1]
        if package.finished_at is not None and package.finished_at >= cutoff:
            return None  # its worker is recording the job right now
        session.execute(update(JobShard).where(JobShard.job_id == job.id, JobShard.shard_id == package.shard_id)
                        .values(status=ShardStatus.QUEUED).execution_options(synchronize_session=False))
        add_event(session, job.id, EventKind.SHARD_REQUEUED, f"shard {package.shard_id} ended but the job was not "
                  "recorded; it runs again to record it", stage=package.stage, data={"shard": package.shard_id})
        return "package_again"
    if job.status != JobStatus.RUNNING or action:
        result = session.execute(
            update(JobShard).where(JobShard.job_id == job.id, JobShard.status.in_(WAITING_SHARD_STATUSES))
            .values(status=ShardStatus.CANCELLED, finished_at=utcnow()).execution_options(synchronize_session=False)
        )
        if result.rowcount and not action:
            action = "closed"
    return action


def requeue_orphan_shards(
    session: Session, stale_after_s: float, *, running_here: Collection[str] = (), judge_heartbeats: bool = True
) -> list[tuple[str, str]]:
    """Running shards whose holder died (on this host) or, with `judge_heartbeats`, went silent for
    `stale_after_s` go back to `queued` for the next dispatch; a shard of a job that stopped is
    `cancelled`. `running_here` holds the `shard_key`s this process runs. Returns the (job id, shard
    id) pairs requeued."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    rows = session.execute(
        select(JobShard.job_id, JobShard.shard_id, JobShard.stage, JobShard.worker, JobShard.heartbeat_at,
               Job.status, Job.cancel_requested)
        .join(Job, Job.id == JobShard.job_id)
        .where(JobShard.status == ShardStatus.RUNNING)
        .order_by(JobShard.job_id, JobShard.shard_id)
    ).all()
    requeued: list[tuple[str, str]] = []
    for row in rows:
        dead = holder_is_dead(row.worker, running_here=shard_key(row.job_id, row.shard_id) in running_here)
        stale = judge_heartbeats and (row.heartbeat_at is None or row.heartbeat_at < cutoff)
        if not (dead or stale):
            continue
        stopped = row.status != JobStatus.RUNNING or row.cancel_requested
        result = session.execute(
            update(JobShard)
            .where(JobShard.job_id == row.job_id, JobShard.shard_id == row.shard_id,
                   JobShard.status == ShardStatus.RUNNING, JobShard.worker == row.worker)
            .values(status=ShardStatus.CANCELLED if stopped else ShardStatus.QUEUED, worker=None, heartbeat_at=None,
                    finished_at=utcnow() if stopped else None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            continue
        if row.cancel_requested and row.status == JobStatus.RUNNING:
            finish_job(session, row.job_id, JobStatus.CANCELLED)
        elif not stopped:
            why = "is gone" if dead else f"was silent for over {stale_after_s:.0f} s"
            add_event(session, row.job_id, EventKind.SHARD_REQUEUED,
                      f"shard {row.shard_id}: worker {row.worker} {why}; shard requeued", stage=row.stage,
                      data={"shard": row.shard_id, "worker": row.worker})
            requeued.append((row.job_id, row.shard_id))
        refresh_summary(session, row.job_id)
    return requeued


__all__ = [
    "PlannedShard",
    "Reconciled",
    "ShardClaim",
    "beat_shard",
    "claim_shard",
    "dispatched_shards",
    "end_shard",
    "finish_shard",
    "give_back_shard",
    "job_ended_and_idle",
    "job_shards",
    "job_stop_requested",
    "reconcile_sharded_jobs",
    "record_plan",
    "record_shard_progress",
    "record_sharded_plan",
    "refresh_summary",
    "release_shard",
    "requeue_orphan_shards",
    "running_shards",
    "select_dispatch",
    "shard_held",
    "shard_key",
    "shard_should_stop",
    "shard_summary",
    "tenants_with_sharded_jobs",
    "undo_dispatch",
]
