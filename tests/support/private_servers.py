"""Private Redis and PostgreSQL servers for tests that kill, stop and restart them.

The shared servers (6379, 5432) are never touched: each server here listens on 127.0.0.1 on a free port and
keeps its files in a temporary folder that is removed afterwards. Redis runs without persistence (`--save ""
--appendonly no`), so a restart comes back empty, as a cache-style Redis does in production. PostgreSQL
refuses to run as root, so under root `initdb` and `pg_ctl` run as the unprivileged user `fd2test` (created
when missing) through `runuser`. `redis_unavailable()` / `postgres_unavailable()` say why a server cannot
be started here (the tests skip with that reason).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service_harness import free_port

PG_USER = "fd2test"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_S = 60.0


def _wait_for_port(port: int, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


# ---------------------------------------------------------------- Redis


def redis_unavailable() -> str | None:
    """None when a private redis-server can be started, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    return None


@dataclass
class PrivateRedis:
    """One `redis-server` child without persistence; `kill()` + `start()` is a restart that loses every key."""

    log_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"]
        with (self.log_dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        process = self.process
        if not _wait_for_port(self.port, START_TIMEOUT_S, lambda: process.poll() is None):
            self.kill()
            raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.log_dir / 'redis.log'}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or an out-of-memory kill would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()


# ---------------------------------------------------------------- PostgreSQL


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                   else 0)
    for folder in reversed(found):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _as_postgres_user() -> list[str] | str:
    """The command prefix that runs PostgreSQL's tools as a non-root user, or why that is impossible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started as an unprivileged user"
    exists = subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode == 0
    if not exists:
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            capture_output=True, text=True,
        )
        if created.returncode != 0 and subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
            return f"cannot create the user {PG_USER!r} for PostgreSQL: {created.stderr.strip()}"
    return ["runuser", "-u", PG_USER, "--"]


def postgres_unavailable() -> str | None:
    """None when a private PostgreSQL can be started here, else why not."""
    if _postgres_bin() is None:
        return f"PostgreSQL server binaries (initdb, pg_ctl) not found under {PG_BIN_GLOB}"
    prefix = _as_postgres_user()
    return prefix if isinstance(prefix, str) else None


@dataclass
class PrivatePostgres:
    """A throw-away cluster (`initdb`, trust authentication, superuser `postgres`) on a free port.

    `stop()` is a fast shutdown (open sessions are terminated, as in a restart for maintenance); `start()`
    brings the same cluster back with its data.
    """

    port: int = field(default_factory=free_port)
    root: Path | None = None

    def __post_init__(self) -> None:
        bin_dir = _postgres_bin()
        prefix = _as_postgres_user()
        if bin_dir is None or isinstance(prefix, str):
            raise RuntimeError(postgres_unavailable() or "PostgreSQL unavailable")
        self._bin, self._prefix = bin_dir, prefix

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, timeout_s: float = START_TIMEOUT_S) -> None:
        result = subprocess.run([*self._prefix, str(self._bin / tool), *args], capture_output=True, text=True,
                                timeout=timeout_s, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")

    def init(self) -> PrivatePostgres:
        # Under /tmp (world-traversable) rather than pytest's root-only folders, owned by the server's user.
        self.root = Path(tempfile.mkdtemp(prefix="fd2-pg-"))
        if self._prefix:
            shutil.chown(self.root, user=PG_USER)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> PrivatePostgres:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", options, "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, limit: int = 4000) -> str:
        log = self.root / "server.log" if self.root else None
        return log.read_text(errors="replace")[-limit:] if log and log.exists() else ""

    def destroy(self) -> None:
        """Stop the server (immediate) and remove its folder."""
        if self.root is None:
            return
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[PrivateRedis]:
    """A started private Redis in `folder`, killed afterwards; skips the test (with the reason) where it can't run."""
    import pytest

    unavailable = redis_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    server = PrivateRedis(folder).start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def private_postgres(on_exit: Callable[[], None] = lambda: None) -> Iterator[PrivatePostgres]:
    """A started private PostgreSQL, destroyed afterwards (after `on_exit`, e.g. disposing engines); skips the
    test (with the reason) where it can't run."""
    import pytest

    unavailable = postgres_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    server = PrivatePostgres().init().start()
    try:
        yield server
    finally:
        on_exit()
        server.destroy()
