"""The Python SDK (`clients/python`, import name `fd2_client`) against the real embedded service.

A folder is uploaded, a tiny job submitted, followed to its end and every artifact downloaded and verified.
Conditions the service cannot show on cue (429 with `Retry-After`, 503, an answer lost after the job was made,
a download or event stream cut half-way, an event stream at all while the service offers only polling) come
from `tests/support/http_stub.py`: a local server that answers by script or forwards to the real service.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_service import FAST_SPEC, JOB_TIMEOUT_S, SLOW_SPEC, dataset_folder, service  # noqa: F401 (fixtures)
from http_stub import CUT, Reply, Seen, StubServer, error_reply, forward_to, json_reply
from service_harness import REPO_ROOT, free_port, wait_until

from fd2_client import (
    ApiError,
    ChecksumMismatch,
    Client,
    Conflict,
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    NotFound,
    Progress,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)

FAST_RETRIES = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=2.0)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(service) -> Any:  # noqa: F811
    with Client(service.url, service.key, timeout=60) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def finished(client, dataset_folder) -> dict[str, Any]:  # noqa: F811
    """One folder uploaded and one tiny job followed to its end, with everything the callbacks saw."""
    sent: list[tuple[int, int | None]] = []
    dataset = client.upload_dataset(dataset_folder, "birds", on_progress=lambda done, total: sent.append((done, total)))
    job = client.submit(dataset, FAST_SPEC)
    updates: list[Progress] = []
    final = client.wait(job, on_progress=updates.append, timeout=JOB_TIMEOUT_S)
    return {"dataset": dataset, "submitted": job, "job": final, "sent": sent, "updates": updates}


# ---------------------------------------------------------------- the whole path on the real service


@pytest.mark.service
def test_upload_zips_the_folder_streams_it_with_progress_and_answers_the_ready_dataset(finished):
    dataset, sent = finished["dataset"], finished["sent"]
    assert dataset["status"] == "ready" and dataset["name"] == "birds"
    assert dataset["num_classes"] == 4 and dataset["splits"] == {"train": 64, "test": 24}
    totals = {total for _, total in sent}
    assert len(totals) == 1 and (total := totals.pop()) and total > 0
    done = [d for d, _ in sent]
    assert done == sorted(done) and done[-1] == total and len(done) > 1


@pytest.mark.service
def test_wait_follows_every_stage_and_answers_the_succeeded_job(finished):
    job, updates = finished["job"], finished["updates"]
    assert job["status"] == "succeeded" and job["id"] == finished["submitted"]["id"]
    assert {"pretrain", "distill", "relabel", "package"} <= {u.stage for u in updates}
    assert updates[-1].finished and updates[-1].status == "succeeded"
    event_ids = [u.event["id"] for u in updates if u.event is not None]
    assert event_ids == sorted(set(event_ids)), "every event reported once, oldest first"


@pytest.mark.service
def test_download_all_writes_every_artifact_verified_and_leaves_no_part_file(client, finished, tmp_path):
    job = finished["job"]
    seen: dict[str, int] = {}
    paths = client.download_all(job["id"], tmp_path / "out", on_progress=lambda n, done, _: seen.update({n: done}))
    assert set(paths) == {a["name"] for a in job["artifacts"]} >= {"distilled.tar.gz", "soft_labels.safetensors"}
    for artifact in job["artifacts"]:
        path = paths[artifact["name"]]
        assert path == tmp_path / "out" / artifact["name"]
        assert sha256_of(path) == artifact["sha256"] and path.stat().st_size == artifact["size"]
        assert seen[artifact["name"]] == artifact["size"]
    assert not list((tmp_path / "out").glob("*.part"))


@pytest.mark.service
def test_wait_reads_the_services_event_stream_without_polling(service, client, finished):  # noqa: F811
    job = client.submit(finished["dataset"], FAST_SPEC)
    with StubServer(forward_to(service.url)) as proxy, Client(proxy.url, service.key) as through_proxy:
        updates: list[Progress] = []
        final = through_proxy.wait(job, on_progress=updates.append, timeout=JOB_TIMEOUT_S)
    assert final["status"] == "succeeded"
    event_requests = [r for r in proxy.requests if "/events" in r.path]
    if event_requests and "after=" in event_requests[-1].path:
        pytest.skip("this service answers the events route without a stream: wait polled")
    assert len(event_requests) == 1 and event_requests[0].headers["accept"] == "text/event-stream"
    assert {"pretrain", "distill", "relabel", "package"} <= {u.stage for u in updates}
    assert updates[-1].status == "succeeded"


def _largest(job: dict[str, Any]) -> dict[str, Any]:
    return max(job["artifacts"], key=lambda a: a["size"])


def _reference_bytes(client: Client, job: dict[str, Any], name: str, folder: Path) -> bytes:
    return client.download(job, name, folder / "reference").read_bytes()


@pytest.mark.service
def test_a_partial_download_is_resumed_with_range_and_verified(service, client, finished, tmp_path):  # noqa: F811
    job = finished["job"]
    artifact = _largest(job)
    data = _reference_bytes(client, job, artifact["name"], tmp_path)
    half = len(data) // 2
    dest = tmp_path / artifact["name"]
    dest.with_name(dest.name + ".part").write_bytes(data[:half])

    statuses: list[int] = []
    upstream = forward_to(service.url)

    def record(seen: Seen) -> Reply:
        reply = upstream(seen)
        statuses.append(reply.status)
        return reply

    with StubServer(record) as proxy, Client(proxy.url, service.key) as through_proxy:
        path = through_proxy.download(job, artifact["name"], dest)
    downloads = [r for r in proxy.requests if "/artifacts/" in r.path]
    assert len(downloads) == 1
    assert downloads[0].headers["range"] == f"bytes={half}-"
    assert downloads[0].headers["if-range"] == f'"{artifact["sha256"]}"'
    assert statuses[-1] == 206
    assert path == dest and sha256_of(dest) == artifact["sha256"]
    assert not dest.with_name(dest.name + ".part").exists()


@pytest.mark.service
def test_a_download_cut_half_way_goes_on_from_where_it_stopped(service, client, finished, tmp_path):  # noqa: F811
    job = finished["job"]
    artifact = _largest(job)
    upstream = forward_to(service.url)
    cut_at = artifact["size"] // 2

    def cut_first_download(seen: Seen) -> Reply:
        reply = upstream(seen)
        if "/artifacts/" in seen.path and len([r for r in proxy.requests if "/artifacts/" in r.path]) == 1:
            reply.cut_after = cut_at
        return reply

    with StubServer(cut_first_download) as proxy, Client(proxy.url, service.key, retry=FAST_RETRIES) as sdk:
        path = sdk.download(job, artifact["name"], tmp_path)
    ranges = [r.headers.get("range") for r in proxy.requests if "/artifacts/" in r.path]
    assert ranges == [None, f"bytes={cut_at}-"]
    assert sha256_of(path) == artifact["sha256"]


@pytest.mark.service
def test_a_checksum_mismatch_raises_and_leaves_no_file(client, finished, tmp_path):
    job = finished["job"]
    artifact = _largest(job)
    dest = tmp_path / artifact["name"]
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(b"\0" * (artifact["size"] // 2))  # a corrupt prefix: the rest is fetched and appended

    with pytest.raises(ChecksumMismatch) as raised:
        client.download(job, artifact["name"], dest)
    assert raised.value.expected == artifact["sha256"] and raised.value.actual != artifact["sha256"]
    assert not dest.exists() and not part.exists()


@pytest.mark.service
def test_a_submit_whose_answer_was_lost_is_retried_and_makes_one_job(service, tmp_path):  # noqa: F811
    key = service.new_key("idempotent-retry")
    with Client(service.url, key) as direct:
        dataset = direct.upload_dataset(_small_zip(tmp_path), "small")
    upstream = forward_to(service.url)

    def lose_first_submit_answer(seen: Seen) -> Reply:
        reply = upstream(seen)  # the service makes the job ...
        if seen.method == "POST" and seen.path == "/v1/jobs" and len(proxy.paths("POST")) == 1:
            return CUT  # ... but its answer never arrives
        return reply

    with StubServer(lose_first_submit_answer) as proxy, Client(proxy.url, key, retry=FAST_RETRIES) as sdk:
        job = sdk.submit(dataset["id"], SLOW_SPEC)
    submits = [r for r in proxy.requests if r.method == "POST"]
    assert len(submits) == 2
    assert submits[0].headers["idempotency-key"] == submits[1].headers["idempotency-key"]
    with Client(service.url, key) as direct:
        assert [j["id"] for j in direct.iter_jobs()] == [job["id"]]
        _cancel_quietly(direct, job["id"])


@pytest.mark.service
def test_the_same_idempotency_key_returns_the_first_job_and_another_body_conflicts(client, finished):
    dataset = finished["dataset"]
    first = client.submit(dataset, SLOW_SPEC, idempotency_key="sdk-test-key-1")
    try:
        again = client.submit(dataset["id"], SLOW_SPEC, idempotency_key="sdk-test-key-1")
        assert again["id"] == first["id"]
        with pytest.raises(Conflict) as raised:
            client.submit(dataset, {**SLOW_SPEC, "seed": 7}, idempotency_key="sdk-test-key-1")
        assert raised.value.status == 409 and raised.value.code == "idempotency_conflict"
    finally:
        _cancel_quietly(client, first["id"])


@pytest.mark.service
def test_refusals_become_typed_errors_with_code_message_details_and_status(service, client, finished):  # noqa: F811
    with pytest.raises(NotFound) as missing:
        client.get_job("job_" + "0" * 32)
    assert (missing.value.status, missing.value.code) == (404, "not_found") and "job" in missing.value.message
    with pytest.raises(NotFound):
        client.get_dataset("ds_" + "0" * 32)

    with pytest.raises(Conflict) as finished_already:
        client.cancel(finished["job"])
    assert finished_already.value.status == 409 and finished_already.value.code == "job_finished"
    assert finished_already.value.details == {"status": "succeeded"}

    with pytest.raises(ValidationFailed) as unrunnable:
        client.submit(finished["dataset"], {**FAST_SPEC, "ipc": 1000})
    assert unrunnable.value.status == 422 and unrunnable.value.details

    with Client(service.url, "fd2_not-a-key") as stranger, pytest.raises(Unauthorized) as refused:
        stranger.get_job(finished["job"])
    assert refused.value.status == 401 and refused.value.code == "unauthorized"


@pytest.mark.service
def test_listing_follows_next_cursor_through_every_page(service, tmp_path):  # noqa: F811
    key = service.new_key("pages")
    with Client(service.url, key) as sdk:
        first = sdk.upload_dataset(_small_zip(tmp_path), "first")
        second = sdk.upload_dataset(_small_zip(tmp_path, seed=1), "second")
        jobs = [sdk.submit(first, SLOW_SPEC), sdk.submit(second, SLOW_SPEC)]
        for job in jobs:
            _cancel_quietly(sdk, job["id"])
        datasets = [d["id"] for d in sdk.iter_datasets(page_size=1)]
        assert len(datasets) == 2 and set(datasets) == {first["id"], second["id"]}
        listed = [j["id"] for j in sdk.iter_jobs(page_size=1)]
        assert len(listed) == 2 and set(listed) == {j["id"] for j in jobs}
        assert {j["id"] for j in sdk.iter_jobs(status="cancelled", page_size=1)} <= set(listed)


@pytest.mark.service
def test_wait_raises_job_cancelled_carrying_the_job(client, finished):
    job = client.submit(finished["dataset"], SLOW_SPEC)
    wait_until(lambda: client.get_job(job)["status"] != "queued", JOB_TIMEOUT_S, what="the job to start")
    client.cancel(job)
    with pytest.raises(JobCancelled) as raised:
        client.wait(job, timeout=JOB_TIMEOUT_S)
    assert raised.value.job["id"] == job["id"] and raised.value.job["status"] == "cancelled"


@pytest.mark.service
def test_delete_removes_a_finished_job_and_refuses_an_active_one(client, finished):
    active = client.submit(finished["dataset"], SLOW_SPEC)
    try:
        with pytest.raises(Conflict) as refused:
            client.delete(active)
        assert refused.value.status == 409
    except ApiError as exc:
        if exc.status == 405:
            pytest.skip("this service has no DELETE /v1/jobs/{id} yet")
        raise
    finally:
        _cancel_quietly(client, active["id"])
    done = client.submit(finished["dataset"], FAST_SPEC)
    client.wait(done, timeout=JOB_TIMEOUT_S)
    client.delete(done)
    try:  # the contract says the artifacts and work folder go; the record may go too
        assert client.get_job(done)["artifacts"] == []
    except NotFound:
        pass


def _cancel_quietly(client: Client, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except Conflict:
        pass  # it finished already


def _small_zip(folder: Path, seed: int = 0) -> Path:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=3, image_size=32, train_per_class=6, test_per_class=2, seed=seed)
    return fgsynth.write_zip(data, folder / f"small-{seed}.zip")


# ---------------------------------------------------------------- retries (local stub server)


def _job(status: str = "running", **fields: Any) -> dict[str, Any]:
    return {"id": "job_x", "status": status, "stage": None, "progress": 0.0, "stage_progress": 0.0,
            "eta_seconds": None, "error": None, "artifacts": [], **fields}


def test_429_is_retried_after_the_retry_after_seconds():
    answers = iter([error_reply(429, "rate_limited", "slow down", {"Retry-After": "1"})])
    with StubServer(lambda seen: next(answers, json_reply(200, _job()))) as stub, Client(stub.url, "k") as sdk:
        started = time.monotonic()
        job = sdk.get_job("job_x")
        waited = time.monotonic() - started
    assert job["id"] == "job_x" and len(stub.requests) == 2
    assert waited >= 1.0


def test_503_is_retried_for_reads_and_a_refused_upload_is_not_sent_twice(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    unavailable = error_reply(503, "database_unavailable", "down", {"Retry-After": "0"})
    answers = {"GET": iter([unavailable]), "POST": iter([unavailable])}
    with StubServer(lambda seen: next(answers[seen.method], json_reply(200, _job()))) as stub, \
            Client(stub.url, "k", retry=FAST_RETRIES) as sdk:
        assert sdk.get_job("job_x")["id"] == "job_x"
        with pytest.raises(ServiceUnavailable) as raised:
            sdk.upload_dataset(archive)
    assert raised.value.retry_after == 0 and raised.value.code == "database_unavailable"
    assert stub.paths("GET") == ["/v1/jobs/job_x"] * 2
    assert stub.paths("POST") == ["/v1/datasets"], "an upload is not idempotent: one try only"


def test_an_upload_refused_with_429_is_sent_again(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    answers = iter([error_reply(429, "too_many_uploads", "wait", {"Retry-After": "0"})])
    with StubServer(lambda seen: next(answers, json_reply(201, {"id": "ds_x", "status": "ready"}))) as stub, \
            Client(stub.url, "k", retry=FAST_RETRIES) as sdk:
        assert sdk.upload_dataset(archive, "x")["id"] == "ds_x"
    bodies = [r.body for r in stub.requests]
    assert len(bodies) == 2 and all(b"PK\x05\x06" + b"\0" * 18 in body for body in bodies)


def test_retries_give_up_with_a_typed_error():
    always = error_reply(503, "broker_unavailable", "down", {"Retry-After": "0"})
    with StubServer(lambda seen: always) as stub, Client(stub.url, "k", retry=FAST_RETRIES) as sdk:
        with pytest.raises(ServiceUnavailable):
            sdk.get_job("job_x")
    assert len(stub.requests) == FAST_RETRIES.attempts
    with Client(f"http://127.0.0.1:{free_port()}", "k", retry=FAST_RETRIES) as nobody, \
            pytest.raises(ConnectionFailed):
        nobody.get_job("job_x")
    with StubServer(lambda seen: Reply(429, {"Retry-After": "0"}, b"not json")) as stub, \
            Client(stub.url, "k", retry=FAST_RETRIES) as sdk, pytest.raises(RateLimited) as raised:
        next(sdk.iter_jobs())
    assert raised.value.code == "too_many_requests" and raised.value.status == 429


# ---------------------------------------------------------------- following events (local stub server)


def _sse(*events: dict[str, Any], end: bool = False) -> list[bytes]:
    chunks = [f"id: {e['id']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
    chunks.insert(0, b": keep-alive\n\n")
    return chunks + ([b"event: end\ndata: {}\n\n"] if end else [])


def _event(event_id: int, kind: str, stage: str | None = None, progress: float = 0.0, **data: Any) -> dict:
    return {"id": event_id, "kind": kind, "stage": stage, "progress": progress, "message": f"{kind} {stage}",
            "data": data or None, "created_at": "2025-01-01T00:00:00Z"}


def test_wait_reads_the_event_stream_and_resumes_it_from_last_event_id():
    streams = iter([
        _sse(_event(1, "stage_start", "pretrain"), _event(2, "progress", "pretrain", 0.1, stage_progress=0.5)),
        _sse(_event(2, "progress", "pretrain", 0.1), _event(3, "stage_start", "distill", 0.2),
             _event(4, "succeeded", progress=1.0), end=True),
    ])
    state = {"status": "running"}

    def serve(seen: Seen) -> Reply:
        if seen.path.startswith("/v1/jobs/job_x/events"):
            assert seen.headers["accept"] == "text/event-stream"
            chunks = next(streams)
            if chunks[-1].startswith(b"event: end"):
                state["status"] = "succeeded"
            return Reply(200, {"Content-Type": "text/event-stream"}, chunks)
        return json_reply(200, _job(state["status"]))

    updates: list[Progress] = []
    with StubServer(serve) as stub, Client(stub.url, "k", poll_interval=0.05) as sdk:
        job = sdk.wait("job_x", on_progress=updates.append, timeout=30)
    assert job["status"] == "succeeded"
    streams_opened = [r for r in stub.requests if "/events" in r.path]
    assert [r.headers.get("last-event-id") for r in streams_opened] == [None, "2"]
    assert [u.event["id"] for u in updates if u.event] == [1, 2, 3, 4]
    evented = [u for u in updates if u.event]
    assert [u.stage for u in evented] == ["pretrain", "pretrain", "distill", "distill"]
    assert [u.stage_progress for u in evented[:3]] == [0.0, 0.5, 0.0] and evented[-1].status == "succeeded"


def test_wait_polls_when_the_service_answers_json_and_raises_job_failed_with_its_error():
    error = {"code": "out_of_memory", "message": "the GPU ran out of memory"}
    rounds = {"jobs": 0}

    def serve(seen: Seen) -> Reply:
        if seen.path.startswith("/v1/jobs/job_x/events"):
            if seen.headers.get("accept") == "text/event-stream":
                return error_reply(406, "not_acceptable", "no streams here")
            after = int(seen.path.partition("after=")[2] or 0)
            events = [_event(1, "stage_start", "pretrain"), _event(2, "failed", "pretrain", 0.3)]
            shown = events if rounds["jobs"] >= 3 else events[:1]
            return json_reply(200, {"items": [e for e in shown if e["id"] > after], "next_cursor": None})
        rounds["jobs"] += 1
        failed = rounds["jobs"] > 3
        return json_reply(200, _job("failed" if failed else "running", error=error if failed else None))

    updates: list[Progress] = []
    with StubServer(serve) as stub, Client(stub.url, "k", poll_interval=0.05) as sdk:
        with pytest.raises(JobFailed) as raised:
            sdk.wait("job_x", on_progress=updates.append, timeout=30)
    assert (raised.value.code, raised.value.message) == ("out_of_memory", "the GPU ran out of memory")
    assert raised.value.job["status"] == "failed"
    polled = [r.path for r in stub.requests if "/events" in r.path and "accept" in r.headers
              and r.headers["accept"] != "text/event-stream"]
    assert polled[0] == "/v1/jobs/job_x/events" and any("after=1" in p for p in polled)
    assert [u.event["id"] for u in updates if u.event] == [1, 2]


# ---------------------------------------------------------------- the package alone


def test_the_sdk_and_its_command_import_without_torch_or_the_service():
    """Runs with torch (and every package of the service) made unimportable, as after `pip install
    ./clients/python` on a machine without them."""
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "torchvision", "fd2_core", "fd2_config", "api", "store", "worker", "fd2_cli",
                     "fastapi", "sqlalchemy", "celery", "numpy", "PIL"):
            sys.modules[name] = None
        import fd2_client, fd2_client.cli
        from fd2_client import Client
        assert fd2_client.cli.build_parser().parse_args(["ls", "jobs"]).what == "jobs"
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy") and sys.modules[m]))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "clients" / "python",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def test_wait_gives_up_at_its_timeout_also_on_a_lively_stream():
    def serve(seen: Seen) -> Reply:
        if "/events" in seen.path:
            ticks = (f"id: {i}\ndata: {json.dumps(_event(i, 'progress', 'distill', 0.5))}\n\n".encode()
                     for i in range(1, 10_000))
            return Reply(200, {"Content-Type": "text/event-stream"}, (_slowly(tick) for tick in ticks))
        return json_reply(200, _job("running"))

    with StubServer(serve) as stub, Client(stub.url, "k") as sdk:
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as raised:
            sdk.wait("job_x", timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert raised.value.job["status"] == "running" and isinstance(raised.value, TimeoutError)


def _slowly(chunk: bytes) -> bytes:
    time.sleep(0.05)
    return chunk


def test_every_error_status_has_its_type_and_a_bare_answer_still_gives_one():
    from fd2_client import Gone, ServerError
    from fd2_client.errors import error_from_response

    def answer(status: int, body: bytes, content_type: str = "application/json") -> Any:
        return error_from_response(httpx.Response(status, content=body, headers={"Content-Type": content_type}))

    body = {"error": {"code": "artifacts_expired", "message": "gone", "details": {}}}
    expired = answer(410, json.dumps(body).encode())
    assert isinstance(expired, Gone)
    assert (expired.code, expired.message, expired.status, expired.details) == ("artifacts_expired", "gone", 410, {})
    bare = answer(502, b"<html>bad gateway</html>", "text/html")
    assert type(bare) is ServerError and (bare.code, bare.status) == ("bad_gateway", 502)


def test_the_url_is_checked_at_once_and_a_trailing_v1_is_dropped():
    for wrong in ("127.0.0.1:8765", "localhost:8000", "ftp://host", "http://:8000", ""):
        with pytest.raises(ValueError):
            Client(wrong, "k")
    for given in ("http://host:8000/v1", "http://host:8000/v1/", "http://host:8000/"):
        with Client(given, "k") as sdk:
            assert sdk.transport.url == "http://host:8000"
    with Client("https://host/fd2/v1", "k") as sdk:
        assert sdk.transport.url == "https://host/fd2"


def test_on_retry_hears_of_each_retry_before_its_wait():
    answers = iter([error_reply(429, "rate_limited", "slow down", {"Retry-After": "0"}),
                    error_reply(503, "broker_unavailable", "down", {"Retry-After": "0"})])
    heard: list[tuple[str, float, int]] = []
    with StubServer(lambda seen: next(answers, json_reply(200, _job()))) as stub, \
            Client(stub.url, "k", retry=FAST_RETRIES,
                   on_retry=lambda exc, wait_s, attempt: heard.append((exc.code, wait_s, attempt))) as sdk:
        assert sdk.get_job("job_x")["id"] == "job_x"
    assert heard == [("rate_limited", 0.0, 1), ("broker_unavailable", 0.0, 2)]
