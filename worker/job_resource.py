"""The job resource of the REST contract, built from a job row for the completion callback.

The worker may not import the API, so the callback body is assembled here from the same row with the same
fields as `GET /v1/jobs/{id}` (`api.presenters.job_resource`); a test compares the two.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session

from store.artifacts import list_artifacts
from store.models import Job
from store.settings import Settings


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def artifact_url(settings: Settings, job_id: str, name: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/v1/jobs/{job_id}/artifacts/{quote(name)}"


def job_resource(session: Session, job: Job, settings: Settings) -> dict[str, Any]:
    """`{"id", "status", "stage", "progress", …, "artifacts": [...]}` exactly as the contract names them."""
    artifacts = [
        {
            "name": artifact.name,
            "size": artifact.size,
            "sha256": artifact.sha256,
            "media_type": artifact.media_type,
            "url": artifact_url(settings, job.id, artifact.name),
        }
        for artifact in list_artifacts(session, job.id)
    ]
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "stage_progress": job.stage_progress,
        "eta_seconds": job.eta_seconds,
        "spec": job.spec,
        "dataset_id": job.dataset_id,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        "metrics": job.metrics or {},
        "artifacts": artifacts,
        "cancel_requested": job.cancel_requested,
    }
