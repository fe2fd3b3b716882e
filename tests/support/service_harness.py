"""Test helpers: isolated settings and seeded rows for worker tests, and real service processes.

`ServiceStack` starts a real `uvicorn api.main:app` and a real Celery worker (`python -m fd2_cli
worker`, solo pool) as child processes sharing one configuration: **embedded** (SQLite + folder
broker under a temporary FD2_HOME) or **distributed** (a fresh PostgreSQL database + Redis db 15,
flushed first); `mode_stack` starts one for a mode.
Every child's output goes to a log file; `log_tail()` gives what a failing test needs to show.
The client helpers at the end (`upload`, `submit`, `get_job`, `wait_final`) are what the end-to-end
tests say through the REST API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_URL = os.environ.get("FD2_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("FD2_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Short enough that a killed worker's job is detected quickly in tests; the
# heartbeat follows from it.
TEST_STALE_HEARTBEAT_S = 10.0
FD2_ENV_PREFIX = "FD2_"
WORKER_READY = " ready."  # Celery's "<node name> ready." line, printed once it consumes


# ---------------------------------------------------------------- in-process settings and rows


def embedded_settings(home: Path, **overrides: Any) -> Any:
    """Settings for an embedded service under `home`, ignoring any FD2_* variables of the caller."""
    from fd2_config.settings import Settings

    values: dict[str, Any] = {
        "home": home,
        "database_url": "",
        "broker_url": "",
        "stale_heartbeat_s": TEST_STALE_HEARTBEAT_S,
        **overrides,
    }
    return Settings(**values)


def write_fgsynth_folder(out: Path, *, classes: int = 4, train: int = 12, test: int = 4) -> Path:
    """The built-in dataset as an ImageFolder tree (what an uploaded archive becomes)."""
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=classes, image_size=32, train_per_class=train, test_per_class=test)
    return fgsynth.write_imagefolder(data, out)


def seed_job(
    settings: Any,
    spec: dict[str, Any],
    *,
    dataset_folder: Path | None = None,
    tenant: str = "acme",
    callback_url: str | None = None,
    queue: str = "fd2.cpu",
) -> str:
    """Insert a tenant, a ready dataset row for `dataset_folder` and a
    queued job; returns the job id."""
    from fd2_core.spec_resolution import resolve_spec
    from store.datasets import create_dataset
    from store.db import session_scope
    from store.jobs import create_job
    from store.keys import get_or_create_tenant
    from store.models import new_id

    with session_scope(settings) as session:
        tenant_row = get_or_create_tenant(session, tenant)
        dataset_id = None
        if dataset_folder is not None:
            classes = sorted(p.name for p in (dataset_folder / "train").iterdir())
            summary = {
                "num_classes": len(classes),
                "classes": classes,
                "splits": {"train": 0, "test": 0},
                "per_class": {},
            }
            dataset = create_dataset(
                session,
                dataset_id=new_id("ds"),
                tenant_id=tenant_row.id,
                name="fgsynth",
                summary=summary,
                path=dataset_folder,
                size_bytes=0,
                has_test_split=True,
            )
            dataset_id = dataset.id
        job = create_job(
            session,
            tenant_id=tenant_row.id,
            spec=resolve_spec(spec).model_dump(mode="json"),
            queue=queue,
            dataset_id=dataset_id,
            callback_url=callback_url,
        )
        return job.id


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, *, interval_s: float = 0.2, what: str = ""
) -> Any:
    """Poll until `predicate()` is truthy and return it; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or predicate}")
        time.sleep(interval_s)


# ---------------------------------------------------------------- child processes


def api_ready(base_url: str) -> bool:
    """Whether the API at `base_url` answers its readiness probe now."""
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ChildProcess:
    """A child with its output in `log_path`; stopping is idempotent and
    always ends in a reaped process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_offset: int = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; the exit code."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive:
            self.process.kill()
        self.process.wait()

    def new_output(self) -> str:
        """Log text written since the previous call."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            data = handle.read()
        self._log_offset += len(data)
        return data.decode("utf-8", errors="replace")


def start_child(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> ChildProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return ChildProcess(name, process, log_path)


def service_env(overrides: dict[str, str]) -> dict[str, str]:
    """The caller's environment without FD2_* settings, plus `overrides` (a
    child sees only these)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(FD2_ENV_PREFIX)}
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


# ---------------------------------------------------------------- modes


def postgres_available() -> str | None:
    """None when PostgreSQL and Redis answer, else why not."""
    try:
        import psycopg
        import redis

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            pass
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # any failure means the distributed mode cannot run here
        return f"PostgreSQL/Redis not reachable: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database next to the admin one; dropped afterwards. Yields its URL."""
    import psycopg
    from psycopg import sql

    name = f"fd2_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@dataclass
class ServiceStack:
    """uvicorn + one Celery worker for one mode; workers can be killed and restarted by a test."""

    mode: str
    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    api: ChildProcess | None = None
    workers: list[ChildProcess] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker(self) -> ChildProcess:
        return self.workers[-1]

    def start(self, ready_timeout_s: float = 90.0) -> ServiceStack:
        self.api = start_child(
            "api",
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", f"--port={self.port}"],
            self.env,
            self.log_dir,
        )
        self.wait_ready(ready_timeout_s)
        self.start_worker()
        return self

    def start_worker(self) -> ChildProcess:
        command = [sys.executable, "-m", "fd2_cli", "worker", "--queues=fd2.gpu,fd2.cpu"]
        worker = start_child("worker", command, self.env, self.log_dir)
        self.workers.append(worker)
        wait_until(
            lambda: WORKER_READY in worker.log_path.read_text(errors="replace") or not worker.alive,
            timeout_s=90,
            what="the worker to be ready",
        )
        assert worker.alive, f"worker exited at start:\n{worker.log_path.read_text(errors='replace')}"
        return worker

    def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            assert self.api is not None
            if not self.api.alive:
                raise AssertionError(f"api exited:\n{self.api.log_path.read_text(errors='replace')}")
            return api_ready(self.base_url)

        wait_until(ready, timeout_s, interval_s=0.3, what="/readyz")

    def create_key(self, tenant: str) -> str:
        """A tenant key through the real `fd2 keys create` command (stdout is only the key)."""
        result = subprocess.run(
            [sys.executable, "-m", "fd2_cli", "keys", "create", tenant],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return result.stdout.strip()

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def children(self) -> list[ChildProcess]:
        return [child for child in [self.api, *self.workers] if child is not None]

    def log_tail(self, limit: int = 12_000) -> str:
        """Output of every child since the previous call, newest last
        (shown by pytest on failure)."""
        parts = []
        for child in self.children():
            text = child.new_output()
            if text:
                parts.append(f"----- {child.name} (pid {child.process.pid}) -----\n{text[-limit:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.api is not None:
            self.api.stop()


def mode_stack(mode: str, root: Path, resources: contextlib.ExitStack, env: dict[str, str] | None = None,
               workers: int = 1) -> ServiceStack:
    """A started API + `workers` workers for `mode` (`embedded` or
    `distributed`) under `root`, stopped when `resources` closes; skips the
    test when the distributed mode's servers are not reachable."""
    import pytest

    values = {"FD2_HOME": str(root / "home"), "FD2_STALE_HEARTBEAT_S": str(TEST_STALE_HEARTBEAT_S), **(env or {})}
    if mode == "distributed":
        unavailable = postgres_available()
        if unavailable:
            pytest.skip(unavailable)
        flush_redis(REDIS_TEST_URL)
        values["FD2_DATABASE_URL"] = resources.enter_context(fresh_postgres_database())
        values["FD2_BROKER_URL"] = REDIS_TEST_URL
    service = ServiceStack(mode, service_env(values), root / "logs")
    resources.callback(service.stop)
    try:
        service.start()
        for _ in range(workers - 1):
            service.start_worker()
    except BaseException:
        print(service.log_tail())
        raise
    return service


# ---------------------------------------------------------------- the REST
# API as a client speaks it

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def upload(client: httpx.Client, archive: Path, name: str = "birds") -> str:
    """Upload a dataset archive; its id."""
    with archive.open("rb") as handle:
        response = client.post("/v1/datasets", files={"file": (archive.name, handle, "application/zip")},
                               data={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(client: httpx.Client, dataset_id: str, spec: dict[str, Any]) -> str:
    """Submit a job; its id."""
    response = client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": spec})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = 240.0) -> dict[str, Any]:
    """The job resource once the job has ended."""
    return wait_until(lambda: (job := get_job(client, job_id))["status"] in FINAL_STATUSES and job, timeout_s,
                      interval_s=0.5, what=f"job {job_id} to end")
