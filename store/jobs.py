"""Jobs and their events: the rows the API writes at submit and reads, and what a run records.

Changes of a job's status live in `store/job_states.py`. A submit's limits (the tenant's cap of
active jobs, a dataset still there and ready) are checked where the job is inserted, under the
tenant's lock (`create_job_if_allowed`), so simultaneous submits and deletes cannot all pass.
None of these functions commits:
the caller's `session_scope()` (or the route) decides the transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session, joinedload, selectinload

from fd2_config.settings import Settings
from store.datasets import dataset_path, get_dataset
from store.keys import lock_tenant
from store.models import (
    ACTIVE_JOB_STATUSES,
    FINISHED_JOB_STATUSES,
    PUBLIC_ID,
    Artifact,
    Dataset,
    DatasetStatus,
    Job,
    JobEvent,
    JobStatus,
    is_public_id,
    utcnow,
)
from store.pagination import Page, newest_first_page


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


# Dataset warnings made while the upload was unpacked (member names decoded); a job's own scan
# cannot see them again, so they travel with the job. Duplicate warnings are not carried: the job's
# loader finds them itself.
UNPACKING_WARNINGS = ("names_",)


@dataclass(frozen=True)
class JobSource:
    """Where a job's data is, as recorded in the database
    (nothing on disk has been looked at yet)."""

    kind: Literal["dataset", "manifest", "objects"]
    path: str
    dataset_id: str | None = None
    # Intake findings a rescan cannot see again (names were decoded when the upload was unpacked),
    # carried into the job's report and events: `{code, message, details}` each.
    warnings: tuple[dict[str, Any], ...] = ()


def job_source(session: Session, settings: Settings, job_id: str) -> JobSource | None:
    """Where the job's data is recorded to be:
    an operator-side manifest, or the uploaded dataset's folder.

    None when the job or its dataset no longer exists. Only rows are read; the worker checks the
    files (`worker.source_check`) when the run starts. A manifest job's stored `{"root", "items"}`
    resolves against the operator-approved `root`, not against the job folder the file sits in.
    """
    job = get_job(session, job_id)
    if job is None:
        return None
    if job.manifest_path and job.dataset_uri:
        return JobSource("objects", job.manifest_path)
    if job.manifest_path:
        return JobSource("manifest", job.manifest_path)
    if not job.dataset_id:
        return None
    dataset = get_dataset(session, job.dataset_id)
    if dataset is None:
        return None
    unpacked = tuple(w for w in dataset.warnings or [] if str(w.get("code", "")).startswith(UNPACKING_WARNINGS))
    path = dataset.path or str(dataset_path(settings, dataset.id))
    return JobSource("dataset", path, dataset.id, unpacked)


def job_workdir(settings: Settings, job_id: str) -> Path:
    """`<jobs_dir>/<job id>/`: the pipeline's resumable working folder for this job."""
    if not PUBLIC_ID.match(job_id):
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
    dataset_uri: str | None = None,
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
        dataset_uri=dataset_uri,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        status=JobStatus.QUEUED,
    )
    if job_id is not None:
        job.id = job_id
    session.add(job)
    session.flush()
    return job


class TooManyActiveJobs(Exception):
    """The tenant already has its cap of queued or running jobs."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"at most {cap} active jobs per tenant")
        self.cap = cap


class DatasetUnavailable(Exception):
    """The job's dataset is gone (`status` None: deleted, or never the tenant's) or not ready."""

    def __init__(self, dataset_id: str, status: str | None) -> None:
        super().__init__(f"dataset {dataset_id} is {status or 'gone'}")
        self.dataset_id = dataset_id
        self.status = status


def create_job_if_allowed(
    session: Session, *, tenant_id: str, max_active_jobs: int, dataset_id: str | None = None, **fields: Any
) -> Job:
    """`create_job`, but only while the tenant has fewer than `max_active_jobs` queued or running
    jobs (0 = no cap) and the dataset, if any, is still the tenant's and ready; else raises
    `TooManyActiveJobs` or `DatasetUnavailable`.

    The checks and the insert hold the tenant's lock (`store.keys.lock_tenant`) until the caller
    commits: a burst of submits is counted one after another, and a dataset delete
    (`store.datasets.delete_unused_dataset`, same lock) either ran before and the dataset is gone,
    or runs after and sees this job.
    """
    lock_tenant(session, tenant_id)
    if max_active_jobs and count_active_jobs(session, tenant_id) >= max_active_jobs:
        raise TooManyActiveJobs(max_active_jobs)
    if dataset_id is not None:
        status = session.scalar(
            select(Dataset.status).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
        )
        if status != DatasetStatus.READY:
            raise DatasetUnavailable(dataset_id, status)
    return create_job(session, tenant_id=tenant_id, dataset_id=dataset_id, **fields)


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
    dataset_uri: str | None = None
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
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    ).all())


def oldest_queued_at(session: Session) -> datetime | None:
    """When the oldest queued job was created, across tenants (for
    metrics); None when none is queued."""
    return session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))


def tenant_job_status(session: Session, tenant_id: str, job_id: str) -> str | None:
    """The status of the tenant's job, or None when the tenant has no job
    of that id (or it was deleted)."""
    return session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant_id == tenant_id))


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
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
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
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """True when the job was cancelled or no longer exists (either way: stop working on it)."""
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)
