"""Completion callbacks: host allow-list, one attempt, retries with backoff (worker.callbacks)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.callbacks import (
    CallbackFailed,
    CallbackRejected,
    backoff_delays,
    host_allowed,
    post_job_resource,
)


class Receiver:
    """A real HTTP server answering with the queued status codes (then 200) and keeping the
    bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fd2"


@pytest.fixture
def receiver_factory() -> Iterator:
    started: list[Receiver] = []

    def start(statuses: list[int]) -> Receiver:
        receiver = Receiver(statuses)
        receiver.thread.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.mark.parametrize(
    ("url", "allowed", "expected"),
    [
        ("https://hooks.example.com/x", ["hooks.example.com"], True),
        ("https://HOOKS.example.com:8443/x", ["hooks.example.com:8443"], True),
        ("https://a.b.example.com/x", [".example.com"], True),
        ("https://example.com.evil.net/x", [".example.com"], False),
        ("https://evil.net/x", ["hooks.example.com"], False),
        ("ftp://hooks.example.com/x", ["hooks.example.com"], False),
        ("https://hooks.example.com/x", [], False),
        ("not a url", ["hooks.example.com"], False),
    ],
)
def test_host_allow_list(url: str, allowed: list[str], expected: bool):
    assert host_allowed(url, allowed) is expected


def test_post_delivers_the_resource_as_json(receiver_factory):
    receiver = receiver_factory([202])
    resource = {"id": "job_1", "status": "succeeded", "metrics": {"student_accuracy": 0.5}}
    assert post_job_resource(receiver.url, resource, ["127.0.0.1"]) == 202
    assert receiver.bodies == [resource]


def test_host_off_the_list_is_never_contacted(receiver_factory):
    receiver = receiver_factory([])
    with pytest.raises(CallbackRejected):
        post_job_resource(receiver.url, {"id": "job_1"}, ["hooks.example.com"])
    assert receiver.bodies == []


def test_server_errors_are_retryable_and_client_errors_are_not(receiver_factory):
    receiver = receiver_factory([503, 404])
    with pytest.raises(CallbackFailed):
        post_job_resource(receiver.url, {"id": "job_1"}, ["127.0.0.1"])
    with pytest.raises(CallbackRejected):
        post_job_resource(receiver.url, {"id": "job_1"}, ["127.0.0.1"])


def test_unreachable_host_is_retryable():
    with pytest.raises(CallbackFailed):
        post_job_resource("http://127.0.0.1:9/closed", {"id": "job_1"}, ["127.0.0.1"], timeout_s=2)


def test_backoff_grows_and_is_capped():
    delays = backoff_delays(8, base_s=1.0, cap_s=10.0)
    assert len(delays) == 7
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert delays[0] == 1.0 and max(delays) == 10.0


# ---------------------------------------------------------------- delivery of a finished job


@pytest.fixture
def settings(tmp_path):
    from service_harness import embedded_settings

    from store.db import dispose_engines, migrate

    settings = embedded_settings(tmp_path / "home", callback_allow_hosts=["127.0.0.1"])
    migrate(settings)
    yield settings
    dispose_engines()


def finished_job_with_callback(settings, url: str) -> str:
    from service_harness import seed_job

    from store.db import session_scope
    from store.job_states import finish_job, mark_running

    job_id = seed_job(settings, {"device": "cpu"}, callback_url=url)
    with session_scope(settings) as session:
        mark_running(session, job_id, "host:1")
        finish_job(session, job_id, "succeeded", metrics={"student_accuracy": 0.5})
    return job_id


def callback_events(settings, job_id: str) -> list:
    from store.db import session_scope
    from store.jobs import list_events

    with session_scope(settings) as session:
        return [event for event in list_events(session, job_id) if event.kind == "callback"]


def test_a_flaky_receiver_gets_the_job_resource_after_retries(settings, receiver_factory):
    from worker.callbacks import deliver_callback

    receiver = receiver_factory([503, 502])
    job_id = finished_job_with_callback(settings, receiver.url)
    waits: list[float] = []
    assert deliver_callback(job_id, settings, attempts=4, sleep=waits.append) is True
    assert len(receiver.bodies) == 3 and len(waits) == 2 and waits[1] > waits[0]
    body = receiver.bodies[-1]
    assert (body["id"], body["status"], body["metrics"]) == (job_id, "succeeded", {"student_accuracy": 0.5})
    [event] = callback_events(settings, job_id)
    assert event.data["delivered"] is True


def test_a_host_off_the_allow_list_is_recorded_and_not_contacted(settings, receiver_factory):
    from worker.callbacks import deliver_callback

    receiver = receiver_factory([])
    job_id = finished_job_with_callback(settings, receiver.url.replace("127.0.0.1", "localhost"))
    assert deliver_callback(job_id, settings, sleep=lambda _s: None) is False
    assert receiver.bodies == []
    [event] = callback_events(settings, job_id)
    assert event.data["delivered"] is False and "allow-list" in event.message


def test_the_callback_body_matches_the_api_job_resource(settings):
    """The callback body (built in `store`, which the worker can import) must say what GET
    /v1/jobs/{id} says."""
    from pydantic import TypeAdapter

    from api.schemas import JobOut
    from store.artifacts import register_artifact
    from store.db import session_scope
    from store.jobs import get_job, get_tenant_job
    from store.resources import job_resource as api_job_resource
    from store.resources import job_resource_json

    job_id = finished_job_with_callback(settings, "http://127.0.0.1:1/x")
    artifact = settings.home / "report.json"
    artifact.write_text("{}")
    with session_scope(settings) as session:
        register_artifact(session, job_id, "report.json", artifact)
    with session_scope(settings) as session:
        ours = job_resource_json(session, settings, job_id)
        tenant_id = get_job(session, job_id).tenant_id
        theirs = api_job_resource(get_tenant_job(session, tenant_id, job_id), settings)
    as_sent_by_api = TypeAdapter(JobOut).dump_python(TypeAdapter(JobOut).validate_python(theirs), mode="json")
    assert json.loads(json.dumps(ours)) == as_sent_by_api
