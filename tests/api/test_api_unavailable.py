"""The API while its database is down: 503 + Retry-After with the JSON error shape, never a 500.

Runs against a private PostgreSQL (`tests/support/private_servers.py`) that the test stops and starts again; the
shared server is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from private_servers import PrivatePostgres, private_postgres
from sqlalchemy.exc import IntegrityError

from api.errors import UNAVAILABLE_RETRY_AFTER_S
from api.main import create_app
from fd2_config.settings import Settings
from store.db import database_unavailable, dispose_engines, migrate, session_scope
from store.keys import create_tenant_key


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    with private_postgres(on_exit=dispose_engines) as server:
        yield server


def assert_503(response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert response.headers["retry-after"] == str(UNAVAILABLE_RETRY_AFTER_S)


def test_requests_during_a_database_restart_answer_503_then_work_again(postgres: PrivatePostgres, tmp_path: Path):
    settings = Settings(home=tmp_path / "home", database_url=postgres.create_database("api"), auth_cache_ttl_s=0)
    migrate(settings)
    with session_scope(settings) as session:
        headers = {"Authorization": f"Bearer {create_tenant_key(session, 'acme')}"}
    with TestClient(create_app(settings, run_migrations=False), raise_server_exceptions=False) as api:
        assert api.get("/v1/jobs", headers=headers).status_code == 200  # pooled connections now exist
        postgres.stop()
        for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/datasets"), ("GET", "/v1/jobs/job_" + "0" * 32),
                             ("GET", "/v1/jobs/job_" + "0" * 32 + "/events"), ("POST", "/v1/jobs/job_1/cancel")]:
            assert_503(api.request(method, path, headers=headers), "database_unavailable")
        submitted = api.post("/v1/jobs", headers=headers, json={"dataset": {"id": "ds_1"}, "spec": {}})
        assert_503(submitted, "database_unavailable")
        ready = api.get("/readyz")
        assert_503(ready, "not_ready")
        assert ready.json()["error"]["details"]["database"] != "ok"
        assert api.get("/metrics").status_code == 503

        postgres.start()
        assert api.get("/v1/jobs", headers=headers).status_code == 200
        assert api.get("/readyz").status_code == 200


def test_only_outages_count_as_unavailable():
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    assert database_unavailable(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert database_unavailable(PoolTimeoutError("QueuePool limit reached"))
    dropped = DBAPIError("SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True)
    assert database_unavailable(dropped)
    assert not database_unavailable(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not database_unavailable(ValueError("not a database error"))


def test_other_database_errors_stay_500(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    app = create_app(settings)

    def conflict() -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key value violates unique constraint"))

    app.add_api_route("/conflict", conflict)
    with TestClient(app, raise_server_exceptions=False) as api:
        response = api.get("/conflict")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert "duplicate" not in response.text
    dispose_engines()
