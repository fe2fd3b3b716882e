"""Artifact downloads: only names registered for the tenant's job exist (no paths, no traversal)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.artifact_download import artifact_response
from api.deps import ReaderDep, TenantDep
from api.errors import ApiError, error_responses, not_found
from store.artifacts import get_tenant_artifact

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


@router.head("/{job_id}/artifacts/{name}", response_class=Response, include_in_schema=False)
@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=Response,
    summary="Download an artifact (Range, ETag = sha256, Digest)",
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial content."},
               304: {"description": "Not modified (If-None-Match)."},
               **error_responses(404, 410, 412, 416)},
)
async def download_artifact(job_id: str, name: str, request: Request, reader: ReaderDep,
                            tenant: TenantDep) -> Response:
    """410 `artifacts_expired` once the operator's retention period removed the job's files (the
    job resource then says `artifacts_expired: true`); 412 `precondition_failed` when `If-Match`
    names no current ETag. A gone file answers 404 even under `If-Match` (RFC 9110 13.2.1: a
    failure found before the preconditions wins)."""
    artifact = await reader.run(get_tenant_artifact, tenant.id, job_id, name)
    if artifact is None:
        raise not_found("artifact")
    expired_at = artifact.job.artifacts_expired_at
    if expired_at is not None:
        raise ApiError(410, "artifacts_expired", f"the artifacts of job {job_id} were removed after the operator's "
                       "retention period; submit the job again to produce them",
                       {"expired_at": expired_at})
    return artifact_response(request, artifact)
