"""Full and read-only disks are the server's state: a real uvicorn whose datasets folder is a tiny
tmpfs answers an upload that fills it, in its body or while unpacking, with 503
`insufficient_storage` + `Retry-After` and leaves no staging file or folder; with its home remounted
read-only an upload and a manifest job's submit answer 503 too, a dataset or job delete answers 202
(gone from listings, files kept), retention leaves a job unmarked while its files stay, and the
sweep removes the folders once the disk is writable again; `fd2 keys create` and `fd2 migrate` on
a read-only home exit 2 with one line. Needs root (mount); skipped with the
reason otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from api_helpers import image_tree, png_bytes, tenant_id, zip_bytes
from raw_uploads import start_api, tenant_key, uploads_in_flight
from service_harness import REPO_ROOT, ServiceStack, embedded_settings, service_env

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import create_job, job_workdir
from store.models import Job, utcnow
from worker.storage_sweep import LEFTOVER_GRACE, sweep_storage

pytestmark = pytest.mark.service

SMALL_DATASET = {"wren": 4, "finch": 4}


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` for the block; skips the test where mounting is not
    possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; these disk-fault tests run only as root")
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        if _run("umount", str(folder)).returncode != 0:
            _run("umount", "-l", str(folder))


def remount(folder: Path, mode: str) -> None:
    result = _run("mount", "-o", f"remount,{mode}", str(folder))
    assert result.returncode == 0, f"remount {mode} failed: {result.stderr}"


@contextlib.contextmanager
def api_service(tmp_path: Path, settings: Settings, env: dict[str, str]) -> Iterator[httpx.Client]:
    """uvicorn alone on `env`, and a client with a fresh tenant's key."""
    stack = ServiceStack("embedded", service_env({**env, "FD2_MIN_FREE_DISK_BYTES": "0"}), tmp_path / "logs")
    client = httpx.Client(base_url=stack.base_url, timeout=60)
    try:
        start_api(stack)
        client.headers["Authorization"] = f"Bearer {tenant_key(settings, 'disky')}"
        yield client
    finally:
        client.close()
        stack.stop()


def upload(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": ("birds.zip", data, "application/zip")})


def assert_insufficient_storage(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "insufficient_storage"
    assert int(answer.headers["Retry-After"]) > 0


def nothing_left(settings: Settings) -> list[Path]:
    """Staging and lease files and dataset folders (there should be none)."""
    assert settings.datasets_dir is not None
    folders = [path for path in settings.datasets_dir.iterdir() if path.name.startswith("ds_")]
    return uploads_in_flight(settings) + folders


def deflated_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def full_disk_service(tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    home, datasets = tmp_path / "home", tmp_path / "datasets"
    settings = embedded_settings(home, datasets_dir=datasets, min_free_disk_bytes=0)
    return settings, {"FD2_HOME": str(home), "FD2_DATASETS_DIR": str(datasets)}


def test_an_upload_that_fills_the_disk_answers_503_and_leaves_nothing(tmp_path: Path) -> None:
    settings, env = full_disk_service(tmp_path)
    with tmpfs(tmp_path / "datasets"), api_service(tmp_path, settings, env) as client:
        body = zip_bytes({"wren/big.bin": os.urandom(3 * 1024**2), **image_tree(SMALL_DATASET)})
        assert_insufficient_storage(upload(client, body))
        assert nothing_left(settings) == []
        assert client.get("/v1/datasets").json()["items"] == []


def test_unpacking_that_fills_the_disk_answers_503_and_leaves_nothing(tmp_path: Path) -> None:
    settings, env = full_disk_service(tmp_path)
    with tmpfs(tmp_path / "datasets"), api_service(tmp_path, settings, env) as client:
        # a few KiB on the wire, 3 MiB once unpacked into a 2 MiB disk
        body = deflated_zip({"train/wren/big.bin": bytes(3 * 1024**2), **image_tree(SMALL_DATASET)})
        assert len(body) < 512 * 1024
        assert_insufficient_storage(upload(client, body))
        assert nothing_left(settings) == []
        # the disk is free again: the same service takes a dataset that fits
        assert upload(client, zip_bytes(image_tree(SMALL_DATASET))).status_code == 201


def test_a_read_only_home_refuses_uploads_and_defers_deletes_to_the_sweep(tmp_path: Path) -> None:
    home = tmp_path / "home"
    database_url = f"sqlite:///{tmp_path / 'db' / 'fd2.db'}"
    settings = embedded_settings(home, database_url=database_url, min_free_disk_bytes=0)
    env = {"FD2_HOME": str(home), "FD2_DATABASE_URL": database_url}
    with tmpfs(home, "8m"), api_service(tmp_path, settings, env) as client:
        stored = upload(client, zip_bytes(image_tree(SMALL_DATASET)))
        assert stored.status_code == 201, stored.text
        dataset_id = stored.json()["id"]
        assert settings.datasets_dir is not None
        folder = settings.datasets_dir / dataset_id
        remount(home, "ro")
        try:
            assert_insufficient_storage(upload(client, zip_bytes(image_tree(SMALL_DATASET))))
            deleted = client.delete(f"/v1/datasets/{dataset_id}")
            assert deleted.status_code == 202, deleted.text
            assert deleted.json()["files_removed"] is False
            assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
            assert client.get("/v1/datasets").json()["items"] == []
            assert folder.is_dir()
        finally:
            remount(home, "rw")
        sweep_storage(settings, utcnow() + LEFTOVER_GRACE + timedelta(minutes=1))
        assert not folder.exists()
        assert nothing_left(settings) == []


def finished_job(settings: Settings, tenant: str) -> Path:
    """A succeeded job with one artifact in its work folder; returns the folder."""
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant, spec={"ipc": 1}, queue=GPU_QUEUE)
        mark_running(session, job.id, "w")
        folder = job_workdir(settings, job.id)
        (folder / "artifacts").mkdir(parents=True)
        (folder / "artifacts" / "report.json").write_text("{}")
        register_artifact(session, job.id, "report.json", folder / "artifacts" / "report.json")
        finish_job(session, job.id, "succeeded", metrics={})
        return folder


def test_a_read_only_home_defers_job_deletes_and_expiry_and_refuses_manifest_jobs(tmp_path: Path) -> None:
    home, shared = tmp_path / "home", tmp_path / "shared"
    database_url = f"sqlite:///{tmp_path / 'db' / 'fd2.db'}"
    items = []
    for name in SMALL_DATASET:
        (shared / name).mkdir(parents=True)
        for index in range(SMALL_DATASET[name]):
            (shared / name / f"{index}.png").write_bytes(png_bytes(index))
            items.append({"path": f"{name}/{index}.png", "label": name})
    settings = embedded_settings(home, database_url=database_url, min_free_disk_bytes=0,
                                 allowed_data_roots=[shared], artifact_retention_days=1)
    env = {"FD2_HOME": str(home), "FD2_DATABASE_URL": database_url, "FD2_ALLOWED_DATA_ROOTS": str(shared)}
    with tmpfs(home, "8m"), api_service(tmp_path, settings, env) as client:
        tenant = tenant_id(settings, {"Authorization": client.headers["Authorization"]})
        deleted_folder, expiring_folder = finished_job(settings, tenant), finished_job(settings, tenant)
        deleted_id, expiring_id = deleted_folder.name, expiring_folder.name
        later = utcnow() + timedelta(days=2)
        remount(home, "ro")
        try:
            deleted = client.delete(f"/v1/jobs/{deleted_id}")
            assert deleted.status_code == 202, deleted.text
            assert deleted.json()["files_removed"] is False
            assert client.get(f"/v1/jobs/{deleted_id}").status_code == 404
            assert deleted_folder.is_dir()

            body = {"dataset": {"manifest": {"root": str(shared), "items": items}}, "spec": {"ipc": 1}}
            assert_insufficient_storage(client.post("/v1/jobs", json=body))
            assert [job["id"] for job in client.get("/v1/jobs").json()["items"]] == [expiring_id]

            # the disk keeps the expired job's files: no mark, so the next sweep tries again
            # (nor does it report the deleted job's folder as removed)
            refused = sweep_storage(settings, later + LEFTOVER_GRACE)
            assert refused.expired == [] and refused.leftovers == []
            assert expiring_folder.is_dir() and deleted_folder.is_dir()
            with session_scope(settings) as session:
                assert session.get(Job, expiring_id).artifacts_expired_at is None
        finally:
            remount(home, "rw")
        swept = sweep_storage(settings, later + LEFTOVER_GRACE)
        assert swept.expired == [expiring_id]
        assert not expiring_folder.exists() and not deleted_folder.exists()
        with session_scope(settings) as session:
            assert session.get(Job, expiring_id).artifacts_expired_at is not None


def fd2(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = service_env({})
    return subprocess.run([sys.executable, "-m", "fd2_cli", *args, "--home", str(home)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_service_commands_on_a_read_only_home_exit_2_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with tmpfs(home, "8m"):
        assert fd2(home, "migrate").returncode == 0
        remount(home, "ro")
        try:
            for command in (("keys", "create", "acme"), ("migrate",)):
                result = fd2(home, *command)
                lines = result.stderr.strip().splitlines()
                assert result.returncode == 2, result.stderr
                assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
                assert str(home) in lines[0] and "read-only" in lines[0], lines[0]
                assert result.stdout == ""
        finally:
            remount(home, "rw")
