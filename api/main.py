"""The FastAPI application: `uvicorn api.main:app`.

`create_app(settings)` builds an app around one settings object (tests build their own); the
module-level `app` uses the environment.
Start-up applies database migrations, so a fresh home folder just works.
Importing this module must never import torch: only torch-free parts of fd2_core are used here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from api.auth import TenantCache
from api.body_limits import BodyLimitMiddleware
from api.broker import JobBroker
from api.deps import Reader
from api.errors import install_error_handlers
from api.metrics import ApiMetrics, MetricsMiddleware
from api.rate_limit import RateLimiter
from api.routes import artifacts, datasets, health, jobs, metrics
from api.upload_slots import UploadSlots
from api.web_console import install_console
from fd2_config.settings import Settings, get_settings
from fd2_core.presets import PRESET_DESCRIPTIONS
from fd2_core.spec import JobSpec
from store.db import migrate

DESCRIPTION = """Fine-grained dataset distillation (FD²) as a service.

Every `/v1` call needs `Authorization: Bearer <api key>`. Errors always come as
`{"error": {"code", "message", "details"}}`. Lists answer `{"items", "next_cursor"}`, newest first.

Spec presets: """ + "; ".join(f"`{name}`: {text}" for name, text in PRESET_DESCRIPTIONS.items())


def create_app(settings: Settings | None = None, *, run_migrations: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.intake_limiter = anyio.CapacityLimiter(settings.max_concurrent_intakes)
        if run_migrations:
            await run_in_threadpool(migrate, settings)
        else:
            settings.ensure_dirs()
        yield
        app.state.broker.close()

    app = FastAPI(title="FD² service", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = JobBroker(settings)
    app.state.tenant_cache = TenantCache(settings.auth_cache_ttl_s)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads_per_tenant)
    app.state.reader = Reader(settings)
    app.state.metrics = ApiMetrics(settings)
    install_error_handlers(app)
    # Job polling is the hot path: its router is matched first.
    for module in (jobs, artifacts, datasets, health, metrics):
        app.include_router(module.router)
    install_console(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.openapi = lambda: _openapi_with_job_spec(app)  # type: ignore[method-assign]
    return app


def _openapi_with_job_spec(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with `JobSpec` (every spec field's default, range and
    meaning) as a named component."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["JobSpec"] = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
