"""Shared route dependencies as typed aliases: a route's signature says what it needs.

Two ways to reach the database:
- `ReaderDep` runs a read-only store function with a session of its own. A local SQLite file is
  read inline on the event loop (WAL readers never wait for writers, and a ~100 µs indexed read
  costs less than a thread hand-off); a server database is read in the thread pool. This is what
  the polling endpoints use.
- `SessionDep` is a session for routes that write; they call the store in one thread-pool call and
  commit. Its scope is the route function, so the pooled connection goes back before the response
  is sent. A route that waits on its client between store calls (the dataset upload waits on its
  body for as long as the client takes) makes each call through `short_transaction`, which gives
  the connection back as soon as the call returns: a slow client never holds a pooled connection.
Dependencies that do no I/O are `async def`: a plain `def` would cost a thread hand-off per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import CurrentTenant, TenantCache, hash_key
from api.body_limits import is_json_media_type, media_type_of
from api.broker import JobBroker
from api.errors import ApiError
from fd2_config.settings import Settings
from store.db import get_sessionmaker, is_sqlite, read_session
from store.keys import authenticate

T = TypeVar("T")


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_db(settings: SettingsDep) -> AsyncIterator[Session]:
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]


async def short_transaction(session: Session, fn: Callable[..., T], *args: Any) -> T:
    """`fn(session, *args)` in the thread pool, then its transaction ends (rolled back unless `fn`
    committed), so the session holds no pooled connection until its next call."""

    def call() -> T:
        try:
            return fn(session, *args)
        finally:
            if session.in_transaction():
                session.rollback()

    return await run_in_threadpool(call)


class Reader:
    """Runs `fn(session, *args)` for a read, inline for SQLite, in the thread pool otherwise."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.inline = is_sqlite(self.url)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.inline:
            with read_session(self.url) as session:
                return fn(session, *args, **kwargs)
        return await run_in_threadpool(self._in_thread, fn, *args, **kwargs)

    def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with get_sessionmaker(self.url)() as session:
            return fn(session, *args, **kwargs)


async def get_reader(request: Request) -> Reader:
    return request.app.state.reader


ReaderDep = Annotated[Reader, Depends(get_reader)]


async def get_broker(request: Request) -> JobBroker:
    return request.app.state.broker


BrokerDep = Annotated[JobBroker, Depends(get_broker)]

bearer_scheme = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`.")


def _tenant_of_key(session: Session, key: str) -> CurrentTenant | None:
    tenant = authenticate(session, key)
    return CurrentTenant(tenant.id, tenant.name) if tenant is not None else None


async def get_current_tenant(
    request: Request,
    reader: ReaderDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> CurrentTenant:
    """The tenant of the request's bearer key; 401 for a missing, unknown or revoked key, 429 past
    the key's request rate."""
    challenge = {"WWW-Authenticate": "Bearer"}
    key = credentials.credentials.strip() if credentials is not None else ""
    if not key:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'", headers=challenge)
    cache: TenantCache = request.app.state.tenant_cache
    key_hash = hash_key(key)
    tenant = cache.get(key_hash)
    if tenant is None:
        tenant = await reader.run(_tenant_of_key, key)
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key; use an active key (the operator makes "
                           "them with `fd2 keys create <tenant>`)", headers=challenge)
        cache.put(key_hash, tenant)
    wait_s = request.app.state.rate_limiter.acquire(key_hash)
    if wait_s:
        raise ApiError(429, "rate_limited", f"too many requests with this API key; retry in {wait_s} s",
                       {"retry_after_s": wait_s}, headers={"Retry-After": str(wait_s)})
    return tenant


TenantDep = Annotated[CurrentTenant, Depends(get_current_tenant)]


async def require_json_body(request: Request) -> None:
    """415 unless the body is declared as JSON: a form or text body would otherwise surface as a
    confusing validation error about the body's shape. (A JSON body nested too deeply never gets
    here: `api.body_limits` refuses it before routing.)"""
    media_type = media_type_of(request.headers.get("content-type", ""))
    if not is_json_media_type(media_type):
        raise ApiError(415, "unsupported_media_type", f"the body is {media_type[:100] or 'untyped'}; send it as "
                       "application/json with Content-Type: application/json",
                       {"received": media_type[:100], "expected": "application/json"})
