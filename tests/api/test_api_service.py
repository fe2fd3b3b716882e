"""Cross-cutting behaviour of the API: auth, tenant isolation, error shape, probes, metrics, OpenAPI, and
the promise that importing the app never loads torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    new_tenant,
    ready_dataset,
    running_client,
    settings,
    submit,
    tenant_id,
)
from fastapi.testclient import TestClient

from api.main import create_app
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.db import session_scope
from store.keys import revoke_key

REPO = Path(__file__).resolve().parents[2]


def test_v1_needs_a_valid_key(client: TestClient) -> None:  # noqa: F811
    for headers in ({}, {"Authorization": "Bearer fd2_00000000_nope-nope-nope-nope-nope"},
                    {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_key_stops_working_within_the_cache_time(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope(settings) as session:
        assert revoke_key(session, headers["Authorization"].removeprefix("Bearer "))
    deadline = time.monotonic() + settings.auth_cache_ttl_s + 5
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = client.get("/v1/jobs", headers=headers).status_code
        time.sleep(0.1)
    assert status == 401


def test_other_tenants_ids_look_unknown(client: TestClient, settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    owner, stranger = new_tenant(settings), new_tenant(settings)
    dataset = ready_dataset(client, owner, {"a": 3, "b": 3})
    job = submit(client, owner, dataset["id"]).json()
    (tmp_path / "report.json").write_text("{}")
    with session_scope(settings) as session:
        register_artifact(session, job["id"], "report.json", tmp_path / "report.json")
    paths = [
        ("GET", f"/v1/datasets/{dataset['id']}"), ("DELETE", f"/v1/datasets/{dataset['id']}"),
        ("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"), ("GET", f"/v1/jobs/{job['id']}/artifacts/report.json"),
    ]
    for method, path in paths:
        foreign = client.request(method, path, headers=stranger)
        unknown = client.request(method, path.replace(job["id"], "job_0").replace(dataset["id"], "ds_0"),
                                 headers=stranger)
        assert foreign.status_code == unknown.status_code == 404, path
        assert foreign.json() == unknown.json()
        if method == "GET":
            assert client.get(path, headers=owner).status_code == 200, path
    assert client.get("/v1/jobs", headers=stranger).json()["items"] == []
    assert client.get("/v1/datasets", headers=stranger).json()["items"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=owner).json()["status"] == "queued"


def test_framework_errors_use_the_error_shape(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    cases = [
        (client.get("/no/such/path"), 404, "not_found"),
        (client.put("/v1/jobs", headers=headers), 405, "method_not_allowed"),
        (client.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=b"{not json"),
         422, "validation_error"),
        (client.post("/v1/jobs", headers=headers, json={"dataset": {"id": "x"}, "surprise": 1}), 422,
         "validation_error"),
        (client.get("/v1/jobs", headers=headers, params={"limit": 0}), 422, "validation_error"),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
        assert body["error"]["code"] == code


def test_unexpected_errors_answer_500_without_a_trace(settings: Settings) -> None:  # noqa: F811
    app = create_app(settings)

    def explode() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as api:
        response = api.get("/explode")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal server error",
                                         "details": None}}


def test_health_and_readiness(client: TestClient, settings: Settings) -> None:  # noqa: F811
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "readiness_timeout_s": 1.0})
    with TestClient(create_app(down, run_migrations=False)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    checks = response.json()["error"]["details"]
    assert checks["database"] == "ok" and checks["broker"] != "ok"
    no_db = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/none"})
    with TestClient(create_app(no_db, run_migrations=False)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["details"]["database"] != "ok"


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_count_requests_by_route_and_jobs_by_status(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    dataset = ready_dataset(client, headers, {"a": 3, "b": 3})
    before = client.get("/metrics").text
    job = submit(client, headers, dataset["id"]).json()
    for _ in range(3):
        client.get(f"/v1/jobs/{job['id']}", headers=headers)
    client.get("/v1/jobs/job_missing", headers=headers)
    after = client.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    route = "/v1/jobs/{job_id}"
    ok_before = _sample(before, "fd2_http_requests_total", method="GET", route=route, status="200") \
        if f'route="{route}",status="200"' in before else 0.0
    assert _sample(text, "fd2_http_requests_total", method="GET", route=route, status="200") - ok_before == 3
    assert _sample(text, "fd2_http_requests_total", method="GET", route=route, status="404") >= 1
    assert _sample(text, "fd2_http_request_duration_seconds_count", method="GET", route=route) >= 4
    queued_before = _sample(before, "fd2_jobs", status="queued")
    assert _sample(text, "fd2_jobs", status="queued") == queued_before + 1
    assert _sample(text, "fd2_queue_depth", queue="fd2.gpu") >= 1


def test_openapi_documents_the_spec_fields(client: TestClient) -> None:  # noqa: F811
    schema = client.get("/openapi.json").json()
    spec = schema["components"]["schemas"]["JobSpec"]
    assert spec["properties"]["ipc"]["minimum"] == 1 and spec["properties"]["ipc"]["description"]
    assert spec["additionalProperties"] is False
    create = schema["components"]["schemas"]["JobCreate"]
    assert create["properties"]["spec"]["allOf"] == [{"$ref": "#/components/schemas/JobSpec"}]
    assert create["properties"]["spec"]["description"]
    for path in ("/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifacts/{name}", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_importing_the_app_does_not_import_torch() -> None:
    code = "import sys, api.main; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("header", ["Bearer", "bearer"])
def test_bearer_scheme_is_case_insensitive(client: TestClient, settings: Settings, header: str) -> None:  # noqa: F811
    key = new_tenant(settings)["Authorization"].removeprefix("Bearer ")
    assert client.get("/v1/datasets", headers={"Authorization": f"{header} {key}"}).status_code == 200
