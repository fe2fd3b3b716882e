"""The public JSON shapes of datasets, jobs and events (docs/INTERFACES.md), built from rows.

The one definition of each resource shape, here because the worker's job-end callbacks need the job resource
and the worker never imports the API: the API's responses and the callbacks send the very same job resource.
`api.schemas` (`JobOut`, `ArtifactOut`, `DatasetOut`, `EventOut`) only documents these shapes in OpenAPI; a
test checks that each model has exactly the keys built here. Built from already-loaded rows: presenting a job
never triggers another query.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.jobs import JobRecord, read_job_record
from store.models import Dataset, Job, JobEvent


def artifact_url(settings: Settings, job_id: str, name: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/v1/jobs/{job_id}/artifacts/{quote(name)}"


def job_resource(job: Job | JobRecord, settings: Settings) -> dict[str, Any]:
    """The job resource with datetime values (the API's response model renders them)."""
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "stage_progress": job.stage_progress,
        "eta_seconds": job.eta_seconds,
        "spec": job.spec,
        "dataset_id": job.dataset_id,
        # Tells a deleted dataset (dataset_id null, source "upload") from data given as a manifest or
        # by an s3:// reference.
        "dataset_source": "uri" if job.dataset_uri else "manifest" if job.manifest_path else "upload",
        "dataset_uri": job.dataset_uri,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "metrics": job.metrics or {},
        "artifacts": [
            {
                "name": a.name,
                "size": a.size,
                "sha256": a.sha256,
                "media_type": a.media_type,
                "url": artifact_url(settings, job.id, a.name),
            }
            for a in job.artifacts
        ],
        "cancel_requested": job.cancel_requested,
        "artifacts_expired": job.artifacts_expired_at is not None,
        # The shards of a job spread over several workers (spec max_workers > 1); null for a one-worker job.
        "shards": job.shards,
    }


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 with a `Z`, exactly as the API renders timestamps."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def job_resource_json(session: Session, settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The job resource as plain JSON values (for callbacks), or None for an unknown job."""
    record = read_job_record(session, None, job_id)
    if record is None:
        return None
    resource = job_resource(record, settings)
    for key in ("created_at", "started_at", "finished_at"):
        resource[key] = iso_utc(resource[key])
    return resource


def dataset_resource(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "name": dataset.name,
        "status": dataset.status,
        "num_classes": dataset.num_classes,
        "classes": dataset.classes,
        "splits": dataset.splits,
        "per_class": dataset.per_class,
        "errors": dataset.errors,
        "warnings": dataset.warnings or [],
        "duplicates": dataset.duplicates or {},
        "test_split": dataset.test_split or {},
        "size_bytes": dataset.size_bytes,
        "created_at": dataset.created_at,
    }


def event_resource(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "created_at": event.created_at,
        "kind": event.kind,
        "stage": event.stage,
        "progress": event.progress,
        "message": event.message,
        "data": event.data,
    }
