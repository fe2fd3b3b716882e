"""Liveness and readiness probes (no key needed)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from api.broker import JobBroker
from api.deps import BrokerDep, SettingsDep
from api.errors import unavailable
from fd2_config.settings import Settings
from store.db import session_scope

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(settings: Settings) -> None:
    with session_scope(settings) as session:
        session.execute(text("SELECT 1"))


async def _probe(check: Any, *args: Any, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, check, *args), timeout)
    except asyncio.TimeoutError:
        return f"timed out after {timeout:g} s"
    except Exception as exc:  # report any failure as not ready, with its type and message
        return f"{type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get("/readyz", summary="Database and broker are reachable",
            responses={503: {"description": "A dependency is down (details name which)."}})
async def readyz(settings: SettingsDep, broker: BrokerDep) -> dict[str, Any]:
    timeout = settings.readiness_timeout_s
    database, queue = await asyncio.gather(
        _probe(_check_database, settings, timeout=timeout),
        _probe(JobBroker.ping, broker, timeout=timeout),
    )
    checks = {"database": database, "broker": queue}
    if database != "ok" or queue != "ok":
        raise unavailable("not_ready", "a dependency of the service is unavailable (details name which)", checks)
    return {"status": "ready", "checks": checks}
