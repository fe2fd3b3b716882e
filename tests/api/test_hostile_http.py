"""Keys, ids, rate limits and the documented error statuses: the properties behind the HTTP cases of the
hostile corpus, checked directly."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest
from api_helpers import database_url, make_settings, new_tenant, ready_dataset, running_client
from fastapi.testclient import TestClient
from sqlalchemy import select

import store.keys
from api.errors import ApiError
from api.rate_limit import RateLimiter
from api.upload_slots import UploadSlots
from fd2_config.settings import Settings
from store.db import session_scope
from store.keys import authenticate, create_tenant_key, revoke_key
from store.models import ApiKey, is_public_id, new_id
from store.pagination import InvalidCursor, decode_cursor, encode_cursor


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("http")
    with database_url("sqlite", home) as url:
        yield make_settings(home, url, rate_limit_per_minute=60.0, rate_limit_burst=3)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as test_client:
        yield test_client


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refuses_past_the_burst_and_refills_with_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=30, burst=2, clock=clock)  # one token every 2 s
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0, 0]
    assert limiter.acquire("a") == 2
    assert limiter.acquire("b") == 0, "another key has its own bucket"
    clock.now += 2.0
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0


def test_rate_limit_off_never_refuses() -> None:
    limiter = RateLimiter(per_minute=0, burst=1)
    assert not limiter.enabled
    assert all(limiter.acquire("a") == 0 for _ in range(50))


def test_rate_limit_is_per_key_with_retry_after(client: TestClient, settings: Settings) -> None:
    busy, calm = new_tenant(settings), new_tenant(settings)
    answers = [client.get("/v1/jobs", headers=busy) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["details"]["retry_after_s"] == int(refused.headers["Retry-After"])
    assert client.get("/v1/jobs", headers=calm).status_code == 200
    assert client.get("/healthz").status_code == 200, "probes need no key and are not limited"


def test_ids_are_128_random_bits() -> None:
    ids = {new_id("job") for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"job_[0-9a-f]{32}", i) for i in ids)
    assert all(is_public_id(i) for i in ids)


def test_resources_get_unguessable_ids(settings: Settings) -> None:
    with running_client(settings.model_copy(update={"rate_limit_per_minute": 0.0})) as api:
        headers = new_tenant(settings)
        first, second = (ready_dataset(api, headers, {"a": 2, "b": 2})["id"] for _ in range(2))
    assert re.fullmatch(r"ds_[0-9a-f]{32}", first) and re.fullmatch(r"ds_[0-9a-f]{32}", second)
    differing = sum(a != b for a, b in zip(first[3:], second[3:], strict=True))
    assert differing > 8, "consecutive ids must share no structure"


@pytest.mark.parametrize("text", ["", "job_\x00", "a" * 65, "job x", "job_1\n", "../etc", None])
def test_odd_ids_are_unknown_without_a_query(text: object) -> None:
    assert not is_public_id(text)  # type: ignore[arg-type]


def test_cursor_with_an_odd_row_id_is_invalid() -> None:
    from datetime import datetime, timezone

    good = encode_cursor(datetime(2024, 1, 1, tzinfo=timezone.utc), "job_abc")
    assert decode_cursor(good)[1] == "job_abc"
    with pytest.raises(InvalidCursor):
        decode_cursor(encode_cursor(datetime(2024, 1, 1, tzinfo=timezone.utc), "job\x00"))


def test_keys_are_stored_only_as_hashes_and_compared_in_constant_time(settings: Settings, monkeypatch) -> None:
    with session_scope(settings) as session:
        key = create_tenant_key(session, "hashing")
    with session_scope(settings) as session:
        rows = session.scalars(select(ApiKey)).all()
        stored = [value for row in rows for value in (row.prefix, row.key_hash)]
        assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored
    compared: list[tuple[str, str]] = []
    real = store.keys.hmac.compare_digest
    monkeypatch.setattr(store.keys.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with session_scope(settings) as session:
        assert authenticate(session, key) is not None
        assert authenticate(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert len(compared) == 2


def test_revoked_key_is_refused_once_the_cache_expires(settings: Settings) -> None:
    uncached = settings.model_copy(update={"auth_cache_ttl_s": 0.0})
    with running_client(uncached) as api:
        headers = new_tenant(uncached)
        assert api.get("/v1/datasets", headers=headers).status_code == 200
        with session_scope(uncached) as session:
            assert revoke_key(session, headers["Authorization"].removeprefix("Bearer "))
        refused = api.get("/v1/datasets", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_every_v1_operation_documents_its_error_statuses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("401", "422", "429"):
                assert status in responses, f"{method.upper()} {path} does not document {status}"
                body = responses[status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}


def test_uploads_in_flight_are_bounded_per_tenant() -> None:
    slots = UploadSlots(per_tenant=2)
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(ApiError) as refused, slots.hold("a"):
            pass
        assert refused.value.status_code == 429 and refused.value.code == "too_many_uploads"
        assert "Retry-After" in (refused.value.headers or {})
        with slots.hold("b"):
            pass
    with slots.hold("a"), slots.hold("a"):  # both slots came back
        pass


def test_uploads_wait_for_free_disk_space(settings: Settings) -> None:
    starved = settings.model_copy(update={"min_free_disk_bytes": 2**62, "rate_limit_per_minute": 0.0})
    with running_client(starved) as api:
        headers = new_tenant(starved)
        refused = api.post("/v1/datasets", headers=headers, files={"file": ("d.zip", b"PK", "application/zip")})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "insufficient_storage"
        assert "Retry-After" in refused.headers
        assert api.get("/v1/datasets", headers=headers).json()["items"] == []


def test_validation_details_are_bounded(client: TestClient, settings: Settings) -> None:
    headers = new_tenant(settings)
    body = {"dataset": {"id": "ds_x"}, "spec": {f"field_{i}": i for i in range(500)}, "x" * 5000: 1}
    refused = client.post("/v1/jobs", headers=headers, json=body)
    assert refused.status_code == 422
    details = refused.json()["error"]["details"]
    assert 0 < len(details) <= 50
    assert all(len(str(part)) <= 200 for d in details for part in d["loc"])
