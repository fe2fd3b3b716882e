"""Job events as a live server-sent-events stream:
the JSON list's events, resumable, ending with the job."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

# settings is a fixture
from api_helpers import new_tenant, running_client, settings, tenant_id  # noqa: F401
from fastapi.testclient import TestClient
from service_harness import embedded_settings, free_port, service_env, start_child, wait_until

from api.event_stream import JobEventStream
from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import add_event, create_job, delete_finished_job

SSE = {"Accept": "text/event-stream"}
# a stream that never ends fails the test instead of hanging the run
pytestmark = pytest.mark.timeout(120)


@dataclass
class Message:
    """One parsed SSE block: an event (`event`, `id`, `data`) or a comment (heartbeat)."""

    event: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)
    comment: str | None = None

    @property
    def json(self) -> dict:
        return json.loads("\n".join(self.data))


def messages(lines: Iterator[str]) -> Iterator[Message]:
    """SSE blocks as they arrive (the text/event-stream format: fields until a blank line)."""
    current = Message()
    for line in lines:
        if line == "":
            if current != Message():
                yield current
            current = Message()
        elif line.startswith(":"):
            current.comment = line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                current.data.append(value)
            elif name in ("event", "id"):
                setattr(current, name, value)


def events_until_end(client: TestClient, path: str, headers: dict[str, str]) -> list[Message]:
    """Every event of a stream, heartbeats left out, up to and including `end`
    (which must close it)."""
    received: list[Message] = []
    with client.stream("GET", path, headers={**headers, **SSE}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in messages(response.iter_lines()):
            if message.comment is None:
                received.append(message)
    assert received and received[-1].event == "end", received
    return received


@pytest.fixture(scope="module")
def stream_settings(settings: Settings) -> Settings:  # noqa: F811
    """Polls and heartbeats every few milliseconds, so live tests see them without waiting."""
    return settings.model_copy(update={"event_stream_poll_s": 0.02, "event_stream_ping_s": 0.05})


@pytest.fixture(scope="module")
def client(stream_settings: Settings) -> Iterator[TestClient]:
    with running_client(stream_settings) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def tenant(stream_settings: Settings) -> dict[str, str]:
    return new_tenant(stream_settings)


def new_job(settings: Settings, headers: dict[str, str], *, events: int, status: str | None) -> str:  # noqa: F811
    """A job with `events` progress events, left queued, running, or finished with `status`."""
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        if status is not None:
            mark_running(session, job.id, "w")
        for index in range(events):
            add_event(session, job.id, "progress", f"step {index}", stage="pretrain", progress=index / 10)
        if status not in (None, "running"):
            finish_job(session, job.id, status)
            add_event(session, job.id, status, f"job {status}")
        return job.id


def test_a_finished_job_streams_every_event_of_the_list_then_ends(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=3, status="succeeded")
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=tenant).json()["items"]
    streamed = events_until_end(client, f"/v1/jobs/{job_id}/events", tenant)
    *events, end = streamed
    assert [m.json for m in events] == listed
    assert [m.id for m in events] == [str(item["id"]) for item in listed]
    assert [m.event for m in events] == [item["kind"] for item in listed] == ["progress"] * 3 + ["succeeded"]
    assert end.id is None and end.json == {"job_id": job_id, "status": "succeeded"}


def test_json_stays_the_default(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=1, status="failed")
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**tenant, "Accept": "application/json"})
    assert response.headers["content-type"].startswith("application/json")
    assert [item["kind"] for item in response.json()["items"]] == ["progress", "failed"]


def test_last_event_id_resumes_after_that_event(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=4, status="cancelled")
    ids = [m.id for m in events_until_end(client, f"/v1/jobs/{job_id}/events", tenant)[:-1]]
    resumed = events_until_end(client, f"/v1/jobs/{job_id}/events", {**tenant, "Last-Event-ID": ids[1]})
    assert [m.id for m in resumed[:-1]] == ids[2:]
    # A reconnecting EventSource repeats its original URL: Last-Event-ID wins over `after`.
    both = events_until_end(client, f"/v1/jobs/{job_id}/events?after={ids[0]}", {**tenant, "Last-Event-ID": ids[3]})
    assert [m.id for m in both[:-1]] == ids[4:]
    after = events_until_end(client, f"/v1/jobs/{job_id}/events?after={ids[2]}", tenant)
    assert [m.id for m in after[:-1]] == ids[3:]
    last = events_until_end(client, f"/v1/jobs/{job_id}/events", {**tenant, "Last-Event-ID": ids[-1]})
    assert [m.event for m in last] == ["end"] and last[0].json["status"] == "cancelled"


def test_a_running_job_streams_new_events_live_and_ends_with_it(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=1, status="running")
    seen: list[Message] = []
    heartbeats = 0
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={**tenant, **SSE}) as response:
        assert response.status_code == 200
        for message in messages(response.iter_lines()):
            if message.comment is not None:
                heartbeats += 1
                # the job is idle: heartbeats keep the stream open; now it moves on
                if heartbeats == 1:
                    with session_scope(stream_settings) as session:
                        add_event(session, job_id, "stage_start", "distill", stage="distill", progress=0.5)
                continue
            seen.append(message)
            if message.event == "stage_start":
                with session_scope(stream_settings) as session:
                    finish_job(session, job_id, "succeeded", metrics={})
                    add_event(session, job_id, "succeeded", "job succeeded")
    assert heartbeats >= 1
    assert [m.event for m in seen] == ["progress", "stage_start", "succeeded", "end"]
    assert seen[-1].json == {"job_id": job_id, "status": "succeeded"}
    listed = client.get(f"/v1/jobs/{job_id}/events", headers=tenant).json()["items"]
    assert [m.json for m in seen[:-1]] == listed


def test_a_queued_job_stream_ends_when_it_is_cancelled(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=0, status=None)
    seen: list[Message] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={**tenant, **SSE}) as response:
        for message in messages(response.iter_lines()):
            if message.comment is not None and not seen:
                seen.append(message)
                assert client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant).status_code == 202
            elif message.comment is None:
                seen.append(message)
    assert [m.event for m in seen[1:]] == ["cancel_requested", "end"]
    assert seen[-1].json["status"] == "cancelled"


def test_other_tenants_and_unknown_jobs_answer_404_before_any_stream(client, stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=2, status="succeeded")
    intruder = new_tenant(stream_settings)
    for headers, path in [(intruder, f"/v1/jobs/{job_id}/events"), (tenant, "/v1/jobs/job_unknown/events")]:
        response = client.get(path, headers={**headers, **SSE})
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "not_found"
    response = client.get(f"/v1/jobs/{job_id}/events", headers=SSE)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_a_malformed_last_event_id_answers_422(client, stream_settings, tenant, value: str) -> None:
    job_id = new_job(stream_settings, tenant, events=0, status="succeeded")
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**tenant, **SSE, "Last-Event-ID": value})
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


def test_a_stream_whose_job_is_deleted_meanwhile_ends_with_status_deleted(stream_settings, tenant) -> None:
    job_id = new_job(stream_settings, tenant, events=1, status="succeeded")
    with session_scope(stream_settings) as session:
        delete_finished_job(session, tenant_id(stream_settings, tenant), job_id)

    async def collect() -> list[dict]:
        stream = JobEventStream(stream_settings, tenant_id(stream_settings, tenant), job_id, None)
        return [item async for item in stream.events()]

    [end] = anyio.run(collect)
    assert end["event"] == "end" and json.loads(end["data"]) == {"job_id": job_id, "status": "deleted"}


@pytest.mark.service
def test_the_stream_over_real_http_from_uvicorn(tmp_path) -> None:
    """The same stream from a real `uvicorn api.main:app` process over a socket: chunks arrive as
    written, heartbeats flow while the job is idle, and a reconnect with Last-Event-ID resumes."""
    port = free_port()
    env = service_env({"FD2_HOME": str(tmp_path), "FD2_EVENT_STREAM_POLL_S": "0.05",
                       "FD2_EVENT_STREAM_PING_S": "0.1"})
    api = start_child("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                              f"--port={port}"], env, tmp_path / "logs")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(base), 60, what="/readyz")
        local = embedded_settings(tmp_path)
        headers = new_tenant(local)
        job_id = new_job(local, headers, events=1, status="running")
        seen: list[Message] = []
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers={**headers, **SSE}, timeout=30) as response:
            assert response.status_code == 200
            for message in messages(response.iter_lines()):
                if message.comment is not None:
                    if len(seen) == 1:  # idle and still open: the job ends now
                        with session_scope(local) as session:
                            finish_job(session, job_id, "failed", error={"code": "x", "message": "boom"})
                            add_event(session, job_id, "failed", "job failed: boom")
                    continue
                seen.append(message)
        assert [m.event for m in seen] == ["progress", "failed", "end"]
        resumed = httpx.get(f"{base}/v1/jobs/{job_id}/events", timeout=30,
                            headers={**headers, **SSE, "Last-Event-ID": seen[0].id or ""})
        assert [m.event for m in messages(iter(resumed.text.splitlines())) if m.comment is None] == ["failed", "end"]
    finally:
        api.stop()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
