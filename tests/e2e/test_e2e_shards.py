"""One job across several real workers (spec `max_workers` > 1): docs/ARCHITECTURE.md "One job on many workers".

Each scenario runs in both modes (embedded: SQLite + folder broker; distributed: PostgreSQL + Redis) on an API and
two Celery worker processes: a two-worker job gives the artifacts of a one-worker job; a worker killed while it
holds a shard costs the job nothing; cancel stops every shard within 10 s; a shard that fails fails the job with
the shard named.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pipeline_helpers import tiny_spec
from safetensors.torch import load
from service_harness import ServiceStack, get_job, mode_stack, submit, upload, wait_until
from service_harness import wait_final as wait_job

pytestmark = pytest.mark.service

CLASSES = 6
JOB_TIMEOUT_S = 300
# Two class blocks, two relabel ranges (25 epochs each at least) and two evaluation students: every stage but
# pretrain has two shards that can run at once.
WIDE_SPEC = tiny_spec(device="cpu", ipc=2, distill_batch_classes=3, relabel_epochs=50, max_workers=2)
# Slow enough per shard that a test can act while one runs.
SLOW_SPEC = {**WIDE_SPEC, "distill_iterations": 400}


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with ExitStack() as resources:
        yield mode_stack(request.param, tmp_path_factory.mktemp(f"shards-{request.param}"), resources,
                         {"OMP_NUM_THREADS": "1"}, workers=2)


@pytest.fixture
def service(stack: ServiceStack) -> Iterator[ServiceStack]:
    stack.log_tail()
    yield stack
    print(stack.log_tail())
    while sum(worker.alive for worker in stack.workers) < 2:
        stack.start_worker()  # two live workers for the next scenario


@pytest.fixture(scope="module")
def client(stack: ServiceStack) -> Iterator[httpx.Client]:
    with stack.client(stack.create_key(f"shards-{stack.mode}-{time.monotonic_ns()}")) as client:
        yield client


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=CLASSES, image_size=32, train_per_class=10, test_per_class=4, seed=5)
    return fgsynth.write_zip(data, tmp_path_factory.mktemp("upload") / "fgsynth.zip")


@pytest.fixture(scope="module")
def dataset_id(client: httpx.Client, archive: Path) -> str:
    return upload(client, archive)


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_job(client, job_id, timeout_s)


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after} if after else None).json()
        items.extend(page["items"])
        after = page["next_cursor"]
        if not after:
            return items


def running_shard(client: httpx.Client, job_id: str, stage: str | None = None) -> dict[str, Any] | None:
    shards = get_job(client, job_id)["shards"] or {"items": []}
    return next((s for s in shards["items"] if s["status"] == "running" and stage in (None, s["stage"])), None)


def artifacts(client: httpx.Client, job: dict[str, Any]) -> dict[str, bytes]:
    files = {}
    for artifact in job["artifacts"]:
        response = client.get(artifact["url"])
        assert response.status_code == 200, artifact["name"]
        files[artifact["name"]] = response.content
    return files


def without_max_workers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_max_workers(v) for k, v in value.items() if k != "max_workers"}
    return [without_max_workers(v) for v in value] if isinstance(value, list) else value


def assert_same_results(one: dict[str, bytes], two: dict[str, bytes]) -> None:
    """Distilled images, labels.csv, soft-label and teacher tensors equal; the reports differ only in timings and
    worker names (safetensors metadata is compared as a mapping: its order varies between processes)."""
    assert one.keys() == two.keys()
    tars = [tarfile.open(fileobj=io.BytesIO(files["distilled.tar.gz"])) for files in (one, two)]
    members = [{m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()} for t in tars]
    manifests = [without_max_workers(json.loads(files.pop("manifest.json"))) for files in members]
    assert manifests[0] == manifests[1]  # the spec they record differs in max_workers alone
    assert members[0] == members[1]
    assert "labels.csv" in members[0] and len(members[0]) > 2
    for name in ("soft_labels.safetensors", "teacher.safetensors"):
        a, b = load(one[name]), load(two[name])
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    reports = [json.loads(files["report.json"]) for files in (one, two)]
    assert reports[0]["metrics"] == reports[1]["metrics"]


def test_two_workers_give_the_one_worker_results(service: ServiceStack, client: httpx.Client,
                                                 dataset_id: str) -> None:
    wide = submit(client, dataset_id, WIDE_SPEC)
    job = wait_final(client, wide)
    assert job["status"] == "succeeded", (job["error"], service.log_tail())
    shards = job["shards"]
    assert shards["total"] == shards["done"] == len(shards["items"]) > 8
    assert {s["stage"] for s in shards["items"]} == {"pretrain", "distill", "relabel", "evaluate", "package"}
    assert len({s["worker"] for s in shards["items"]}) == 2, shards["items"]  # both workers ran shards
    assert job["progress"] == 1.0
    log = events(client, wide)
    started = [e for e in log if e["kind"] == "shard_started"]
    assert {e["data"]["shard"] for e in started} == {s["id"] for s in shards["items"]}

    single = submit(client, dataset_id, {**WIDE_SPEC, "max_workers": 1})
    reference = wait_final(client, single)
    assert reference["status"] == "succeeded" and reference["shards"] is None
    assert_same_results(artifacts(client, reference), artifacts(client, job))


def test_a_killed_worker_costs_the_job_nothing(service: ServiceStack, client: httpx.Client, dataset_id: str) -> None:
    job_id = submit(client, dataset_id, SLOW_SPEC)
    shard = wait_until(lambda: running_shard(client, job_id, "distill"), 120, what="a distill shard to run")
    victim = next(w for w in service.workers if w.alive and str(w.process.pid) == shard["worker"].rsplit(":")[-1])
    victim.kill()
    job = wait_final(client, job_id)
    assert job["status"] == "succeeded", (job["error"], service.log_tail())
    item = next(s for s in job["shards"]["items"] if s["id"] == shard["id"])
    assert item["attempts"] >= 2 and item["worker"] != shard["worker"]
    assert any(e["kind"] == "shard_requeued" and e["data"]["shard"] == shard["id"] for e in events(client, job_id))


def test_a_worker_shutting_down_hands_its_shard_on(service: ServiceStack, client: httpx.Client,
                                                   dataset_id: str) -> None:
    job_id = submit(client, dataset_id, SLOW_SPEC)
    shard = wait_until(lambda: running_shard(client, job_id, "distill"), 120, what="a distill shard to run")
    leaving = next(w for w in service.workers if w.alive and str(w.process.pid) == shard["worker"].rsplit(":")[-1])
    assert leaving.stop() == 0  # SIGTERM: a warm shutdown
    job = wait_final(client, job_id)
    assert job["status"] == "succeeded", (job["error"], service.log_tail())
    item = next(s for s in job["shards"]["items"] if s["id"] == shard["id"])
    assert item["worker"] != shard["worker"]
    requeued = [e for e in events(client, job_id) if e["kind"] == "shard_requeued"]
    assert [e["data"]["shard"] for e in requeued] == [shard["id"]] and "shutting down" in requeued[0]["message"]


def test_cancel_stops_every_shard_within_ten_seconds(service: ServiceStack, client: httpx.Client,
                                                     dataset_id: str) -> None:
    job_id = submit(client, dataset_id, SLOW_SPEC)
    wait_until(lambda: (get_job(client, job_id)["shards"] or {}).get("running", 0) == 2, 120,
               what="two shards running at once")
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    wait_until(lambda: get_job(client, job_id)["shards"]["running"] == 0, 10, interval_s=0.2,
               what="every shard to stop")
    assert time.monotonic() - asked <= 10.5
    job = wait_final(client, job_id, 10)
    assert job["status"] == "cancelled"
    # Both workers are free again: the next job's shards run.
    follow = wait_final(client, submit(client, dataset_id, WIDE_SPEC))
    assert follow["status"] == "succeeded", follow["error"]


def test_a_failing_shard_fails_the_job_naming_it(service: ServiceStack, client: httpx.Client, dataset_id: str,
                                                 tmp_path: Path) -> None:
    home = Path(service.env["FD2_HOME"])
    job_id = submit(client, dataset_id, SLOW_SPEC)
    wait_until(lambda: running_shard(client, job_id, "distill"), 120, what="a distill shard to run")
    folder = home / "datasets" / dataset_id
    moved = tmp_path / "moved"
    folder.rename(moved)  # every shard that starts now finds no data
    try:
        job = wait_final(client, job_id)
    finally:
        moved.rename(folder)
    assert job["status"] == "failed"
    # The first shard to start without data fails the job (a shard starting at the same moment may fail too).
    failed = [s["id"] for s in job["shards"]["items"] if s["status"] == "failed"]
    assert failed and any(job["error"]["message"].startswith(f"shard {shard} failed: ") for shard in failed), (
        job["error"], failed)
    # A shard still running when another failed the job stops at its next poll.
    wait_until(lambda: get_job(client, job_id)["shards"]["running"] == 0, 10, what="the other shards to stop")


def test_another_tenants_job_runs_beside_a_wide_job(service: ServiceStack, client: httpx.Client,
                                                    dataset_id: str, archive: Path) -> None:
    """Fair share on real workers: while a wide job holds both workers, another tenant's job is queued behind
    at most its two shards and finishes long before it (docs/ARCHITECTURE.md "One job on many workers")."""
    wide = submit(client, dataset_id, {**SLOW_SPEC, "distill_iterations": 3000})  # minutes of distillation
    wait_until(lambda: (get_job(client, wide)["shards"] or {}).get("running", 0) == 2, 120,
               what="the wide job on both workers")
    with service.client(service.create_key(f"other-{service.mode}-{time.monotonic_ns()}")) as other:
        small_job = submit(other, upload(other, archive), tiny_spec(device="cpu", evaluate=False))
        small = wait_final(other, small_job)
    assert small["status"] == "succeeded", small["error"]
    job = get_job(client, wide)
    assert job["status"] == "running"  # the small job did not wait for the wide one
    assert client.post(f"/v1/jobs/{wide}/cancel").status_code == 202
    assert wait_final(client, wide, 30)["status"] == "cancelled"
