"""The distributed service through a Redis restart and a PostgreSQL restart, with real processes.

Each test starts its own Redis and PostgreSQL (`tests/support/private_servers.py`, free ports, temporary folders) and
a real uvicorn + Celery worker on them, then kills Redis or stops PostgreSQL while a job runs. What must
hold: every job ends `succeeded`, none is lost and none runs twice (one attempt, one `started` event), and the
API answers 503 with a JSON error, never 500, while a dependency is down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_helpers import tiny_spec
from private_servers import PrivatePostgres, PrivateRedis, private_postgres, private_redis
from service_harness import TEST_STALE_HEARTBEAT_S, ServiceStack, get_job, service_env, submit, upload, wait_until
from service_harness import wait_final as wait_job

pytestmark = pytest.mark.service

CLASSES = 10
JOB_TIMEOUT_S = 240
FINAL = {"succeeded", "failed", "cancelled"}
CPU_SPEC = tiny_spec(device="cpu")
# Long enough per ipc index (also on an idle machine) that the outage, the /readyz probe and the refused
# submission all fall inside the distill stage.
SLOW_DISTILL_SPEC = tiny_spec(device="cpu", ipc=3, distill_iterations=250, evaluate=False,
                              eval_random_baseline=False)
# still distilling after the Redis outage's probes (a readiness probe waits on the dead broker), however
# fast the machine
LONG_DISTILL_SPEC = {**SLOW_DISTILL_SPEC, "distill_iterations": 1500}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def stack(tmp_path: Path, postgres: PrivatePostgres, redis_server: PrivateRedis) -> Iterator[ServiceStack]:
    """API + one worker on the private servers, with this test's process output printed at the end."""
    database_url = postgres.create_database(f"fd2_{tmp_path.name[-20:].lower().replace('-', '_')}_{time.time_ns()}")
    env = {
        "FD2_HOME": str(tmp_path / "home"),
        "FD2_STALE_HEARTBEAT_S": str(TEST_STALE_HEARTBEAT_S),
        "FD2_DATABASE_URL": database_url,
        "FD2_BROKER_URL": redis_server.url,
    }
    service = ServiceStack("distributed", service_env(env), tmp_path / "logs")
    try:
        service.start()
        yield service
    finally:
        service.stop()
        print(service.log_tail())
        print("----- postgres -----\n" + postgres.log_tail())


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=CLASSES, image_size=32, train_per_class=12, test_per_class=4, seed=3)
    return fgsynth.write_zip(data, tmp_path_factory.mktemp("upload") / "fgsynth.zip")


# ---------------------------------------------------------------- helpers


def client_for(service: ServiceStack) -> httpx.Client:
    return service.client(service.create_key(f"restart-{time.monotonic_ns()}"))


def wait_final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return wait_job(client, job_id, JOB_TIMEOUT_S)


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def attempts(database_url: str, job_id: str) -> int:
    """The job row's attempt count (not part of the public resource)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT attempts FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


def assert_ran_once(client: httpx.Client, database_url: str, job_id: str) -> list[dict[str, Any]]:
    job = wait_final(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    kinds = [event["kind"] for event in events(client, job_id)]
    assert kinds.count("started") == 1, kinds
    assert not {"requeued", "takeover"} & set(kinds), kinds
    assert attempts(database_url, job_id) == 1
    return events(client, job_id)


def assert_unavailable(response: httpx.Response, *, retry_after: bool = True) -> dict[str, Any]:
    """503 with the documented JSON error body (and a Retry-After header on /v1 calls)."""
    assert response.status_code == 503, (response.request.method, response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"]
    if retry_after:
        assert int(response.headers["retry-after"]) > 0
    return error


def in_distill(client: httpx.Client, job_id: str) -> bool:
    return get_job(client, job_id)["stage"] == "distill"


# ---------------------------------------------------------------- scenarios


def test_redis_restart_loses_no_job_and_runs_none_twice(
    stack: ServiceStack, redis_server: PrivateRedis, dataset_zip: Path
):
    database_url = stack.env["FD2_DATABASE_URL"]
    with client_for(stack) as client:
        dataset_id = upload(client, dataset_zip)
        running = submit(client, dataset_id, LONG_DISTILL_SPEC)
        queued = submit(client, dataset_id, CPU_SPEC)  # waits in Redis behind the running job
        wait_until(lambda: in_distill(client, running), JOB_TIMEOUT_S, what="the distill stage")
        assert get_job(client, queued)["status"] == "queued"

        redis_server.kill()  # no persistence: the queued job's message is gone with it
        ready = httpx.get(f"{stack.base_url}/readyz", timeout=30)
        error = assert_unavailable(ready, retry_after=False)
        assert error["details"]["database"] == "ok" and error["details"]["broker"] != "ok"
        refused = client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": CPU_SPEC})
        assert assert_unavailable(refused)["code"] == "broker_unavailable"
        assert get_job(client, running)["status"] == "running"

        redis_server.start()  # empty
        assert_ran_once(client, database_url, running)
        assert_ran_once(client, database_url, queued)
        listed = client.get("/v1/jobs").json()["items"]
        assert {job["id"] for job in listed} == {running, queued}  # the refused submission left no job
        wait_until(lambda: httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200, 30,
                   what="/readyz to recover")


def test_postgres_restart_mid_job_completes_and_the_api_answers_503(
    stack: ServiceStack, postgres: PrivatePostgres, dataset_zip: Path
):
    database_url = stack.env["FD2_DATABASE_URL"]
    with client_for(stack) as client:
        dataset_id = upload(client, dataset_zip)
        job_id = submit(client, dataset_id, SLOW_DISTILL_SPEC)
        wait_until(lambda: in_distill(client, job_id), JOB_TIMEOUT_S, what="the distill stage")

        postgres.stop()
        stopped = time.monotonic()
        probes = [
            ("GET", f"/v1/jobs/{job_id}", None),
            ("GET", "/v1/jobs", None),
            ("GET", f"/v1/jobs/{job_id}/events", None),
            ("GET", "/v1/datasets", None),
            ("POST", "/v1/jobs", {"dataset": {"id": dataset_id}, "spec": CPU_SPEC}),
            ("POST", f"/v1/jobs/{job_id}/cancel", None),
        ]
        while time.monotonic() - stopped < TEST_STALE_HEARTBEAT_S + 3:  # longer than a heartbeat may be old
            for method, path, body in probes:
                assert_unavailable(client.request(method, path, json=body))
            ready = httpx.get(f"{stack.base_url}/readyz", timeout=30)
            assert assert_unavailable(ready, retry_after=False)["details"]["database"] != "ok"
            time.sleep(1.0)
        postgres.start()

        log = assert_ran_once(client, database_url, job_id)
        messages = [event["message"] for event in log]
        for index in range(1, SLOW_DISTILL_SPEC["ipc"] + 1):  # no event was dropped by the outage
            assert any(f"ipc index {index}/3 distilled" in message for message in messages), messages
        assert not get_job(client, job_id)["cancel_requested"]  # the cancel during the outage did nothing
