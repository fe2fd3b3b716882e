"""Shared fixtures and builders for the store and API tests.

Every test module runs against both backends: a SQLite file and a fresh PostgreSQL schema (dropped at the
end). PostgreSQL comes from `FD2_TEST_POSTGRES_URL` (default: local trust auth, database `test`); when it is
unreachable those cases are skipped with the reason.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from fd2_config.settings import Settings
from store.db import dispose_engines, session_scope
from store.keys import authenticate, create_tenant_key

POSTGRES_URL = os.environ.get("FD2_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@lru_cache(maxsize=1)
def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used (None when it can)."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means: skip, and say why
        return f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}"
    return None


@contextmanager
def database_url(backend: str, folder: Path) -> Iterator[str]:
    """A database URL of a brand-new, empty database for `backend`, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'fd2.db'}"
        return
    reason = postgres_unavailable()
    if reason:
        print(reason)
        pytest.skip(reason)
    import psycopg

    schema = f"fd2t_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        dispose_engines()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def make_settings(home: Path, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"home": home, "database_url": url, "broker_url": "", "auth_cache_ttl_s": 0.5}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module", params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp(f"fd2-{request.param}")
    with database_url(request.param, home) as url:
        yield make_settings(home, url)


@contextmanager
def running_client(settings: Settings, **kwargs: Any) -> Iterator[TestClient]:
    """A TestClient around a fresh app (start-up migrations included)."""
    with TestClient(create_app(settings), **kwargs) as client:
        yield client


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as test_client:
        yield test_client


def new_tenant(settings: Settings, name: str | None = None) -> dict[str, str]:
    """Authorization headers for a new key of a new (uniquely named) tenant."""
    with session_scope(settings) as session:
        key = create_tenant_key(session, name or f"tenant-{secrets.token_hex(4)}")
    return {"Authorization": f"Bearer {key}"}


def tenant_id(settings: Settings, headers: dict[str, str]) -> str:
    with session_scope(settings) as session:
        tenant = authenticate(session, headers["Authorization"].removeprefix("Bearer "))
        assert tenant is not None
        return tenant.id


def png_bytes(shade: int = 0, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade % 256, (shade * 7) % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def image_tree(classes: dict[str, int], split: str | None = "train", top: str | None = None) -> dict[str, bytes]:
    """{archive member: bytes} for `count` tiny PNGs per class, under `[top/][split/]<class>/`."""
    prefix = "/".join(part for part in (top, split) if part)
    files = {}
    for name, count in classes.items():
        for index in range(count):
            files[f"{prefix}/{name}/{index}.png".lstrip("/")] = png_bytes(index + len(name) * 31)
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(client: TestClient, headers: dict[str, str], data: bytes, filename: str = "data.zip",
           name: str | None = None) -> Any:
    form = {"name": name} if name is not None else None
    return client.post("/v1/datasets", headers=headers, files={"file": (filename, data, "application/zip")},
                       data=form)


def ready_dataset(client: TestClient, headers: dict[str, str], classes: dict[str, int] | None = None) -> dict:
    response = upload(client, headers, zip_bytes(image_tree(classes or {"wren": 6, "finch": 6, "tit": 6})))
    assert response.status_code == 201, response.text
    return response.json()


def submit(client: TestClient, headers: dict[str, str], dataset_id: str, spec: dict | None = None,
           **extra: Any) -> Any:
    body = {"dataset": {"id": dataset_id}, "spec": spec if spec is not None else {"ipc": 1}}
    request_headers = dict(headers)
    if "idempotency_key" in extra:
        request_headers["Idempotency-Key"] = extra.pop("idempotency_key")
    body.update(extra)
    return client.post("/v1/jobs", headers=request_headers, json=body)


def dataset_dirs(settings: Settings) -> list[str]:
    """Entries under the datasets folder, ignoring the (empty) in-flight upload folder."""
    assert settings.datasets_dir is not None
    if not settings.datasets_dir.exists():
        return []
    names = []
    for entry in settings.datasets_dir.iterdir():
        if entry.name == ".incoming" and not any(entry.iterdir()):
            continue
        names.append(entry.name)
    return sorted(names)
