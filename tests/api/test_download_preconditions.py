"""Artifact downloads: If-Match preconditions (RFC 9110) and downloads racing a job delete.

A download racing `DELETE /v1/jobs/{id}` has two windows: before the file is opened (the answer
must be 404) and after the headers are decided (the answer must be the whole promised body). The
in-process tests put the delete in each window deterministically by wrapping the route's
`artifact_response` and doing what the DELETE route does (rows, then files); a thread race hits a
window only by chance. The uvicorn test races real DELETEs against real downloads as well.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_helpers import client, new_tenant, settings, tenant_id  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from service_harness import api_ready, embedded_settings, free_port, service_env, start_child, wait_until
from starlette.requests import Request
from starlette.responses import Response

import api.routes.artifacts as artifacts_route
from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.db import session_scope
from store.job_files import remove_job_files
from store.job_states import finish_job, mark_running
from store.jobs import create_job, delete_finished_job
from store.models import Artifact as ArtifactRow

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks, so a stream outlives its headers
NAME = "blob.bin"


@dataclass(frozen=True)
class Artifact:
    settings: Settings
    headers: dict[str, str]
    job_id: str
    path: Path

    @property
    def url(self) -> str:
        return f"/v1/jobs/{self.job_id}/artifacts/{NAME}"

    @property
    def etag(self) -> str:
        return f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'


def finished_job(settings: Settings, headers: dict[str, str]) -> Artifact:  # noqa: F811
    """A succeeded job with one artifact inside its work folder (where DELETE removes files)."""
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        assert settings.jobs_dir is not None
        path = settings.jobs_dir / job.id / "artifacts" / NAME
        path.parent.mkdir(parents=True)
        path.write_bytes(PAYLOAD)
        mark_running(session, job.id, "w")
        register_artifact(session, job.id, NAME, path)
        finish_job(session, job.id, "succeeded", metrics={})
        return Artifact(settings, headers, job.id, path.resolve())


def delete_job(artifact: Artifact) -> None:
    """What `DELETE /v1/jobs/{id}` does: the rows in one transaction, then the files."""
    with session_scope(artifact.settings) as session:
        paths = delete_finished_job(session, tenant_id(artifact.settings, artifact.headers), artifact.job_id)
    assert paths is not None
    remove_job_files(artifact.settings, artifact.job_id, paths)
    assert not artifact.path.exists()


@pytest.fixture(scope="module")
def tenant(settings: Settings) -> dict[str, str]:  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def artifact(settings: Settings, tenant: dict[str, str]) -> Artifact:  # noqa: F811
    return finished_job(settings, tenant)


def get(client: TestClient, artifact: Artifact, *extra: tuple[str, str], method: str = "GET") -> httpx.Response:  # noqa: F811
    """A request with repeatable headers (a list of pairs: several If-Match lines are one list)."""
    headers = [*artifact.headers.items(), *extra]
    return client.request(method, artifact.url, headers=headers)


# ---------------------------------------------------------------- If-Match


@pytest.mark.parametrize("values", [
    ["ETAG"], ["*"], ['"other", ETAG'], ['"other"', "ETAG"], ['"a,b", ETAG'],
])
def test_a_matching_if_match_serves_the_file(client: TestClient, artifact: Artifact, values: list[str]) -> None:  # noqa: F811
    response = get(client, artifact, *(("If-Match", v.replace("ETAG", artifact.etag)) for v in values))
    assert response.status_code == 200 and response.content == PAYLOAD


@pytest.mark.parametrize("values", [
    ['"other"'], ["W/ETAG"], ['W/ETAG, "other"'], ["SHA"], ['"other"', '"more"'], ['""'],
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_if_match_naming_no_current_tag_answers_412(client: TestClient, artifact: Artifact,  # noqa: F811
                                                       values: list[str], method: str) -> None:
    """Strong comparison: a weak tag never matches, nor the bare sha256 (an entity-tag is
    quoted)."""
    sha = artifact.etag.strip('"')
    headers = [("If-Match", v.replace("ETAG", artifact.etag).replace("SHA", sha)) for v in values]
    response = get(client, artifact, *headers, method=method)
    assert response.status_code == 412
    assert response.headers["etag"] == artifact.etag
    if method == "GET":
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "precondition_failed" and error["details"] == {"etag": artifact.etag}
        assert "If-Match" in error["message"]
    else:
        assert not response.content


def test_if_match_comes_before_if_none_match_and_range(client: TestClient, artifact: Artifact) -> None:  # noqa: F811
    etag = artifact.etag
    assert get(client, artifact, ("If-Match", '"other"'), ("If-None-Match", etag)).status_code == 412
    assert get(client, artifact, ("If-Match", '"other"'), ("Range", "bytes=0-9")).status_code == 412
    assert get(client, artifact, ("If-Match", etag), ("If-None-Match", etag)).status_code == 304
    ranged = get(client, artifact, ("If-Match", etag), ("Range", "bytes=10-19"))
    assert ranged.status_code == 206 and ranged.content == PAYLOAD[10:20]
    beyond = get(client, artifact, ("If-Match", etag), ("Range", f"bytes={len(PAYLOAD)}-"))
    assert beyond.status_code == 416


@pytest.mark.parametrize(("if_range", "status"), [("ETAG", 206), ("W/ETAG", 200), ('"other"', 200),
                                                  ("Mon, 07 Dec 2026 10:00:00 GMT", 200)])
def test_if_range_still_decides_between_part_and_whole(client: TestClient, artifact: Artifact,  # noqa: F811
                                                       if_range: str, status: int) -> None:
    response = get(client, artifact, ("Range", "bytes=100-199"), ("If-Range", if_range.replace("ETAG", artifact.etag)),
                   ("If-Match", artifact.etag))
    assert response.status_code == status
    assert response.content == (PAYLOAD[100:200] if status == 206 else PAYLOAD)


@pytest.mark.parametrize("value", ["ETAG", "W/ETAG", "*", '"other", W/ETAG'])
def test_if_none_match_keeps_weak_comparison(client: TestClient, artifact: Artifact, value: str) -> None:  # noqa: F811
    response = get(client, artifact, ("If-None-Match", value.replace("ETAG", artifact.etag)))
    assert response.status_code == 304 and not response.content


def test_if_match_on_a_file_that_is_gone_answers_404(client: TestClient, settings: Settings,  # noqa: F811
                                                     tenant: dict[str, str]) -> None:
    """RFC 9110 13.2.1: a failure found before the preconditions (the file is gone) wins over
    412."""
    gone = finished_job(settings, tenant)
    gone.path.unlink()
    for value in ("*", gone.etag, '"other"'):
        response = get(client, gone, ("If-Match", value))
        assert response.status_code == 404 and response.json()["error"]["code"] == "artifact_missing"


def test_no_answer_leaves_the_file_open(client: TestClient, artifact: Artifact) -> None:  # noqa: F811
    """Every path (200, 206, 304, 412, 416, HEAD) closes the handle it opened."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd to list open files")
    etag = artifact.etag
    for extra in [(), (("Range", "bytes=0-9"),), (("If-None-Match", etag),), (("If-Match", '"x"'),),
                  (("Range", f"bytes={len(PAYLOAD)}-"),)]:
        get(client, artifact, *extra)
        get(client, artifact, *extra, method="HEAD")
    with client.stream("GET", artifact.url, headers=artifact.headers) as response:
        next(response.iter_bytes())  # the client leaves after the first chunk
    open_paths = set()
    for fd in os.listdir(fd_dir):
        try:
            open_paths.add(os.readlink(fd_dir / fd))
        except OSError:
            continue
    assert str(artifact.path) not in open_paths


# ---------------------------------------------------------------- a download racing a delete


@pytest.fixture
def delete_around_response(monkeypatch: pytest.MonkeyPatch) -> Callable[[Artifact, str], None]:
    """Deletes the job right before (`before`) or right after (`after`) the route builds its
    response."""

    def install(target: Artifact, when: str) -> None:
        real = artifacts_route.artifact_response

        def racing(request: Request, row: ArtifactRow) -> Response:
            if when == "before":
                delete_job(target)
                return real(request, row)
            response = real(request, row)
            delete_job(target)
            return response

        monkeypatch.setattr(artifacts_route, "artifact_response", racing)

    return install


def test_a_delete_before_the_open_answers_404(client: TestClient, settings: Settings,  # noqa: F811
                                              tenant: dict[str, str], delete_around_response) -> None:
    target = finished_job(settings, tenant)
    delete_around_response(target, "before")
    response = client.get(target.url, headers=target.headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "artifact_missing"


@pytest.mark.skipif(sys.platform == "win32", reason="an open file cannot be unlinked on Windows")
@pytest.mark.parametrize(("extra", "expected", "body"), [
    ({}, 200, PAYLOAD), ({"Range": "bytes=5-2097159"}, 206, PAYLOAD[5:2097160]),
])
def test_a_delete_after_the_headers_still_sends_the_whole_body(client: TestClient, settings: Settings,  # noqa: F811
                                                               tenant: dict[str, str], delete_around_response,
                                                               extra: dict[str, str], expected: int,
                                                               body: bytes) -> None:
    target = finished_job(settings, tenant)
    delete_around_response(target, "after")
    response = client.get(target.url, headers={**target.headers, **extra})
    assert response.status_code == expected
    assert int(response.headers["content-length"]) == len(response.content) == len(body)
    assert response.content == body
    assert client.get(target.url, headers=target.headers).status_code == 404  # the job is gone now


@dataclass
class Outcome:
    status: int | None = None
    advertised: int | None = None
    body: bytes = b""
    code: str | None = None
    failure: str | None = None


def download(base: str, artifact: Artifact) -> Outcome:
    outcome = Outcome()
    try:
        with httpx.stream("GET", base + artifact.url, headers=artifact.headers, timeout=30) as response:
            outcome.status = response.status_code
            outcome.advertised = int(response.headers.get("content-length", "-1"))
            outcome.body = response.read()
            if response.status_code == 404:
                outcome.code = response.json()["error"]["code"]
    except httpx.HTTPError as exc:  # a reset connection or a short body: the fault itself
        outcome.failure = f"{type(exc).__name__}: {exc}"
    return outcome


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    home = tmp_path_factory.mktemp("race")
    port = free_port()
    api = start_child("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                              f"--port={port}"], service_env({"FD2_HOME": str(home)}), home / "logs")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: api_ready(base), 60, what="/readyz")
        yield base, embedded_settings(home)
    finally:
        api.stop()


@pytest.mark.service
@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform == "win32", reason="an open file cannot be unlinked on Windows")
def test_real_downloads_racing_real_deletes_are_whole_or_404(server: tuple[str, Settings]) -> None:
    """Downloaders loop until they see the 404 while a DELETE lands at a random moment: every answer
    is the whole file of its advertised length, or a 404."""
    base, local = server
    headers = new_tenant(local)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    rng = random.Random(7)
    for _ in range(8):
        target = finished_job(local, headers)

        def downloader(target: Artifact = target) -> None:
            for _ in range(200):
                outcome = download(base, target)
                with lock:
                    outcomes.append(outcome)
                if outcome.status == 404:  # the job is gone for good: this downloader is done
                    return

        threads = [threading.Thread(target=downloader) for _ in range(3)]
        for thread in threads:
            thread.start()
        threading.Event().wait(rng.uniform(0.0, 0.15))
        assert httpx.delete(f"{base}/v1/jobs/{target.job_id}", headers=headers, timeout=30).status_code == 204
        for thread in threads:
            thread.join(120)
    bad = [o for o in outcomes
           if not (o.status == 404 and o.code in ("artifact_missing", "not_found"))
           and not (o.status == 200 and o.advertised == len(o.body) == len(PAYLOAD) and o.body == PAYLOAD)]
    assert not bad, [(o.status, o.advertised, len(o.body), o.code, o.failure) for o in bad[:5]]
    assert any(o.status == 200 for o in outcomes) and any(o.status == 404 for o in outcomes)
