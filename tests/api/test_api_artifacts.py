"""Artifact downloads: checksums, ranges, conditional requests, registered names only."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from api_helpers import client, new_tenant, settings, tenant_id  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import create_job

PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def finished(settings: Settings, tmp_path_factory) -> dict:  # noqa: F811
    headers = new_tenant(settings)
    folder = tmp_path_factory.mktemp("artifacts")
    (folder / "report.json").write_bytes(PAYLOAD)
    (folder / "secret.txt").write_bytes(b"not registered")
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        mark_running(session, job.id, "w")
        register_artifact(session, job.id, "report.json", folder / "report.json")
        finish_job(session, job.id, "succeeded", metrics={})
    return {"headers": headers, "job_id": job.id}


def url(finished: dict, name: str = "report.json") -> str:
    return f"/v1/jobs/{finished['job_id']}/artifacts/{name}"


def test_job_lists_artifacts_with_urls(client: TestClient, finished: dict) -> None:  # noqa: F811
    job = client.get(f"/v1/jobs/{finished['job_id']}", headers=finished["headers"]).json()
    assert job["artifacts"] == [{
        "name": "report.json", "size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "media_type": "application/json", "url": url(finished),
    }]


def test_full_download_carries_checksums(client: TestClient, finished: dict) -> None:  # noqa: F811
    response = client.get(url(finished), headers=finished["headers"])
    assert response.status_code == 200 and response.content == PAYLOAD
    digest = hashlib.sha256(PAYLOAD)
    assert response.headers["content-length"] == str(len(PAYLOAD))
    assert response.headers["etag"] == f'"{digest.hexdigest()}"'
    assert response.headers["x-checksum-sha256"] == digest.hexdigest()
    assert response.headers["digest"] == "sha-256=" + base64.b64encode(digest.digest()).decode()
    assert response.headers["accept-ranges"] == "bytes"
    head = client.head(url(finished), headers=finished["headers"])
    assert head.status_code == 200 and head.headers["content-length"] == str(len(PAYLOAD)) and not head.content


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=100-199", 100, 199), ("bytes=299990-", 299_990, 299_999), ("bytes=-10", 299_990, 299_999),
    ("bytes=5-999999999", 5, 299_999),
])
def test_range_requests_answer_206(client: TestClient, finished: dict, header: str, start: int, end: int) -> None:  # noqa: F811
    response = client.get(url(finished), headers={**finished["headers"], "Range": header})
    assert response.status_code == 206
    assert response.content == PAYLOAD[start:end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(PAYLOAD)}"
    assert response.headers["content-length"] == str(end - start + 1)


def test_unsatisfiable_range_answers_416(client: TestClient, finished: dict) -> None:  # noqa: F811
    response = client.get(url(finished), headers={**finished["headers"], "Range": f"bytes={len(PAYLOAD)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(PAYLOAD)}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


def test_conditional_requests(client: TestClient, finished: dict) -> None:  # noqa: F811
    etag = f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    cached = client.get(url(finished), headers={**finished["headers"], "If-None-Match": etag})
    assert cached.status_code == 304 and not cached.content
    changed = client.get(url(finished), headers={**finished["headers"], "If-None-Match": '"other"'})
    assert changed.status_code == 200
    stale_resume = client.get(url(finished), headers={**finished["headers"], "Range": "bytes=0-9",
                                                      "If-Range": '"other"'})
    assert stale_resume.status_code == 200 and stale_resume.content == PAYLOAD


@pytest.mark.parametrize("name", ["secret.txt", "..%2Fsecret.txt", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "missing.png"])
def test_only_registered_names_are_served(client: TestClient, finished: dict, name: str) -> None:  # noqa: F811
    response = client.get(url(finished, name), headers=finished["headers"])
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
