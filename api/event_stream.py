"""A job's events as a live server-sent-events stream (`Accept:
text/event-stream` on the events route).

Each stored event goes out as one SSE event: `id:` the event id (what a
reconnecting client sends back as `Last-Event-ID`), `event:` its kind,
`data:` the event as JSON, exactly an item of the JSON list.
The stream polls the database every `event_stream_poll_s` in the thread pool (the store is
synchronous; the event loop never waits on it) and, once the job is finished and every event written
until then is out, sends `event: end` with `{"job_id", "status"}` and closes: a client that saw
`end` knows the stream ended normally and reconnecting would add nothing.
A job deleted while its stream is open ends it with status `deleted`.
The status is read before the events in each poll, so the events of a job
seen finished are all there.
Events written after the end (e.g. the outcome of a callback) are in the JSON list.

Framing, heartbeat comments (`: ping`, every `event_stream_ping_s`, so proxies keep an idle stream
open) and client disconnects are sse-starlette's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.schemas import EventOut
from fd2_config.settings import Settings
from store.db import get_sessionmaker
from store.jobs import list_events, tenant_job_status
from store.models import FINISHED_JOB_STATUSES, JobEvent
from store.resources import event_resource

EVENT_STREAM = "text/event-stream"
END_EVENT = "end"
DELETED_STATUS = "deleted"
SEPARATOR = "\n"


def can_stream(http_version: str) -> bool:
    """False for HTTP/1.0 (and 0.9), which have no chunked encoding: such a client gets the JSON
    list instead.

    A live stream has no length, so uvicorn's default parser (httptools) frames it chunked, which a
    1.0 client cannot read. The JSON list is a complete answer it can poll with `?after=` (the SDK
    polls when a stream request answers JSON); a 505 would refuse a request we can answer, and is
    meant for an unsupported major version. h11's close-delimited bodies cost CPU on every poll.
    """
    return http_version not in ("1.0", "0.9")


def wants_event_stream(accept: str | None) -> bool:
    """True when the Accept header names text/event-stream (with a non-zero weight)."""
    for part in (accept or "").split(","):
        media_type, *params = (piece.strip() for piece in part.split(";"))
        if media_type.lower() != EVENT_STREAM:
            continue
        weights = [p.split("=", 1)[1] for p in params if p.lower().startswith("q=") and "=" in p]
        try:
            return not weights or float(weights[0]) > 0
        except ValueError:
            return True
    return False


@dataclass(frozen=True)
class StreamBatch:
    status: str | None  # None: the job is gone (deleted meanwhile)
    events: list[JobEvent]


def read_batch(session: Session, tenant_id: str, job_id: str, after: int | None, limit: int) -> StreamBatch:
    """The job's status, then up to `limit` events after `after` (in that
    order; see the module docstring)."""
    status = tenant_job_status(session, tenant_id, job_id)
    if status is None:
        return StreamBatch(None, [])
    return StreamBatch(status, list_events(session, job_id, after=after, limit=limit))


def event_json(event: JobEvent) -> str:
    """The event as the JSON list renders it (the same model, the same timestamps)."""
    return EventOut.model_validate(event_resource(event)).model_dump_json()


def sse_event(event: JobEvent) -> dict[str, Any]:
    return {"id": str(event.id), "event": event.kind, "data": event_json(event)}


def end_event(job_id: str, status: str) -> dict[str, Any]:
    return {"event": END_EVENT, "data": json.dumps({"job_id": job_id, "status": status}, separators=(",", ":"))}


class JobEventStream:
    """The events of one tenant's job after `after`, live until the job is finished."""

    def __init__(self, settings: Settings, tenant_id: str, job_id: str, after: int | None) -> None:
        self.settings, self.tenant_id, self.job_id, self.after = settings, tenant_id, job_id, after
        self.batch_size = settings.page_size_max

    def _read(self) -> StreamBatch:
        with get_sessionmaker(self.settings.database_url)() as session:
            return read_batch(session, self.tenant_id, self.job_id, self.after, self.batch_size)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            batch = await run_in_threadpool(self._read)
            for event in batch.events:
                yield sse_event(event)
                self.after = event.id
            if batch.status is None:
                yield end_event(self.job_id, DELETED_STATUS)
                return
            if batch.status in FINISHED_JOB_STATUSES and len(batch.events) < self.batch_size:
                yield end_event(self.job_id, batch.status)
                return
            # a full batch: more are waiting, read on at once
            if len(batch.events) < self.batch_size:
                await anyio.sleep(self.settings.event_stream_poll_s)

    def response(self) -> EventSourceResponse:
        response = EventSourceResponse(self.events(), ping=self.settings.event_stream_ping_s, sep=SEPARATOR,
                                       headers={"Cache-Control": "no-store"})
        # `Connection` is hop-by-hop and the server's to set (keep-alive is HTTP/1.1's default; uvicorn
        # adds `close` when the client asked for it): the library's fixed `keep-alive` would make a
        # second, contradicting header
        del response.headers["connection"]
        return response
