"""Jobs and their events: what the API writes at submit/cancel and what the
worker writes while running.

State changes are single conditional UPDATEs (`...
WHERE status IN (...)`), so the API cancelling and a worker starting or finishing the same job
cannot overwrite each other on either database.
None of these functions commits: the caller's `session_scope()` (or the
route) decides the transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, case, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, joinedload, selectinload

from fd2_config.settings import Settings
from store.models import (
    ACTIVE_JOB_STATUSES,
    FINISHED_JOB_STATUSES,
    PUBLIC_ID,
    Artifact,
    Job,
    JobEvent,
    JobShard,
    is_public_id,
    utcnow,
)
from store.pagination import Page, newest_first_page

SAFE_ID = PUBLIC_ID


def json_column_value(value: Any) -> Any:
    """`value` as a json column stores it: NaN and infinities (a diverged loss) become None.

    PostgreSQL's json type refuses them.
    Keys become strings and tuples lists, as JSON writes them.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_column_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_column_value(v) for v in value]
    return value


def _fraction(value: float) -> float:
    value = float(value)
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


def job_workdir(settings: Settings, job_id: str) -> Path:
    """`<jobs_dir>/<job id>/`: the pipeline's resumable working folder for this job."""
    if not SAFE_ID.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    assert settings.jobs_dir is not None
    return settings.jobs_dir / job_id


def create_job(
    session: Session,
    *,
    tenant_id: str,
    spec: dict[str, Any],
    queue: str,
    dataset_id: str | None = None,
    manifest_path: str | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    job_id: str | None = None,
) -> Job:
    """Insert a queued job (the caller sends it to the broker after committing)."""
    job = Job(
        tenant_id=tenant_id,
        spec=spec,
        queue=queue,
        dataset_id=dataset_id,
        manifest_path=manifest_path,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        status="queued",
    )
    if job_id is not None:
        job.id = job_id
    session.add(job)
    session.flush()
    return job


def delete_job(session: Session, job_id: str) -> None:
    """Remove a job with its events and artifact rows (a submission that
    never reached the broker)."""
    session.execute(delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False))


class JobStillActive(Exception):
    """The job is queued or running: it cannot be deleted until it ends (cancel it first)."""

    def __init__(self, status: str) -> None:
        super().__init__(f"job is {status}")
        self.status = status


def delete_finished_job(session: Session, tenant_id: str, job_id: str) -> list[str] | None:
    """Delete a finished job of the tenant with its events and artifact rows; returns the registered
    artifact paths, whose files the caller removes after committing
    (`store.job_files.remove_job_files`).

    None when the job is unknown or another tenant's; raises
    `JobStillActive` while it is queued or running.
    Rows go first, in one transaction, so a crash before the files are gone leaves only unreferenced
    files (which the storage sweep removes), never a job whose downloads point at nothing.
    """
    job = get_tenant_job(session, tenant_id, job_id)
    if job is None:
        return None
    if not job.is_finished:
        raise JobStillActive(job.status)
    paths = [artifact.path for artifact in job.artifacts]
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status.in_(FINISHED_JOB_STATUSES))
        .execution_options(synchronize_session=False)
    )
    # 0: a concurrent delete won (a finished job stays finished)
    return paths if result.rowcount == 1 else None


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def get_tenant_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    """The job with its artifacts in one query, or None when unknown or another tenant's."""
    if not is_public_id(job_id):
        return None
    query = (
        select(Job)
        .options(joinedload(Job.artifacts))
        .where(Job.id == job_id, Job.tenant_id == tenant_id)
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).unique().one_or_none()


@dataclass
class ArtifactRecord:
    name: str
    size: int
    sha256: str
    media_type: str


@dataclass
class JobRecord:
    """A read-only job with its artifacts, attribute-compatible with `Job` for presenting."""

    id: str
    status: str
    stage: str | None
    progress: float
    stage_progress: float
    eta_seconds: float | None
    spec: dict[str, Any]
    dataset_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    metrics: dict[str, Any]
    cancel_requested: bool
    artifacts_expired_at: datetime | None = None
    manifest_path: str | None = None
    shards: dict[str, Any] | None = None
    artifacts: list[ArtifactRecord] = field(default_factory=list)


_RECORD_COLUMNS = [getattr(Job, name) for name in JobRecord.__dataclass_fields__ if name != "artifacts"]
# Built once: constructing a statement costs more than running it on the polling hot path.
_JOB_RECORD_QUERY = (
    select(*_RECORD_COLUMNS, Artifact.name.label("artifact_name"), Artifact.size, Artifact.sha256,
           Artifact.media_type)
    .outerjoin(Artifact, Artifact.job_id == Job.id)
    .where(Job.id == bindparam("job_id"))
    .order_by(Artifact.name)
)
_TENANT_JOB_RECORD_QUERY = _JOB_RECORD_QUERY.where(Job.tenant_id == bindparam("tenant_id"))


def read_job_record(session: Session, tenant_id: str | None, job_id: str) -> JobRecord | None:
    """The job (the tenant's only, unless `tenant_id` is None) and its artifacts in one indexed
    query, without ORM identity tracking.

    This is what job polling (`GET /v1/jobs/{id}`) runs, so it is kept to a single prebuilt SELECT.
    """
    if not is_public_id(job_id):
        return None
    if tenant_id is None:
        query, params = _JOB_RECORD_QUERY, {"job_id": job_id}
    else:
        query, params = _TENANT_JOB_RECORD_QUERY, {"job_id": job_id, "tenant_id": tenant_id}
    rows = session.connection().execute(query, params).all()
    if not rows:
        return None
    first = rows[0]
    record = JobRecord(*first[: len(_RECORD_COLUMNS)])
    record.artifacts = [
        ArtifactRecord(row.artifact_name, row.size, row.sha256, row.media_type)
        for row in rows
        if row.artifact_name is not None
    ]
    return record


def find_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    query = (
        select(Job)
        .options(joinedload(Job.artifacts))
        .where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    )
    return session.scalars(query).unique().one_or_none()


def list_jobs(
    session: Session, tenant_id: str, *, status: str | None = None, limit: int = 50, cursor: str | None = None
) -> Page[Job]:
    """One page of the tenant's jobs, newest first (artifacts of the whole
    page in one more query)."""
    query = select(Job).options(selectinload(Job.artifacts)).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    return newest_first_page(session, query, Job.created_at, Job.id, limit=limit, cursor=cursor)


def count_active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES)
    )
    return int(session.scalar(query) or 0)


def count_jobs_by_status(session: Session) -> dict[str, int]:
    """Every job status with its count across tenants (for metrics)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(count) for status, count in rows}


def queue_depths(session: Session) -> dict[str, int]:
    """Queued jobs per queue name, across tenants (for metrics); a queue with none is absent."""
    return dict(session.execute(
        select(Job.queue, func.count()).where(Job.status == "queued").group_by(Job.queue)
    ).all())


def oldest_queued_at(session: Session) -> datetime | None:
    """When the oldest queued job was created, across tenants (for
    metrics); None when none is queued."""
    return session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))


def tenant_job_status(session: Session, tenant_id: str, job_id: str) -> str | None:
    """The status of the tenant's job, or None when the tenant has no job
    of that id (or it was deleted)."""
    return session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant_id == tenant_id))


def dataset_has_active_jobs(session: Session, dataset_id: str) -> bool:
    query = select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)
    return session.scalar(query) is not None


def request_cancel(session: Session, job_id: str) -> bool:
    """Flag a queued or running job for cancellation; a queued one is cancelled at once.

    False when the job is already finished (or unknown), which the API answers with 409.
    A sharded job none of whose shards is running (they wait in the broker) is cancelled at once as
    well; a running shard stops at its next poll and the job ends `cancelled` then.
    """
    now = utcnow()
    idle_sharded = (Job.status == "running") & Job.sharded.is_(True) & ~exists().where(
        JobShard.job_id == Job.id, JobShard.status == "running")
    stops_now = (Job.status == "queued") | idle_sharded
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(
            cancel_requested=True,
            status=case((stops_now, "cancelled"), else_=Job.status),
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
    claimable = Job.status == "queued"
    if takeover_after_s is None:
        claimable = or_(claimable, Job.status == "running")
    else:
        cutoff = now - timedelta(seconds=takeover_after_s)
        claimable = or_(
            claimable,
            (Job.status == "running") & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested.is_(False), claimable)
        .values(
            status="running",
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


def update_progress(
    session: Session,
    job_id: str,
    *,
    stage: str | None,
    progress: float,
    stage_progress: float,
    eta_seconds: float | None,
) -> None:
    """Record the latest progress (also counts as a heartbeat)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(
            stage=stage,
            progress=_fraction(progress),
            stage_progress=_fraction(stage_progress),
            eta_seconds=max(float(eta_seconds), 0.0) if eta_seconds is not None and math.isfinite(eta_seconds)
            else None,
            heartbeat_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    message: str,
    *,
    stage: str | None = None,
    progress: float | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent:
    if progress is not None:
        progress = _fraction(progress)
    event = JobEvent(job_id=job_id, kind=kind, message=message, stage=stage, progress=progress,
                     data=json_column_value(data))
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, job_id: str, *, after: int | None = None, limit: int = 100) -> list[JobEvent]:
    """Events oldest first, strictly after event id `after`, at most `limit`."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit)))


def heartbeat(session: Session, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """True when the job was cancelled or no longer exists (either way: stop working on it)."""
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)


def finish_job(
    session: Session,
    job_id: str,
    status: str,
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
    if status == "succeeded":
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
        .where(Job.status == "running", Job.cancel_requested.is_(True), stale)
        .values(status="cancelled", finished_at=now, eta_seconds=None)
        .execution_options(synchronize_session=False)
    )
    ids = list(session.scalars(select(Job.id).where(Job.status == "running", stale).order_by(Job.created_at)))
    requeued: list[str] = []
    for job_id in ids:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", stale)
            .values(status="queued", worker=None, heartbeat_at=None, eta_seconds=None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            add_event(session, job_id, "requeued", f"worker silent for over {older_than_s:.0f} s; job requeued")
            requeued.append(job_id)
    return requeued

