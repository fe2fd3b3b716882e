"""Artifact retention: the storage sweep, called with its clock, removes old finished jobs' files
and keeps the jobs marked `artifacts_expired`;
their downloads answer 410 and their bytes leave the quota."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

# settings is a fixture
from api_helpers import new_tenant, running_client, settings, tenant_id  # noqa: F401
from fastapi.testclient import TestClient
from sqlalchemy import update

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.datasets import tenant_storage_usage
from store.db import session_scope
from store.job_files import remove_job_files
from store.job_states import finish_job, mark_running
from store.jobs import create_job, job_workdir
from store.models import Job, utcnow
from store.retention import jobs_past_retention
from worker.storage_sweep import expire_old_artifacts, sweep_storage

RETENTION_DAYS = 7
NOW = utcnow()


@pytest.fixture(scope="module")
def kept_settings(settings: Settings) -> Settings:  # noqa: F811
    return settings.model_copy(update={"artifact_retention_days": RETENTION_DAYS})


@pytest.fixture(scope="module")
def client(kept_settings: Settings) -> Iterator[TestClient]:
    with running_client(kept_settings) as test_client:
        yield test_client


def finished_job(settings: Settings, headers: dict[str, str], finished_at: datetime | None,  # noqa: F811
                 size: int = 500) -> str:
    """A job with `report.json` in its work folder, finished at `finished_at`
    (None: still running)."""
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        mark_running(session, job.id, "w")
        folder = job_workdir(settings, job.id) / "artifacts"
        folder.mkdir(parents=True)
        (folder / "report.json").write_bytes(os.urandom(size))
        register_artifact(session, job.id, "report.json", folder / "report.json")
        if finished_at is not None:
            finish_job(session, job.id, "succeeded")
            session.execute(update(Job).where(Job.id == job.id).values(finished_at=finished_at))
        return job.id


def test_the_sweep_expires_old_artifacts_and_keeps_the_job(client: TestClient, kept_settings: Settings) -> None:
    headers = new_tenant(kept_settings)
    old = finished_job(kept_settings, headers, NOW - timedelta(days=RETENTION_DAYS + 1))
    recent = finished_job(kept_settings, headers, NOW - timedelta(days=RETENTION_DAYS - 1))
    running = finished_job(kept_settings, headers, None)

    result = sweep_storage(kept_settings, now=NOW)
    assert old in result.expired and recent not in result.expired and running not in result.expired
    assert not job_workdir(kept_settings, old).exists()
    for job_id in (recent, running):
        assert (job_workdir(kept_settings, job_id) / "artifacts" / "report.json").is_file()

    job = client.get(f"/v1/jobs/{old}", headers=headers).json()
    assert job["status"] == "succeeded" and job["artifacts_expired"] is True
    # kept as a record of what was made
    assert [a["name"] for a in job["artifacts"]] == ["report.json"]
    gone = client.get(f"/v1/jobs/{old}/artifacts/report.json", headers=headers)
    assert gone.status_code == 410
    assert gone.json()["error"]["code"] == "artifacts_expired" and gone.json()["error"]["details"]["expired_at"]
    assert client.get(f"/v1/jobs/{old}/artifacts/other.json", headers=headers).status_code == 404
    assert client.get(f"/v1/jobs/{recent}", headers=headers).json()["artifacts_expired"] is False
    assert client.get(f"/v1/jobs/{recent}/artifacts/report.json", headers=headers).status_code == 200
    with session_scope(kept_settings) as session:
        assert tenant_storage_usage(session, tenant_id(kept_settings, headers)).artifact_bytes == 2 * 500

    assert old not in sweep_storage(kept_settings, now=NOW).expired  # marked once
    # Days later the recent job's turn comes; an expired job can still be deleted.
    assert recent in expire_old_artifacts(kept_settings, NOW + timedelta(days=2))
    assert client.delete(f"/v1/jobs/{old}", headers=headers).status_code == 204


def test_without_a_retention_period_nothing_expires(kept_settings: Settings) -> None:
    unlimited = kept_settings.model_copy(update={"artifact_retention_days": None})
    headers = new_tenant(unlimited)
    ancient = finished_job(unlimited, headers, NOW - timedelta(days=3650))
    assert expire_old_artifacts(unlimited, NOW) == []
    assert (job_workdir(unlimited, ancient) / "artifacts" / "report.json").is_file()


def test_a_sweep_interrupted_after_the_files_is_finished_by_the_next(client: TestClient,
                                                                     kept_settings: Settings) -> None:
    headers = new_tenant(kept_settings)
    job_id = finished_job(kept_settings, headers, NOW - timedelta(days=RETENTION_DAYS + 3))
    with session_scope(kept_settings) as session:
        due = {job.id: job for job in jobs_past_retention(session, NOW - timedelta(days=RETENTION_DAYS), 1000)}
    remove_job_files(kept_settings, job_id, due[job_id].artifact_paths)  # then the worker dies
    missing = client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "artifact_missing"
    assert job_id in expire_old_artifacts(kept_settings, NOW)
    assert client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=headers).status_code == 410


def test_artifact_files_outside_the_service_folders_are_never_removed(kept_settings: Settings, tmp_path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    remove_job_files(kept_settings, "job_outside", [str(outside)])
    assert outside.is_file()


@pytest.mark.parametrize(("text", "days"), [("", None), ("30", 30.0), ("0.5", 0.5)])
def test_the_retention_period_comes_from_the_environment(monkeypatch, tmp_path, text: str, days) -> None:
    monkeypatch.setenv("FD2_ARTIFACT_RETENTION_DAYS", text)
    assert Settings(home=tmp_path).artifact_retention_days == days
