"""Follow a job's events until it ends: a server-sent-events stream when the service offers one, else polling.

`GET /v1/jobs/{id}/events` with `Accept: text/event-stream` streams each event as `id: <event id>` +
`data: <event JSON>` and closes with `event: end` once the job is finished. A stream that breaks is opened
again from the last event seen (`Last-Event-ID`); when the service answers JSON or 406 instead of a stream,
or the stream keeps breaking, the watcher polls `?after=<last event id>` and the job resource every
`poll_interval` seconds instead. Either way no event is reported twice and none is skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from fd2_client.errors import ApiError, ConnectionFailed
from fd2_client.resources import Event, Job, Progress
from fd2_client.transport import Transport

SSE_IDLE_TIMEOUT_S = 60.0  # a stream silent this long is opened again (not counted as broken)
MAX_STREAM_BREAKS = 3  # breaks in a row without a new event before the watcher falls back to polling
RECONNECT_WAIT_S = 1.0  # pause before opening a broken stream again (unless the stream said `retry:`)
EVENT_STREAM = "text/event-stream"


class StreamUnavailable(Exception):
    """The service answered the event request without a stream (JSON, 406): poll instead."""


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


def poll_events(transport: Transport, job_id: str, after: int | None) -> list[Event]:
    """All events with an id above `after`, oldest first, through every page."""
    events: list[Event] = []
    while True:
        params = {} if after is None else {"after": after}
        page = transport.request("GET", events_path(job_id), params=params).json()
        events += page["items"]
        cursor = page.get("next_cursor")
        if not cursor or not page["items"]:
            return events
        after = int(cursor)


class JobWatcher:
    """Progress updates of one job until it ends; `last_event_id` lets a caller (or a second pass) go on.

    `deadline` is a `time.monotonic()` value; `updates()` raises `TimeoutError` once it passes.
    """

    def __init__(self, transport: Transport, job: Job, *, poll_interval: float = 1.0, use_stream: bool = True,
                 deadline: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.transport = transport
        self.job_id = job["id"]
        self.progress = Progress.of_job(job)
        self.poll_interval = poll_interval
        self.streaming = use_stream
        self.deadline = deadline
        self.clock = clock
        self.sleep = sleep
        self.last_event_id: int | None = None
        self._ended = False
        self._breaks = 0
        self._reconnect_wait_s = RECONNECT_WAIT_S

    def updates(self) -> Iterator[Progress]:
        """Each change of progress, ending once the job's final state was seen or the stream said `end`; the
        caller then reads the job (and calls `resume` with it should it not be finished after all)."""
        while not (self.progress.finished or self._ended):
            self._check_deadline()
            if self.streaming:
                yield from self._stream_once()
            else:
                yield from self._poll_once()

    def resume(self, job: Job) -> None:
        """Go on after `updates` ended while `job` is not finished (a stream closed early by the service)."""
        self.progress = Progress.of_job(job)
        self._ended = False
        self._count_break()

    # ---------------------------------------------------------------- server-sent events

    def _stream_once(self) -> Iterator[Progress]:
        """One connection's events; a break is counted and, past `MAX_STREAM_BREAKS`, polling takes over."""
        try:
            for event in self._stream_events():
                self._breaks = 0
                yield from self._take(event)
                if self.progress.finished:
                    return
                self._check_deadline()  # a lively stream would otherwise outlast the deadline
            self._ended = True  # `event: end`: the job has finished
        except (StreamUnavailable, ConnectionFailed):
            self.streaming = False  # polling goes on (and raises ConnectionFailed itself if the service is gone)
        except httpx.ReadTimeout:
            return  # a quiet stream: open it again
        except httpx.TransportError:
            self._count_break()

    def _count_break(self) -> None:
        self._breaks += 1
        if self._breaks >= MAX_STREAM_BREAKS:
            self.streaming = False
        else:
            self.sleep(self._reconnect_wait_s)

    def _stream_events(self) -> Iterator[Event]:
        headers = {"Accept": EVENT_STREAM, "Cache-Control": "no-store"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        read_s = SSE_IDLE_TIMEOUT_S if self.deadline is None else max(0.1, min(SSE_IDLE_TIMEOUT_S, self._left()))
        timeout = httpx.Timeout(self.transport.http.timeout.connect or 30.0, read=read_s)
        try:
            with self.transport.stream("GET", events_path(self.job_id), headers=headers, timeout=timeout) as response:
                try:
                    for sse in EventSource(response).iter_sse():
                        if sse.retry is not None:
                            self._reconnect_wait_s = sse.retry / 1000
                        if sse.event == "end":
                            return
                        if sse.data:
                            yield _event_of(sse.data, sse.id)
                except SSEError:
                    raise StreamUnavailable from None
            raise httpx.RemoteProtocolError("the event stream closed without `event: end`")
        except ApiError as exc:
            if exc.status in (406, 415):
                raise StreamUnavailable from None
            raise

    # ---------------------------------------------------------------- polling

    def _poll_once(self) -> Iterator[Progress]:
        for event in poll_events(self.transport, self.job_id, self.last_event_id):
            yield from self._take(event)
        job: Job = self.transport.request("GET", f"/v1/jobs/{self.job_id}").json()
        latest = Progress.of_job(job)
        if _moved(self.progress, latest):
            self.progress = latest
            yield latest
        if not self.progress.finished:
            self.sleep(max(0.0, min(self.poll_interval, self._left())))

    # ---------------------------------------------------------------- shared

    def _take(self, event: Event) -> Iterator[Progress]:
        event_id = event.get("id")
        if event_id is not None and self.last_event_id is not None and int(event_id) <= self.last_event_id:
            return  # already reported (a resumed stream may repeat the last one)
        if event_id is not None:
            self.last_event_id = int(event_id)
        self.progress = self.progress.after_event(event)
        yield self.progress

    def _left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def _check_deadline(self) -> None:
        if self._left() <= 0:
            raise TimeoutError(f"job {self.job_id} is still {self.progress.status}")


def _event_of(data: str, sse_id: str) -> Event:
    event: dict[str, Any] = json.loads(data)
    if "id" not in event and sse_id.isdigit():
        event["id"] = int(sse_id)
    return event  # type: ignore[return-value]


def _moved(before: Progress, after: Progress) -> bool:
    keys = ("status", "stage", "progress", "stage_progress", "eta_seconds")
    return any(getattr(before, k) != getattr(after, k) for k in keys)
