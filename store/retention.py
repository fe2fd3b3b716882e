"""Artifact retention: the finished jobs whose artifacts are past the operator's retention period, and the mark
that says their files are gone (`Job.artifacts_expired_at`).

The worker's storage sweep (`worker.storage_sweep`) removes the files between these two calls, files first:
a crash in between leaves a job whose downloads answer `artifact_missing` until the next sweep finds it again
(it is still unmarked) and marks it, never a job marked expired whose files still fill the disk.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import FINISHED_JOB_STATUSES, Artifact, Job


@dataclass(frozen=True)
class ExpiringJob:
    """A finished job past retention with the registered paths of its artifact files."""

    id: str
    artifact_paths: list[str] = field(default_factory=list)


def jobs_past_retention(session: Session, finished_before: datetime, limit: int) -> list[ExpiringJob]:
    """Up to `limit` finished jobs, oldest first, that finished before `finished_before` and are not yet marked."""
    ids = list(session.scalars(
        select(Job.id)
        .where(Job.status.in_(FINISHED_JOB_STATUSES), Job.finished_at < finished_before,
               Job.artifacts_expired_at.is_(None))
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    ))
    paths: dict[str, list[str]] = {job_id: [] for job_id in ids}
    if ids:
        for job_id, path in session.execute(select(Artifact.job_id, Artifact.path).where(Artifact.job_id.in_(ids))):
            paths[job_id].append(path)
    return [ExpiringJob(job_id, paths[job_id]) for job_id in ids]


def mark_artifacts_expired(session: Session, job_ids: Collection[str], now: datetime) -> int:
    """Mark the finished jobs among `job_ids` as having lost their artifact files; returns how many were marked."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status.in_(FINISHED_JOB_STATUSES), Job.artifacts_expired_at.is_(None))
        .values(artifacts_expired_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)
