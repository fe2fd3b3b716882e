"""Check-then-insert races at submit, against two real uvicorn processes on SQLite and PostgreSQL.

Two API processes share one database, so only a lock or a check the database itself holds can keep
the invariants: a tenant's cap of active jobs, and "a queued job's dataset exists". Requests are
released together from a barrier and alternate between the processes; no worker runs, so an
accepted job stays queued (active) for the whole test. Datasets are seeded as an upload leaves them
(a row and its folder), so only the racing requests go through the API.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_helpers import image_tree, new_tenant, settings, tenant_id  # noqa: F401  (a fixture)
from service_harness import ChildProcess, api_ready, free_port, service_env, start_child, wait_until
from sqlalchemy import func, select

from fd2_config.settings import Settings
from fd2_core.data.layout import scan_source
from store.datasets import create_dataset, dataset_path
from store.db import session_scope
from store.models import ACTIVE_JOB_STATUSES, Job, new_id

CAP = 2
BURST = 12
RACE_ROUNDS = 24
SUBMITS_PER_ROUND = 2
IMAGES = image_tree({"wren": 6, "finch": 6}, split=None)


@dataclass
class Answer:
    status: int
    code: str | None
    body: dict[str, Any]
    headers: httpx.Headers


@dataclass
class Service:
    bases: list[str]
    settings: Settings
    apis: list[ChildProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {api.name} ---\n{api.new_output()[-6000:]}" for api in self.apis)


@pytest.fixture(scope="module")
def service(settings: Settings) -> Iterator[Service]:  # noqa: F811
    """Two API processes on the module's database (SQLite file or PostgreSQL schema), cap 2."""
    env = service_env({
        "FD2_HOME": str(settings.home),
        "FD2_DATABASE_URL": settings.database_url,
        "FD2_MAX_ACTIVE_JOBS_PER_TENANT": str(CAP),
        "FD2_RATE_LIMIT_BURST": "100000",
        "FD2_RATE_LIMIT_PER_MINUTE": "1000000",
    })
    apis: list[ChildProcess] = []
    bases: list[str] = []
    try:
        for index in range(2):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", f"--port={port}"]
            apis.append(start_child(f"api{index}", command, env, settings.home / "logs"))
            bases.append(f"http://127.0.0.1:{port}")
            # One at a time: the second starts on the migrated schema.
            wait_until(lambda base=bases[-1]: api_ready(base), 120, what="/readyz")
        yield Service(bases, settings, apis)
    finally:
        for api in apis:
            api.stop()


def answer(response: httpx.Response) -> Answer:
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:500]}
    code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
    return Answer(response.status_code, code, body if isinstance(body, dict) else {}, response.headers)


def race(calls: list[Callable[[], httpx.Response]], jitter_s: list[float] | None = None) -> list[Answer]:
    """Run every call on its own thread, released together; their answers in call order."""
    barrier = threading.Barrier(len(calls))
    results: list[Answer | BaseException | None] = [None] * len(calls)
    delays = jitter_s or [0.0] * len(calls)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            if delays[index]:
                time.sleep(delays[index])
            results[index] = answer(calls[index]())
        except BaseException as exc:  # reported by the assertion below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    failures = [r for r in results if not isinstance(r, Answer)]
    assert not failures, f"requests that got no answer: {failures}"
    return [r for r in results if isinstance(r, Answer)]


def clients(service: Service, headers: dict[str, str], count: int) -> list[httpx.Client]:
    """`count` clients alternating between the API processes, each connected already."""
    made = []
    for index in range(count):
        client = httpx.Client(base_url=service.bases[index % len(service.bases)], headers=headers, timeout=120)
        client.get("/healthz")
        made.append(client)
    return made


def submit_call(client: httpx.Client, dataset_id: str) -> Callable[[], httpx.Response]:
    return lambda: client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": {"ipc": 1}})


def seeded_dataset(settings: Settings, headers: dict[str, str]) -> str:  # noqa: F811
    """A ready dataset of the tenant, as an upload stores it: its folder of images and its row."""
    dataset_id = new_id("ds")
    root = dataset_path(settings, dataset_id) / "data"
    for name, data in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    layout = scan_source(root, test_fraction=settings.dataset_test_fraction, seed=0)
    with session_scope(settings) as session:
        create_dataset(session, dataset_id=dataset_id, tenant_id=tenant_id(settings, headers), name="birds",
                       summary=layout.summary(), path=root, size_bytes=sum(map(len, IMAGES.values())),
                       has_test_split=False)
    return dataset_id


def active_jobs(settings: Settings) -> list[tuple[str, str | None, str | None]]:  # noqa: F811
    """(id, dataset_id, manifest_path) of every queued or running job."""
    query = select(Job.id, Job.dataset_id, Job.manifest_path).where(Job.status.in_(ACTIVE_JOB_STATUSES))
    with session_scope(settings) as session:
        return [tuple(row) for row in session.execute(query)]


def count_active(settings: Settings, headers: dict[str, str]) -> int:  # noqa: F811
    with session_scope(settings) as session:
        query = select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant_id(settings, headers), Job.status.in_(ACTIVE_JOB_STATUSES))
        return int(session.scalar(query) or 0)


@pytest.mark.service
@pytest.mark.timeout(300)
def test_a_burst_of_submits_never_passes_the_active_job_cap(service: Service) -> None:
    """12 simultaneous submits with a cap of 2: exactly 2 accepted, 10 answer 429
    too_many_active_jobs."""
    for _ in range(2):  # a fresh tenant each round: two chances to catch a leak
        headers = new_tenant(service.settings)
        pool = clients(service, headers, BURST)
        try:
            dataset_id = seeded_dataset(service.settings, headers)
            answers = race([submit_call(client, dataset_id) for client in pool])
        finally:
            for client in pool:
                client.close()
        statuses = sorted(a.status for a in answers)
        assert all(a.status < 500 for a in answers), f"{[a.body for a in answers]}\n{service.logs()}"
        assert statuses == [202] * CAP + [429] * (BURST - CAP), [(a.status, a.code) for a in answers]
        for refused in (a for a in answers if a.status == 429):
            assert refused.code == "too_many_active_jobs"
            assert refused.body["error"]["details"] == {"max_active_jobs_per_tenant": CAP}
            assert int(refused.headers["Retry-After"]) > 0
        assert count_active(service.settings, headers) == CAP


@pytest.mark.service
@pytest.mark.timeout(300)
def test_a_dataset_delete_racing_submits_has_one_winner(service: Service) -> None:
    """Delete a dataset while two jobs are submitted on it, round after round: never a 500, and
    either the submits see it gone (422 unknown_dataset) or the delete sees the job (409
    dataset_in_use); never an accepted job whose dataset is gone."""
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    for _ in range(RACE_ROUNDS):
        # A fresh tenant each round: the cap never answers in the dataset's place.
        headers = new_tenant(service.settings)
        pool = clients(service, headers, SUBMITS_PER_ROUND + 1)
        try:
            dataset_id = seeded_dataset(service.settings, headers)
            calls = [submit_call(client, dataset_id) for client in pool[:SUBMITS_PER_ROUND]]
            calls.append(lambda client=pool[-1], ds=dataset_id: client.delete(f"/v1/datasets/{ds}"))
            jitter = [rng.uniform(0, 0.03) for _ in calls]
            *submits, delete = race(calls, jitter)
            still_there = pool[0].get(f"/v1/datasets/{dataset_id}").status_code
            accepted = [pool[0].get(f"/v1/jobs/{a.body['id']}").json() for a in submits if a.status == 202]
        finally:
            for client in pool:
                client.close()
        seen = [(a.status, a.code) for a in [*submits, delete]]
        assert all(a.status < 500 for a in [*submits, delete]), f"{seen}\n{service.logs()}"
        assert all((a.status, a.code) in {(202, None), (422, "unknown_dataset")} for a in submits), seen
        assert (delete.status, delete.code) in {(204, None), (409, "dataset_in_use")}, seen
        files_there = dataset_path(service.settings, dataset_id).exists()
        if accepted:
            assert (delete.status, still_there, files_there) == (409, 200, True), seen
            assert all(job["dataset_id"] == dataset_id and job["status"] == "queued" for job in accepted), seen
        else:
            assert (delete.status, still_there, files_there) == (204, 404, False), seen
        outcome = "submit won" if accepted else "delete won"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"outcomes over {RACE_ROUNDS} rounds: {outcomes}")
    assert len(outcomes) == 2, f"the race was not exercised both ways: {outcomes}"
    orphans = [row for row in active_jobs(service.settings) if row[1] is None and row[2] is None]
    assert not orphans, f"active jobs whose dataset is gone: {orphans}"
