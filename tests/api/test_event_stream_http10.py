"""An HTTP/1.0 client asking for the event stream gets the JSON list, framed by Content-Length.

HTTP/1.0 has no chunked transfer encoding, and uvicorn's default parser (httptools) frames any body
of unknown length chunked; so the request goes over a raw socket to a real `uvicorn api.main:app`
(an HTTP client library would speak 1.1 or hide the framing).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_helpers import new_tenant, tenant_id
from service_harness import api_ready, embedded_settings, free_port, service_env, start_child, wait_until

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import add_event, create_job

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]
SOCKET_TIMEOUT_S = 20


@dataclass
class Server:
    base: str
    port: int
    settings: Settings
    headers: dict[str, str]


@dataclass
class RawResponse:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {self.headers}"
        return values[0] if values else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """uvicorn started as `fd2 serve` starts it (default HTTP implementation), on an embedded
    home."""
    home = tmp_path_factory.mktemp("http10")
    port = free_port()
    env = service_env({"FD2_HOME": str(home), "FD2_EVENT_STREAM_POLL_S": "0.05", "FD2_EVENT_STREAM_PING_S": "0.1"})
    api = start_child("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                              f"--port={port}"], env, Path(home) / "logs")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: api_ready(base), 60, what="/readyz")
        settings = embedded_settings(home)
        yield Server(base, port, settings, new_tenant(settings))
    finally:
        api.stop()


def new_job(server: Server, *, events: int, status: str | None) -> str:
    with session_scope(server.settings) as session:
        job = create_job(session, tenant_id=tenant_id(server.settings, server.headers), spec={"ipc": 1},
                         queue=GPU_QUEUE)
        mark_running(session, job.id, "w")
        for index in range(events):
            add_event(session, job.id, "progress", f"step {index}", stage="pretrain", progress=index / 10)
        if status is not None:
            finish_job(session, job.id, status)
            add_event(session, job.id, status, f"job {status}")
        return job.id


def raw_get(server: Server, path: str, version: str, headers: dict[str, str]) -> RawResponse:
    """One request as bytes on a socket, read until the server closes it; the framing checked by
    hand."""
    lines = [f"GET {path} HTTP/{version}", f"Host: 127.0.0.1:{server.port}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        received = b""
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while chunk := sock.recv(65536):
            received += chunk
            # heartbeats keep an endless stream busy: bound the whole read, not each recv
            assert time.monotonic() < deadline, f"the answer did not end: {received[:300]!r}"
    head, separator, body = received.partition(b"\r\n\r\n")
    assert separator, f"no end of headers in {received[:500]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), f"malformed header line {line!r}"
        parsed.append((name.lower(), value.strip()))
    return RawResponse(status_line, parsed, body)


def assert_well_formed_http10(response: RawResponse) -> None:
    """What an HTTP/1.0 client can read: no Transfer-Encoding at all, a body of exactly its
    Content-Length."""
    assert response.status_line.split(" ", 2)[0] in ("HTTP/1.0", "HTTP/1.1"), response.status_line
    assert response.header("transfer-encoding") is None, response.headers
    length = response.header("content-length")
    assert length is not None and int(length) == len(response.body), (length, len(response.body))


@pytest.mark.parametrize("status", ["succeeded", None])
def test_an_http10_stream_request_gets_the_json_list(server: Server, status: str | None) -> None:
    """A finished job (today: a chunked stream) and a running one (a stream that would not end)."""
    job_id = new_job(server, events=3, status=status)
    path = f"/v1/jobs/{job_id}/events"
    listed = httpx.get(f"{server.base}{path}", headers=server.headers, timeout=30).json()
    response = raw_get(server, path, "1.0", {**server.headers, "Accept": "text/event-stream"})
    assert response.status_line.split(" ", 2)[1] == "200", response.status_line
    assert_well_formed_http10(response)
    assert (response.header("content-type") or "").startswith("application/json")
    assert json.loads(response.body) == listed
    assert [item["kind"] for item in listed["items"]][:3] == ["progress"] * 3


def test_http10_resumes_with_last_event_id_and_errors_stay_json(server: Server) -> None:
    job_id = new_job(server, events=3, status="failed")
    path = f"/v1/jobs/{job_id}/events"
    items = httpx.get(f"{server.base}{path}", headers=server.headers, timeout=30).json()["items"]
    resumed = raw_get(server, path, "1.0", {**server.headers, "Accept": "text/event-stream",
                                            "Last-Event-ID": str(items[1]["id"])})
    assert_well_formed_http10(resumed)
    assert [item["id"] for item in json.loads(resumed.body)["items"]] == [item["id"] for item in items[2:]]
    unknown = raw_get(server, "/v1/jobs/job_unknown/events", "1.0", {**server.headers, "Accept": "text/event-stream"})
    assert unknown.status_line.split(" ", 2)[1] == "404"
    assert_well_formed_http10(unknown)
    assert json.loads(unknown.body)["error"]["code"] == "not_found"


def test_http11_still_streams(server: Server) -> None:
    """The same request over HTTP/1.1 stays a live stream, chunked, ending with `event: end`."""
    job_id = new_job(server, events=1, status="cancelled")
    response = raw_get(server, f"/v1/jobs/{job_id}/events", "1.1",
                       {**server.headers, "Accept": "text/event-stream"})
    assert response.status_line.split(" ", 2)[1] == "200"
    assert (response.header("content-type") or "").startswith("text/event-stream")
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("connection") == "close"  # the client's choice, said once
    assert b"event: end" in response.body
