"""What a crash mid-upload leaves is the storage sweep's: a real uvicorn is SIGKILLed during an
upload's body and, separately, while it unpacks an upload; after a restart the leftovers show in no
listing, and a sweep with its clock past the grace removes them, while a live upload's staging file
and every dataset and job folder with a row stay.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from api_helpers import image_tree, zip_bytes
from raw_uploads import Dribbler, RawUpload, staging_files, start_api, tenant_key, uploads_in_flight
from service_harness import ServiceStack, embedded_settings, service_env, wait_until

from fd2_config.settings import Settings
from store.models import utcnow
from worker.storage_sweep import LEFTOVER_GRACE, sweep_storage

pytestmark = pytest.mark.service

BODY_S = 120.0
STALL_S = 60.0
# Enough images that extraction and validation take a while, so the kill lands in them.
BIG_DATASET = {f"class{index}": 400 for index in range(8)}
SMALL_DATASET = {"wren": 6, "finch": 6, "tit": 6}


def dataset_folders(settings: Settings) -> set[Path]:
    return {path for path in settings.datasets_dir.iterdir() if path.name.startswith("ds_")}


def listed_datasets(client: httpx.Client) -> set[str]:
    return {item["id"] for item in client.get("/v1/datasets").json()["items"]}


def post_quietly(base_url: str, key: str, data: bytes) -> None:
    """Upload `data`; the connection breaks when the API is killed under it."""
    try:
        httpx.post(f"{base_url}/v1/datasets", headers={"Authorization": f"Bearer {key}"},
                   files={"file": ("big.zip", data, "application/zip")}, timeout=120)
    except httpx.HTTPError:
        pass


def test_a_crash_mid_upload_leaves_only_what_the_sweep_removes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"FD2_HOME": str(home), "FD2_MIN_FREE_DISK_BYTES": "0", "FD2_UPLOAD_BODY_TIMEOUT_S": str(BODY_S),
           "FD2_UPLOAD_STALL_TIMEOUT_S": str(STALL_S)}
    settings = embedded_settings(home, min_free_disk_bytes=0, upload_body_timeout_s=BODY_S,
                                 upload_stall_timeout_s=STALL_S)
    stack = ServiceStack("embedded", service_env(env), tmp_path / "logs")
    big = zip_bytes(image_tree(BIG_DATASET))
    live: RawUpload | None = None
    client = httpx.Client(base_url=stack.base_url, timeout=60)
    try:
        start_api(stack)
        key = tenant_key(settings, "crashy")
        client.headers["Authorization"] = f"Bearer {key}"
        kept = client.post("/v1/datasets", files={"file": ("birds.zip", zip_bytes(image_tree(SMALL_DATASET)),
                                                            "application/zip")})
        assert kept.status_code == 201, kept.text
        kept_id = kept.json()["id"]
        job = client.post("/v1/jobs", json={"dataset": {"id": kept_id}, "spec": {"ipc": 1}})
        assert job.status_code == 202, job.text
        job_folder = settings.jobs_dir / job.json()["id"]
        (job_folder / "stages").mkdir(parents=True)  # as a worker writes it
        kept_folders = dataset_folders(settings)

        # 1. killed while the body streams in (2 MiB of it on disk)
        in_body = RawUpload(stack.port, key, sent_bytes=2 * 1024**2, declared_bytes=64 * 1024**2)
        wait_until(lambda: any(path.stat().st_size for path in staging_files(settings)), 30,
                   what="the partial upload on disk")
        stack.api.kill()
        in_body.close()
        partial = set(uploads_in_flight(settings))
        assert any(path.suffix == ".upload" for path in partial)

        # 2. killed while it unpacks
        start_api(stack)
        threading.Thread(target=post_quietly, args=(stack.base_url, key, big), daemon=True).start()
        deadline = time.monotonic() + 60
        while not dataset_folders(settings) - kept_folders and time.monotonic() < deadline:
            time.sleep(0.002)
        stack.api.kill()
        half = dataset_folders(settings) - kept_folders
        assert half, "the upload should have been unpacking when the API was killed"
        leftovers = partial | half | set(uploads_in_flight(settings))

        start_api(stack)
        assert listed_datasets(client) == {kept_id}, "a half-extracted upload must not be listed"
        assert all(path.exists() for path in leftovers)

        live = RawUpload(stack.port, key)
        wait_until(lambda: set(staging_files(settings)) - leftovers, 30, what="the live upload's staging file")
        live_files = set(uploads_in_flight(settings)) - leftovers
        dribbler = Dribbler([live])
        try:
            later = utcnow() + max(LEFTOVER_GRACE, timedelta(seconds=BODY_S)) + timedelta(minutes=1)
            os.utime(job_folder, (0, 0))  # and old, for good measure: its row keeps it
            swept = sweep_storage(settings, now=later)
        finally:
            dribbler.stop()

        assert not [path for path in leftovers if path.exists()], "the sweep left a crash's files"
        assert leftovers <= set(swept.leftovers)
        assert all(path.exists() for path in live_files), "the sweep removed a live upload's files"
        assert all(path.is_dir() for path in kept_folders) and job_folder.is_dir()
        assert client.get(f"/v1/datasets/{kept_id}").status_code == 200
        assert listed_datasets(client) == {kept_id}
    finally:
        if live is not None:
            live.close()
        client.close()
        print(stack.log_tail())
        stack.stop()


def test_an_upload_is_kept_while_its_lease_is_held_or_its_file_is_young(tmp_path: Path) -> None:
    """The sweep's two rules alone, in-process: a held lease keeps an upload whatever its age, and
    without one a staging file stays until it is older than the body timeout."""
    from store.folders import staging_file, upload_lease

    settings = embedded_settings(tmp_path / "home", upload_body_timeout_s=BODY_S)
    settings.ensure_dirs()
    leased, orphan = "ds_" + "a" * 32, "ds_" + "b" * 32
    far = utcnow() + timedelta(days=1)
    with upload_lease(settings, leased):
        staging_file(settings, leased).write_bytes(b"PK")
        staging_file(settings, orphan).write_bytes(b"PK")  # its request died: no lease
        assert sweep_storage(settings, now=utcnow()).leftovers == []
        assert sweep_storage(settings, now=far).leftovers == [staging_file(settings, orphan)]
        assert staging_file(settings, leased).exists()
    assert staging_file(settings, leased).exists()  # the request ends by removing it, not the sweep
    assert sweep_storage(settings, now=far).leftovers == [staging_file(settings, leased)]
