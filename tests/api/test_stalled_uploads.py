"""Stalled and slow uploads against a real uvicorn, from raw sockets that send headers and part of a
body.

As many uploads as the database pool has connections stay in flight (one tenant's two stalled, the
others' dribbling a byte a second): another tenant's upload and submit still answer at once, since
no upload holds a connection while it waits for its body; the stalled ones answer 408
`upload_timeout` after the stall timeout and their tenant's slots come back; the dribbling ones
answer 408 at the body timeout; nothing stays on disk. Then `BodyClock` and `short_transaction`
alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from api_helpers import image_tree, postgres_unavailable, submit, upload, zip_bytes
from raw_uploads import Dribbler, RawUpload, staging_files, start_api, tenant_key, uploads_in_flight
from service_harness import ServiceStack, embedded_settings, fresh_postgres_database, service_env

from api.deps import short_transaction
from api.errors import ApiError
from api.upload_timeouts import BodyClock, UploadTimeouts
from fd2_config.settings import Settings
from store.datasets import tenant_storage_usage
from store.db import dispose_engines, get_engine, get_sessionmaker

STALL_S = 4.0
BODY_S = 16.0
# "At once" on a busy test machine; a pool held by stalled uploads made it 30 s and a 503.
PROMPT_S = 10.0
SMALL_DATASET = {"wren": 6, "finch": 6, "tit": 6}


@dataclass
class Service:
    stack: ServiceStack
    settings: Settings

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    with contextlib.ExitStack() as resources:
        values = {"FD2_HOME": str(tmp_path / "home"), "FD2_UPLOAD_STALL_TIMEOUT_S": str(STALL_S),
                  "FD2_UPLOAD_BODY_TIMEOUT_S": str(BODY_S), "FD2_MIN_FREE_DISK_BYTES": "0"}
        if request.param == "postgresql":
            reason = postgres_unavailable()
            if reason:
                pytest.skip(reason)
            values["FD2_DATABASE_URL"] = resources.enter_context(fresh_postgres_database())
            resources.callback(dispose_engines)  # before the database is dropped
        stack = ServiceStack(request.param, service_env(values), tmp_path / "logs")
        resources.callback(stack.stop)
        start_api(stack)
        settings = embedded_settings(tmp_path / "home", database_url=values.get("FD2_DATABASE_URL", ""),
                                     upload_stall_timeout_s=STALL_S, upload_body_timeout_s=BODY_S)
        try:
            yield Service(stack, settings)
        finally:
            print(stack.log_tail())


def pool_capacity(settings: Settings) -> int:
    """Connections the API process's pool hands out at most (the same engine settings as the
    service's)."""
    pool = get_engine(settings.database_url).pool
    return pool.size() + pool._max_overflow  # type: ignore[attr-defined]


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.mark.service
def test_stalled_uploads_hold_no_connection_and_time_out(service: Service) -> None:
    settings = service.settings
    tenants = [tenant_key(settings, f"slow-{index}") for index in range(math.ceil(pool_capacity(settings) / 2))]
    stalled_key, other_key = tenants[0], tenant_key(settings, "other")
    started = time.monotonic()
    stalled = [RawUpload(service.stack.port, stalled_key) for _ in range(2)]
    dribbling = [RawUpload(service.stack.port, key) for key in tenants[1:] for _ in range(2)]
    dribbler = Dribbler(dribbling)  # a byte a second: never stalled, ended by the body timeout
    try:
        in_flight = 2 * len(tenants)
        deadline = time.monotonic() + 30
        while len(staging_files(settings)) < in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(staging_files(settings)) == in_flight, "every upload should be streaming its body"

        with service.client(stalled_key) as client:
            third = upload(client, {}, b"PK\x05\x06" + b"\0" * 18)
            assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_uploads"

        with service.client(other_key) as client:
            response, took = timed(lambda: upload(client, {}, zip_bytes(image_tree(SMALL_DATASET))))
            assert response.status_code == 201, response.text
            assert took < PROMPT_S, f"another tenant's upload took {took:.1f} s"
            response, took = timed(lambda: submit(client, {}, response.json()["id"], {"ipc": 1}))
            assert response.status_code == 202, response.text
            assert took < PROMPT_S, f"another tenant's submit took {took:.1f} s"

        for raw in stalled:
            status, body = raw.answer(timeout_s=STALL_S + 30)
            assert status == 408, body
            assert body["error"]["code"] == "upload_timeout" and body["error"]["details"]["timeout"] == "stall"
        with service.client(stalled_key) as client:  # its two slots are back
            response = upload(client, {}, zip_bytes(image_tree(SMALL_DATASET)))
            assert response.status_code == 201, response.text

        for raw in dribbling:
            status, body = raw.answer(timeout_s=max(started + BODY_S - time.monotonic(), 0) + 30)
            assert status == 408, body
            assert body["error"]["code"] == "upload_timeout" and body["error"]["details"]["timeout"] == "body"
        assert uploads_in_flight(settings) == [], "a timed-out upload left its staging or lease file"
        assert sorted(p.name for p in settings.datasets_dir.iterdir() if p.name != ".incoming") == sorted(
            datasets_of(service, other_key) + datasets_of(service, stalled_key))
    finally:
        dribbler.stop()
        for raw in stalled + dribbling:
            raw.close()


def datasets_of(service: Service, key: str) -> list[str]:
    with service.client(key) as client:
        return [item["id"] for item in client.get("/v1/datasets").json()["items"]]


# ---------------------------------------------------------------- the parts alone


async def chunks_every(delays: list[float]) -> AsyncIterator[bytes]:
    for delay in delays:
        await anyio.sleep(delay)
        yield b"x" * 10


async def read_all(timeouts: UploadTimeouts, chunks: AsyncIterator[bytes]) -> int:
    clock = BodyClock(timeouts)
    while await clock.read(chunks) is not None:
        pass
    return clock.received


@pytest.mark.parametrize(("delays", "kind", "received"), [
    ([0.0, 0.0, 0.6], "stall", 20),  # silent longer than the stall timeout
    ([0.2] * 10, "body", 50),  # never silent that long, but slower than the body timeout in all
])
def test_the_body_clock_ends_a_stalled_or_slow_body(delays: list[float], kind: str, received: int) -> None:
    with pytest.raises(ApiError) as refused:
        anyio.run(read_all, UploadTimeouts(body_s=1.1, stall_s=0.4), chunks_every(delays))
    error = refused.value
    assert error.status_code == 408 and error.code == "upload_timeout" and error.headers == {"Connection": "close"}
    assert error.details["timeout"] == kind and error.details["received_bytes"] == received


def test_the_body_clock_passes_a_steady_body() -> None:
    assert anyio.run(read_all, UploadTimeouts(body_s=5.0, stall_s=0.5), chunks_every([0.05] * 5)) == 50


def test_upload_timeouts_are_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FD2_UPLOAD_BODY_TIMEOUT_S", raising=False)
    monkeypatch.delenv("FD2_UPLOAD_STALL_TIMEOUT_S", raising=False)
    assert UploadTimeouts.of(Settings(home=tmp_path)) == UploadTimeouts(body_s=3600.0, stall_s=60.0)
    monkeypatch.setenv("FD2_UPLOAD_BODY_TIMEOUT_S", "90")
    monkeypatch.setenv("FD2_UPLOAD_STALL_TIMEOUT_S", "7.5")
    assert UploadTimeouts.of(Settings(home=tmp_path)) == UploadTimeouts(body_s=90.0, stall_s=7.5)


def test_a_short_transaction_gives_its_connection_back(tmp_path: Path) -> None:
    from store.db import migrate

    settings = embedded_settings(tmp_path)
    migrate(settings)
    pool = get_engine(settings.database_url).pool
    session = get_sessionmaker(settings.database_url)()
    try:
        usage = anyio.run(short_transaction, session, tenant_storage_usage, "nobody")
        assert usage.total == 0
        assert pool.checkedout() == 0, "the session still holds a pooled connection"
    finally:
        session.close()
