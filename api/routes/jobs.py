"""Job submission, reading, listing, cancellation and events.

Routes are `async def`: reads go through the reader (see api.deps), writes hand their store work to the
thread pool in one call, and responses are validated on the event loop (a plain `def` route would pay two
thread hand-offs per request and hold its connection while waiting for the second).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import BrokerDep, ReaderDep, SessionDep, SettingsDep, TenantDep, require_json_body
from api.errors import ApiError, error_responses, not_found
from api.job_submission import submit_job
from api.schemas import EventPage, JobCreate, JobOut, JobPage, JobStatus
from store.jobs import (
    add_event,
    get_tenant_job,
    list_events,
    list_jobs,
    read_job_record,
    request_cancel,
)
from store.models import Job, JobEvent
from store.pagination import InvalidCursor, Page
from store.resources import event_resource, job_resource

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = error_responses(404, 409, 503)
SUBMIT_ERRORS = error_responses(400, 404, 409, 415, 503)
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200,
           description="Same key + same body returns the first job (200); a different body answers 409."),
]


@router.post("", status_code=202, response_model=JobOut, summary="Submit a distillation job",
             dependencies=[Depends(require_json_body)],
             responses={200: {"model": JobOut, "description": "Replay of an earlier request with this key."},
                        **SUBMIT_ERRORS})
async def submit(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep,
                 broker: BrokerDep, tenant: TenantDep, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Validate the spec and the data now (422 for anything that cannot run) and queue the job."""
    submission = await run_in_threadpool(submit_job, session, settings, broker, tenant, body, idempotency_key)
    if not submission.created:
        response.status_code = 200
    return job_resource(submission.job, settings)


@router.get("", response_model=JobPage, responses=ERRORS, summary="List jobs, newest first")
async def read_jobs(
    reader: ReaderDep,
    settings: SettingsDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    limit = min(limit or settings.page_size_default, settings.page_size_max)
    try:
        page: Page[Job] = await reader.run(list_jobs, tenant.id, status=status, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise ApiError(422, "invalid_cursor", str(exc), {"field": "cursor"}) from None
    return {"items": [job_resource(j, settings) for j in page.items], "next_cursor": page.next_cursor}


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="Read a job")
async def read_job(job_id: str, reader: ReaderDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    job = await reader.run(read_job_record, tenant.id, job_id)
    if job is None:
        raise not_found("job")
    return job_resource(job, settings)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=ERRORS,
             summary="Cancel a job (409 when it already finished)")
async def cancel(job_id: str, session: SessionDep, settings: SettingsDep, broker: BrokerDep,
                 tenant: TenantDep) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its worker's next check (seconds)."""
    job = await run_in_threadpool(_cancel_in_store, session, tenant.id, job_id)
    await run_in_threadpool(broker.revoke, job_id)
    return job_resource(job, settings)


def _cancel_in_store(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_tenant_job(session, tenant_id, job_id)
    if job is None:
        raise not_found("job")
    if job.is_finished or not request_cancel(session, job_id):
        raise ApiError(409, "job_finished", f"job is already {job.status}; only a queued or running job can be "
                       "cancelled", {"status": job.status})
    add_event(session, job_id, "cancel_requested", "cancellation requested")
    session.commit()
    job = get_tenant_job(session, tenant_id, job_id)
    assert job is not None
    return job


@router.get("/{job_id}/events", response_model=EventPage, responses=ERRORS,
            summary="Progress and log events, oldest first")
async def read_events(
    job_id: str,
    reader: ReaderDep,
    settings: SettingsDep,
    tenant: TenantDep,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="Return events with a larger id.")] = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    limit = min(limit or settings.page_size_max, settings.page_size_max)
    events = await reader.run(_events_of_tenant_job, tenant.id, job_id, after, limit)
    next_cursor = str(events[-1].id) if len(events) == limit else None
    return {"items": [event_resource(e) for e in events], "next_cursor": next_cursor}


def _events_of_tenant_job(session: Session, tenant_id: str, job_id: str, after: int | None,
                          limit: int) -> list[JobEvent]:
    if get_tenant_job(session, tenant_id, job_id) is None:
        raise not_found("job")
    return list_events(session, job_id, after=after, limit=limit)
