"""Job submission, validation at submit time, idempotency, listing, cancellation and events."""

from __future__ import annotations

import json

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    image_tree,
    new_tenant,
    png_bytes,
    ready_dataset,
    running_client,
    settings,
    submit,
    tenant_id,
)
from fastapi.testclient import TestClient
from sqlalchemy import update

from fd2_config.queues import CPU_QUEUE, GPU_QUEUE, RUN_JOB_TASK
from fd2_config.settings import Settings
from fd2_core.spec_resolution import resolve_spec
from store.db import session_scope
from store.job_states import finish_job, mark_running
from store.jobs import add_event, create_job
from store.models import Dataset
from store.resources import job_resource_json


@pytest.fixture(scope="module")
def tenant(settings: Settings) -> dict[str, str]:  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def dataset(client: TestClient, tenant: dict[str, str]) -> dict:  # noqa: F811
    # 6 images per class with no test split: 1 is carved for test, 5 remain for training.
    return ready_dataset(client, tenant, {"wren": 6, "finch": 7, "tit": 8})


def queued_messages(settings: Settings) -> list[dict]:  # noqa: F811
    folder = settings.broker_dir / "queue"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.msg"))]


def test_submit_answers_202_with_the_resolved_spec(client: TestClient, settings: Settings, tenant, dataset) -> None:  # noqa: F811
    response = submit(client, tenant, dataset["id"], {"ipc": 2, "method": "sre2l++", "device": "cpu"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["dataset_id"] == dataset["id"]
    assert job["spec"] == resolve_spec({"ipc": 2, "method": "sre2l++", "device": "cpu"}).model_dump(mode="json")
    assert job["artifacts"] == [] and job["error"] is None and job["progress"] == 0.0
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant).json() == job
    sent = [m for m in queued_messages(settings) if m["headers"]["id"] == job["id"]]
    assert len(sent) == 1
    assert sent[0]["headers"]["task"] == RUN_JOB_TASK
    assert sent[0]["properties"]["delivery_info"]["routing_key"] == CPU_QUEUE


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"ipc": 1, "nonexistent_field": 3}, "nonexistent_field"), ({"ipc": 0}, "ipc"),
     ({"backbone": "vgg"}, "backbone"), ({"preset": "paper-nowhere"}, "preset")],
)
def test_invalid_spec_names_the_field(client: TestClient, tenant, dataset, spec, field) -> None:  # noqa: F811
    response = submit(client, tenant, dataset["id"], spec)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    assert error["details"][0]["field"] == field
    assert error["details"][0]["loc"] == ["body", "spec", field]


def test_ipc_larger_than_the_smallest_class_is_refused(client: TestClient, tenant, dataset) -> None:  # noqa: F811
    smallest = min(c["train"] for c in dataset["per_class"].values())
    assert submit(client, tenant, dataset["id"], {"ipc": smallest}).status_code == 202
    response = submit(client, tenant, dataset["id"], {"ipc": smallest + 1})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "ipc_too_large"
    assert error["details"]["smallest_class"] == "wren"
    # A larger carved test share (spec.test_fraction) leaves fewer training images.
    response = submit(client, tenant, dataset["id"], {"ipc": smallest, "test_fraction": 0.5})
    assert response.json()["error"]["code"] == "ipc_too_large"


def test_dataset_must_exist_for_the_tenant_and_be_ready(  # noqa: F811
    client: TestClient, settings: Settings, tenant, dataset  # noqa: F811
) -> None:
    other = new_tenant(settings)
    for headers in (other, tenant):
        missing = submit(client, headers, "ds_unknown" if headers is tenant else dataset["id"])
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "unknown_dataset"
    pending = ready_dataset(client, tenant, {"a": 3, "b": 3})
    with session_scope(settings) as session:
        session.execute(update(Dataset).where(Dataset.id == pending["id"]).values(status="validating"))
    response = submit(client, tenant, pending["id"])
    assert response.status_code == 422 and response.json()["error"]["code"] == "dataset_not_ready"
    both = client.post("/v1/jobs", headers=tenant, json={"dataset": {}, "spec": {}})
    assert both.status_code == 422


def test_idempotency_key_replays_or_conflicts(client: TestClient, tenant, dataset) -> None:  # noqa: F811
    invalid = submit(client, tenant, dataset["id"], {"ipc": 999}, idempotency_key="k-1")
    assert invalid.status_code == 422  # a refused request does not use up the key
    first = submit(client, tenant, dataset["id"], {"ipc": 1, "seed": 3}, idempotency_key="k-1")
    assert first.status_code == 202
    again = submit(client, tenant, dataset["id"], {"ipc": 1, "seed": 3}, idempotency_key="k-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    different = submit(client, tenant, dataset["id"], {"ipc": 1, "seed": 4}, idempotency_key="k-1")
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "idempotency_conflict"
    other_key = submit(client, tenant, dataset["id"], {"ipc": 1, "seed": 3}, idempotency_key="k-2")
    assert other_key.status_code == 202 and other_key.json()["id"] != first.json()["id"]


def test_callback_host_must_be_allowed(settings: Settings) -> None:  # noqa: F811
    allowing = settings.model_copy(update={"callback_allow_hosts": ["hooks.example.com"]})
    with running_client(allowing) as api:
        headers = new_tenant(allowing)
        data = ready_dataset(api, headers)
        refused = submit(api, headers, data["id"], callback_url="https://evil.example.net/hook")
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "callback_host_not_allowed"
        accepted = submit(api, headers, data["id"], callback_url="https://hooks.example.com/fd2")
        assert accepted.status_code == 202


def test_manifest_jobs_need_an_allowed_root(settings: Settings, tmp_path) -> None:  # noqa: F811
    root = tmp_path / "shared" / "birds"
    items = []
    for name, count in (("wren", 4), ("finch", 4)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            (root / name / f"{index}.png").write_bytes(png_bytes(index))
            items.append({"path": f"{name}/{index}.png", "label": name})
    allowing = settings.model_copy(update={"allowed_data_roots": [(tmp_path / "shared").resolve()]})
    with running_client(allowing) as api:
        headers = new_tenant(allowing)
        body = {"dataset": {"manifest": {"root": str(root), "items": items}}, "spec": {"ipc": 2}}
        accepted = api.post("/v1/jobs", headers=headers, json=body)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["dataset_id"] is None and job["dataset_source"] == "manifest"
        assert api.get(f"/v1/jobs/{job['id']}", headers=headers).json()["dataset_source"] == "manifest"
        listed = api.get("/v1/jobs", headers=headers).json()["items"]
        assert [j["dataset_source"] for j in listed if j["id"] == job["id"]] == ["manifest"]
        manifest = json.loads((allowing.jobs_dir / job["id"] / "manifest.json").read_text())
        assert manifest["root"] == str(root.resolve()) and len(manifest["items"]) == 8
        outside = {**body, "dataset": {"manifest": {"root": str(tmp_path), "items": items}}}
        refused = api.post("/v1/jobs", headers=headers, json=outside)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "data_root_not_allowed"
        too_many = {**body, "spec": {"ipc": 4}}
        assert api.post("/v1/jobs", headers=headers, json=too_many).json()["error"]["code"] == "ipc_too_large"
        missing = {**body, "dataset": {"manifest": {"root": str(root), "items": [
            {"path": "wren/404.png", "label": "wren"}, {"path": "finch/0.png", "label": "finch"}]}}}
        assert api.post("/v1/jobs", headers=headers, json=missing).status_code == 422


def test_oversized_job_body_answers_413(settings: Settings) -> None:  # noqa: F811
    with running_client(settings.model_copy(update={"max_json_body_bytes": 4096})) as api:
        headers = new_tenant(settings)
        items = [{"path": f"a/{i}.png", "label": "a"} for i in range(500)]
        body = {"dataset": {"manifest": {"root": "/data", "items": items}}, "spec": {}}
        announced = api.post("/v1/jobs", headers=headers, json=body)
        raw = json.dumps(body).encode()
        chunked = api.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"},
                           content=iter([raw[i:i + 1000] for i in range(0, len(raw), 1000)]))
    for response in (announced, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


def test_job_list_pages_newest_first_and_filters(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    owner = tenant_id(settings, headers)
    with session_scope(settings) as session:
        ids = [create_job(session, tenant_id=owner, spec={}, queue=GPU_QUEUE).id for _ in range(7)]
        mark_running(session, ids[2], "w")
    pages, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/jobs", headers=headers, params=params).json()
        pages.append([j["id"] for j in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == ids[::-1]
    running = client.get("/v1/jobs", headers=headers, params={"status": "running"}).json()
    assert [j["id"] for j in running["items"]] == [ids[2]]
    assert client.get("/v1/jobs", headers=headers, params={"status": "bogus"}).status_code == 422


def test_cancel_queued_running_and_finished(client: TestClient, settings: Settings, tenant, dataset) -> None:  # noqa: F811
    queued = submit(client, tenant, dataset["id"]).json()
    response = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=tenant)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    again = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=tenant)
    assert again.status_code == 409
    assert again.json()["error"]["message"].startswith("job has already cancelled;")

    running = submit(client, tenant, dataset["id"]).json()
    with session_scope(settings) as session:
        mark_running(session, running["id"], "w")
    response = client.post(f"/v1/jobs/{running['id']}/cancel", headers=tenant)
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True

    done = submit(client, tenant, dataset["id"]).json()
    with session_scope(settings) as session:
        mark_running(session, done["id"], "w")
        finish_job(session, done["id"], "succeeded", metrics={"student_accuracy": 0.4})
    response = client.post(f"/v1/jobs/{done['id']}/cancel", headers=tenant)
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_finished"
    assert response.json()["error"]["message"].startswith("job has already succeeded;")
    served = client.get(f"/v1/jobs/{done['id']}", headers=tenant).json()
    assert served["metrics"] == {"student_accuracy": 0.4}
    with session_scope(settings) as session:  # what a worker sends to the callback URL
        assert job_resource_json(session, settings, done["id"]) == served


def test_events_are_oldest_first_after_an_id(client: TestClient, settings: Settings, tenant, dataset) -> None:  # noqa: F811
    job = submit(client, tenant, dataset["id"]).json()
    with session_scope(settings) as session:
        for index in range(4):
            add_event(session, job["id"], "progress", f"step {index}", stage="pretrain", progress=index / 4)
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant).json()
    messages = [e["message"] for e in events["items"]]
    assert messages[0] == f"job queued on {GPU_QUEUE}" and messages[1:] == [f"step {i}" for i in range(4)]
    ids = [e["id"] for e in events["items"]]
    assert ids == sorted(ids)
    after = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant, params={"after": ids[2]}).json()
    assert [e["id"] for e in after["items"]] == ids[3:]
    paged = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant, params={"limit": 2}).json()
    assert [e["id"] for e in paged["items"]] == ids[:2] and paged["next_cursor"] == str(ids[1])


def test_redis_broker_receives_the_job(settings: Settings) -> None:  # noqa: F811
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/15"
    try:
        connection = redis.Redis.from_url(url, socket_connect_timeout=2)
        connection.ping()
    except Exception as exc:  # no server: nothing to test against
        pytest.skip(f"Redis at {url} is unreachable: {exc}")
    connection.delete(CPU_QUEUE)
    with running_client(settings.model_copy(update={"broker_url": url})) as api:
        headers = new_tenant(settings)
        data = ready_dataset(api, headers)
        job = submit(api, headers, data["id"], {"ipc": 1, "device": "cpu"}).json()
        assert api.get("/readyz").status_code == 200
    raw = connection.lrange(CPU_QUEUE, 0, -1)
    connection.delete(CPU_QUEUE)
    headers_sent = [json.loads(m)["headers"] for m in raw]
    assert [(h["task"], h["id"]) for h in headers_sent] == [(RUN_JOB_TASK, job["id"])]


def test_unreachable_broker_answers_503_and_keeps_nothing(settings: Settings) -> None:  # noqa: F811
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with running_client(broken) as api:
        headers = new_tenant(broken)
        data = ready_dataset(api, headers, {"a": 3, "b": 3})
        response = submit(api, headers, data["id"])
        assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
        assert api.get("/v1/jobs", headers=headers).json()["items"] == []

