"""Job submission, reading, listing, cancellation, deletion and events
(a JSON page or a live SSE stream).

Routes are `async def`: reads go through the reader (see api.deps), writes hand their store work to
the thread pool in one call, and responses are validated on the event loop (a plain `def` route
would pay two thread hand-offs per request and hold its connection while waiting for the second).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import BrokerDep, ReaderDep, SessionDep, SettingsDep, TenantDep, require_json_body
from api.errors import ApiError, error_responses, not_found
from api.event_stream import EVENT_STREAM, JobEventStream, can_stream, wants_event_stream
from api.job_submission import submit_job
from api.schemas import EventPage, JobCreate, JobOut, JobPage
from api.storage_errors import DELETE_PENDING_RESPONSE, deletion_pending
from fd2_config.settings import Settings
from store.job_files import remove_job_files
from store.job_states import request_cancel
from store.jobs import (
    JobStillActive,
    add_event,
    delete_finished_job,
    get_tenant_job,
    list_events,
    list_jobs,
    read_job_record,
)
from store.models import EventKind, Job, JobEvent, JobStatus
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


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={**ERRORS, **DELETE_PENDING_RESPONSE},
               summary="Delete a finished job with its artifacts, events and work folder (409 while active)")
async def remove_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The job is removed whole: its row, events and artifact rows at once (a later GET answers 404
    and lists no longer show it), then its artifact files and work folder; the bytes leave the
    tenant's storage quota. A queued or running job answers 409 `job_active`: cancel it first and
    delete it once it is `cancelled`. 202 instead of 204 when the disk (read-only) kept the files:
    the storage sweep removes the job's folder later."""
    if not await run_in_threadpool(_delete_finished, session, settings, tenant.id, job_id):
        return deletion_pending(job_id, "job")
    return Response(status_code=204)


def job_active(status: str) -> ApiError:
    """409 for deleting a queued or running job (its wording is turned into commands by
    `fd2-client`)."""
    return ApiError(409, "job_active", f"job is {status}; cancel it (POST /v1/jobs/{{id}}/cancel) and delete it "
                    "once it has ended", {"status": status})


def _delete_finished(session: Session, settings: Settings, tenant_id: str, job_id: str) -> bool:
    try:
        artifact_paths = delete_finished_job(session, tenant_id, job_id)
    except JobStillActive as exc:
        raise job_active(exc.status) from None
    if artifact_paths is None:
        raise not_found("job")
    session.commit()
    return remove_job_files(settings, job_id, artifact_paths)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=ERRORS,
             summary="Cancel a job (409 when it already finished)")
async def cancel(job_id: str, session: SessionDep, settings: SettingsDep, broker: BrokerDep,
                 tenant: TenantDep) -> dict[str, Any]:
    """A queued job is cancelled at once;
    a running one stops at its worker's next check (seconds)."""
    job = await run_in_threadpool(_cancel_in_store, session, tenant.id, job_id)
    await run_in_threadpool(broker.revoke, job_id)
    return job_resource(job, settings)


def _cancel_in_store(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_tenant_job(session, tenant_id, job_id)
    if job is None:
        raise not_found("job")
    if job.is_finished or not request_cancel(session, job_id):
        raise ApiError(409, "job_finished", f"job has already {job.status}; only a queued or running job can be "
                       "cancelled", {"status": job.status})
    add_event(session, job_id, EventKind.CANCEL_REQUESTED, "cancellation requested")
    session.commit()
    job = get_tenant_job(session, tenant_id, job_id)
    assert job is not None
    return job


EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The events as a JSON page, or with `Accept: text/event-stream` as a live stream "
        "(over HTTP/1.1 or later; HTTP/1.0 has no chunked encoding, so it gets the JSON page).",
        "content": {EVENT_STREAM: {
            "schema": {"type": "string"},
            "description": "Server-sent events: per stored event `id:` (its id), `event:` (its kind) and `data:` "
            "(the event as JSON, an item of the JSON list); `: ping` comments while idle; once the job is "
            "finished and its events are sent, `event: end` with `data: {\"job_id\", \"status\"}` and the "
            "stream closes.",
        }},
    },
    **ERRORS,
}


@router.get("/{job_id}/events", response_model=EventPage, responses=EVENTS_RESPONSES,
            summary="Progress and log events, oldest first (JSON page or live server-sent events)")
async def read_events(
    job_id: str,
    request: Request,
    reader: ReaderDep,
    settings: SettingsDep,
    tenant: TenantDep,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="Return events with a larger id.")] = None,
    limit: Annotated[int | None, Query(ge=1, description="Most events in a JSON page (not used by a stream).")] = None,
    last_event_id: Annotated[int | None, Header(
        alias="Last-Event-ID", ge=0, le=2**63 - 1,
        description="Resume after this event id (what an EventSource sends when it reconnects); takes the place "
        "of `after`, since a reconnecting client repeats the original URL.")] = None,
) -> Any:
    """With `Accept: text/event-stream` the same events as a live server-sent-events stream that
    ends with `event: end` once the job is finished; otherwise, and for an HTTP/1.0 client (no
    chunked encoding, see `can_stream`), one JSON page (`next_cursor` is the `after` of the
    next)."""
    if last_event_id is not None:
        after = last_event_id
    http_version = request.scope.get("http_version", "1.1")
    if wants_event_stream(request.headers.get("accept")) and can_stream(http_version):
        # 404 as JSON, before the stream starts
        await reader.run(_require_tenant_job, tenant.id, job_id)
        return JobEventStream(settings, tenant.id, job_id, after).response()
    limit = min(limit or settings.page_size_max, settings.page_size_max)
    events = await reader.run(_events_of_tenant_job, tenant.id, job_id, after, limit)
    next_cursor = str(events[-1].id) if len(events) == limit else None
    return {"items": [event_resource(e) for e in events], "next_cursor": next_cursor}


def _require_tenant_job(session: Session, tenant_id: str, job_id: str) -> None:
    if read_job_record(session, tenant_id, job_id) is None:
        raise not_found("job")


def _events_of_tenant_job(session: Session, tenant_id: str, job_id: str, after: int | None,
                          limit: int) -> list[JobEvent]:
    if get_tenant_job(session, tenant_id, job_id) is None:
        raise not_found("job")
    return list_events(session, job_id, after=after, limit=limit)
