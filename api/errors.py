"""One error shape for every failure: `{"error": {"code", "message", "details"}}`.

Clients branch on `code` (stable snake_case) and show `message`; FastAPI's own 404/405/422 and
unexpected exceptions are rewritten into the same shape, and a 500 never carries a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.db import database_unavailable

logger = logging.getLogger("fd2.api")

HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """Raised anywhere below a route to answer with a given status and error body."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


AUTHENTICATED_ROUTE_ERRORS = (401, 413, 422, 429)
# Seconds a client should wait after a 503 for a dependency that is restarting (broker, database).
UNAVAILABLE_RETRY_AFTER_S = 5


def unavailable(code: str, message: str, details: Any = None) -> ApiError:
    """503 for a dependency that is down, with `Retry-After` so clients back off instead of
    failing."""
    return ApiError(503, code, message, details, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a `/v1` route's error statuses; every such route may also answer 401
    (key), 413 (body too large), 422 (validation) and 429 (rate limit)."""
    return {status: {"model": ErrorBody} for status in sorted({*statuses, *AUTHENTICATED_ROUTE_ERRORS})}


# Where a client finds the ids it may use, named in every 404 of that kind of resource.
LISTED_AT: dict[str, str] = {
    "dataset": "GET /v1/datasets lists your datasets",
    "job": "GET /v1/jobs lists your jobs",
    "artifact": "GET /v1/jobs/{id} lists a finished job's artifacts",
}


def not_found(what: str) -> ApiError:
    """The one answer for unknown ids and other tenants' ids alike."""
    where = LISTED_AT.get(what)
    return ApiError(404, "not_found", f"{what} not found; check the id" + (f" ({where})" if where else ""))


def error_response(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}
    return JSONResponse(body, status_code=status_code, headers=headers)


MAX_VALIDATION_DETAILS = 50
MAX_LOC_PART_CHARS = 200


def _loc_part(part: Any) -> Any:
    """A location step as sent back: a client's own (unknown) field name may be arbitrarily long."""
    return part if isinstance(part, int) or len(str(part)) <= MAX_LOC_PART_CHARS else str(part)[:MAX_LOC_PART_CHARS]


def validation_details(errors: Any, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors reduced to JSON-safe `{loc, field, msg, type}` (inputs are not echoed back),
    at most `MAX_VALIDATION_DETAILS` of them: a body of a million bad rows must not answer with a
    million errors."""
    details = []
    for err in list(errors)[:MAX_VALIDATION_DETAILS]:
        own = [_loc_part(part) for part in err.get("loc", ())]
        loc = [*prefix, *own]
        field = ".".join(str(part) for part in own) or None
        details.append({"loc": loc, "field": field, "msg": err.get("msg", ""), "type": err.get("type", "")})
    return details


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


# FastAPI's own answers for an unknown path or method say only their status; these say what to do.
ROUTING_FIXES: dict[int, str] = {
    404: "no such path; the API's paths are listed at /docs",
    405: "this path does not take that method; the methods of each path are listed at /docs",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, RecursionError):
        # FastAPI's JSON parser gave up on a body nested too deeply (the depth scan keeps those
        # out first); imported here because api.body_limits builds its answers with this module.
        from api.body_limits import json_too_deep

        return await _api_error(request, json_too_deep())
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code in ROUTING_FIXES and message in ("Not Found", "Method Not Allowed"):
        message = f"{request.method} {request.url.path[:200]}: {ROUTING_FIXES[exc.status_code]}"
    return error_response(exc.status_code, code, message, None, getattr(exc, "headers", None))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc.errors())
    first = details[0] if details else None
    where = ".".join(str(p) for p in first["loc"]) if first else "request"
    message = f"invalid request: {where}: {first['msg']}" if first else "invalid request"
    if first and first["type"] == "extra_forbidden":
        message = f"invalid request: {where}: unknown field; remove it (the request's fields are listed at /docs)"
    return error_response(422, "validation_error", message, details)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 + `Retry-After` while the database is unreachable (restart, failover, full pool); other
    database errors are unexpected (500)."""
    if not database_unavailable(exc):
        return await unexpected_error(request, exc)
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    logger.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path,
                   type(exc).__name__, first_line)
    return error_response(503, "database_unavailable",
                          "the database is unreachable right now (restarting or overloaded); retry after "
                          f"{UNAVAILABLE_RETRY_AFTER_S} s", None, {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    from api.storage_errors import storage_error_response  # it builds its answers with this module

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(OSError, storage_error_response)
    app.add_exception_handler(Exception, unexpected_error)
