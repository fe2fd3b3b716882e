"""DELETE /v1/jobs/{id}: a finished job goes whole (row, events, artifacts, work folder), an active
one answers 409, someone else's 404; what it kept leaves the tenant's storage quota."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    image_tree,
    new_tenant,
    running_client,
    settings,
    tenant_id,
    upload,
    zip_bytes,
)
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.datasets import tenant_storage_usage
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import add_event, create_job, delete_finished_job, job_workdir
from store.models import Artifact, JobEvent, utcnow
from worker.storage_sweep import LEFTOVER_GRACE, remove_leftover_folders


def job_with_artifacts(settings: Settings, headers: dict[str, str], *, status: str | None = "succeeded",  # noqa: F811
                       size: int = 1000) -> str:
    """A job whose `report.json` of `size` bytes lies in its work folder,
    as the worker leaves it."""
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        if status is None:
            return job.id
        mark_running(session, job.id, "w")
        artifacts = job_workdir(settings, job.id) / "artifacts"
        artifacts.mkdir(parents=True)
        (artifacts / "report.json").write_bytes(os.urandom(size))
        register_artifact(session, job.id, "report.json", artifacts / "report.json")
        if status != "running":
            finish_job(session, job.id, status)
        return job.id


def test_delete_removes_the_job_its_events_artifacts_and_folder(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    job_id = job_with_artifacts(settings, headers)
    with session_scope(settings) as session:
        add_event(session, job_id, "succeeded", "job succeeded")
    workdir = job_workdir(settings, job_id)
    assert client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=headers).status_code == 200

    response = client.delete(f"/v1/jobs/{job_id}", headers=headers)
    assert response.status_code == 204 and response.content == b""
    assert not workdir.exists()
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/artifacts/report.json"):
        answer = client.get(path, headers=headers)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", path
    assert job_id not in [job["id"] for job in client.get("/v1/jobs", headers=headers).json()["items"]]
    with session_scope(settings) as session:
        for table in (JobEvent, Artifact):
            assert session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id)) == 0
    again = client.delete(f"/v1/jobs/{job_id}", headers=headers)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_failed_and_cancelled_jobs_can_be_deleted(client: TestClient, settings: Settings, status: str) -> None:  # noqa: F811
    headers = new_tenant(settings)
    job_id = job_with_artifacts(settings, headers, status=status)
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404


def test_queued_and_running_jobs_answer_409_and_keep_everything(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    queued = job_with_artifacts(settings, headers, status=None)
    running = job_with_artifacts(settings, headers, status="running")
    for job_id, status in ((queued, "queued"), (running, "running")):
        response = client.delete(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "job_active" and error["details"] == {"status": status}
        assert "cancel" in error["message"]
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == status
    assert (job_workdir(settings, running) / "artifacts" / "report.json").is_file()
    # Cancelled, the queued job has ended and can go.
    assert client.post(f"/v1/jobs/{queued}/cancel", headers=headers).status_code == 202
    assert client.delete(f"/v1/jobs/{queued}", headers=headers).status_code == 204


def test_another_tenants_job_is_not_found_and_stays(client: TestClient, settings: Settings) -> None:  # noqa: F811
    owner, intruder = new_tenant(settings), new_tenant(settings)
    job_id = job_with_artifacts(settings, owner)
    for job in (job_id, "job_unknown", "not%20an%20id"):
        response = client.delete(f"/v1/jobs/{job}", headers=intruder)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}", headers=owner).status_code == 200
    assert (job_workdir(settings, job_id) / "artifacts" / "report.json").is_file()


def test_a_crash_between_rows_and_files_leaves_only_a_folder_the_sweep_removes(
    client: TestClient, settings: Settings  # noqa: F811
) -> None:
    headers = new_tenant(settings)
    job_id = job_with_artifacts(settings, headers)
    # the delete's transaction commits; the process dies before the files
    with session_scope(settings) as session:
        assert delete_finished_job(session, tenant_id(settings, headers), job_id) is not None
    workdir = job_workdir(settings, job_id)
    assert workdir.is_dir()
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 404
    kept = job_with_artifacts(settings, headers)
    # too young: may be a submission in flight
    assert workdir not in remove_leftover_folders(settings, utcnow())
    assert workdir.is_dir()
    removed = remove_leftover_folders(settings, utcnow() + LEFTOVER_GRACE + timedelta(minutes=1))
    assert workdir in removed and not workdir.exists()
    assert job_workdir(settings, kept).is_dir()  # a folder whose job exists is never a leftover


QUOTA = 1_000_000


@pytest.fixture(scope="module")
def quota_client(settings: Settings) -> Iterator[tuple[TestClient, Settings]]:  # noqa: F811
    limited = settings.model_copy(update={"max_tenant_storage_bytes": QUOTA})
    with running_client(limited) as test_client:
        yield test_client, limited


def test_artifacts_count_against_the_storage_quota_until_the_job_is_deleted(
    quota_client: tuple[TestClient, Settings]
) -> None:
    client, limited = quota_client  # noqa: F811
    headers = new_tenant(limited)
    archive = zip_bytes(image_tree({"wren": 3, "finch": 3}))
    job_id = job_with_artifacts(limited, headers, size=QUOTA - 10)
    with session_scope(limited) as session:
        usage = tenant_storage_usage(session, tenant_id(limited, headers))
    assert (usage.dataset_bytes, usage.artifact_bytes) == (0, QUOTA - 10)

    refused = upload(client, headers, archive)
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert error["details"]["used_by_artifacts_bytes"] == QUOTA - 10 and error["details"]["used_bytes"] == QUOTA - 10
    assert "DELETE /v1/jobs/{id}" in error["message"]

    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    accepted = upload(client, headers, archive)
    assert accepted.status_code == 201, accepted.text
    with session_scope(limited) as session:
        assert tenant_storage_usage(session, tenant_id(limited, headers)).artifact_bytes == 0


def test_a_quota_already_full_of_artifacts_refuses_before_reading_the_upload(
    quota_client: tuple[TestClient, Settings]
) -> None:
    client, limited = quota_client  # noqa: F811
    headers = new_tenant(limited)
    job_with_artifacts(limited, headers, size=QUOTA)
    refused = upload(client, headers, zip_bytes(image_tree({"wren": 3, "finch": 3})))
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert "dataset_bytes" not in refused.json()["error"]["details"]

