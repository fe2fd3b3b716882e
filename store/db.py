"""Engines, sessions and schema migrations for SQLite (embedded) and PostgreSQL (by URL).

One engine per database URL and process.
SQLite gets WAL (readers never block the writer), a busy timeout (writers
queue instead of failing) and enforced foreign keys.
Migrations run under a lock so that several API processes starting together
apply each revision once.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from fd2_config.settings import Settings, get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Arbitrary constant identifying the migration lock among PostgreSQL advisory locks.
MIGRATION_LOCK_ID = 0x0FD2_0001

_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Send plain `postgresql://` (and `postgres://`) URLs to the psycopg 3
    driver that is installed."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """A new engine for `url` with the per-backend settings described in the module docstring."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=20,
            max_overflow=20,
        )
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    # Pre-ping: a connection that died with a server restart is replaced
    # instead of failing a request.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30)


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot serve us right now rather
    than that a statement is wrong.

    That is: the server is down, restarting or refusing connections, a connection dropped
    mid-transaction (`connection_invalidated`), the pool is exhausted, or SQLite is busy.
    The worker retries such errors and the API answers them with 503; everything else (constraint
    violations, bad SQL) is a real failure.
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError))


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the configured database)."""
    url = normalize_url(url or get_settings().database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_db_engine(url)
        return engine


def is_sqlite(url: str) -> bool:
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def get_thread_local_engine(url: str) -> Engine:
    """A SQLite engine with one connection per thread (for reads on an event loop thread).

    Such reads never wait for the shared pool, so they cannot stall behind connections that only the
    same event loop would release.
    """
    key = f"thread-local:{normalize_url(url)}"
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if not is_sqlite(url):
                raise ValueError("thread-local engines are for SQLite files only")
            engine = create_engine(
                normalize_url(url),
                poolclass=SingletonThreadPool,
                pool_size=8,
                connect_args={"timeout": 5, "check_same_thread": False},
            )
            event.listen(engine, "connect", _set_sqlite_pragmas)
            _engines[key] = engine
        return engine


@contextmanager
def read_session(url: str) -> Iterator[Session]:
    """A short session on the calling thread's own SQLite connection (nothing to commit)."""
    session = Session(bind=get_thread_local_engine(url), expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = normalize_url(url or get_settings().database_url)
    factory = _sessionmakers.get(url)
    if factory is None:
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        _sessionmakers[url] = factory
    return factory


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back when it raises."""
    url = (settings or get_settings()).database_url
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection (tests switching databases, processes after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _sessionmakers.clear()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Any]:
    """Serialise migrations: an advisory lock on PostgreSQL, a lock file
    beside the SQLite database."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            yield connection
        return
    database = engine.url.database
    lock_path = Path(f"{database}.migrate.lock") if database and database != ":memory:" else None
    if lock_path is None:
        with engine.begin() as connection:
            yield connection
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with engine.begin() as connection:
                yield connection
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(settings: Settings | None = None, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision` (start-up of the API, `fd2
    migrate`, `fd2 serve`)."""
    from alembic import command

    settings = settings or get_settings()
    settings.ensure_dirs()
    engine = get_engine(settings.database_url)
    config = alembic_config(normalize_url(settings.database_url))
    with _migration_lock(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(settings: Settings | None = None) -> str | None:
    """The revision the database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    engine = get_engine((settings or get_settings()).database_url)
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
