"""Size and depth bounds on request bodies other than dataset uploads (those stream to disk under
their own limit).

FastAPI reads a JSON body whole before validating it, so an unbounded body is an easy way to exhaust
memory. Past the bound the answer is the usual JSON error with 413, whether or not the client
announced the size. A body FastAPI would parse as JSON is also refused, with 400 `json_too_deep`,
when its arrays and objects nest deeper than `MAX_JSON_DEPTH`: here, before routing, so no key
check, parse, validation, hash or query ever sees it (a deep body broke the parser and the
serialiser behind the idempotency hash).
"""

from __future__ import annotations

from itertools import accumulate

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response

UPLOAD_PATH = "/v1/datasets"

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON body. The deepest real body has 5 levels (a
manifest row in `dataset.manifest.items`); pydantic's serialiser fails past 255 levels (a 500) and
Python's parser past about 1 000 (RecursionError), so the bound sits far above any real body and
far below both."""

# Bodies larger than this are scanned in the thread pool, so the event loop keeps serving meanwhile.
INLINE_SCAN_BYTES = 1024**2

# Bytes that are neither a quote nor a bracket, and `{}` folded into `[]`: depth does not care
# which.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_FOLD_OBJECTS = bytes.maketrans(b"{}", b"[]")
_STEP = tuple(1 if byte == ord("[") else -1 if byte == ord("]") else 0 for byte in range(256))


def body_too_large(limit: int) -> HTTPException:
    # An HTTPException, because FastAPI passes those through from body reading (others become 400).
    return HTTPException(413, f"request body is larger than {limit} bytes; send a smaller body (datasets go "
                              "through POST /v1/datasets, which has its own limit)")


def json_too_deep(limit: int = MAX_JSON_DEPTH) -> ApiError:
    """The one answer for a body nested too deeply, whether the scan or the parser found it."""
    return ApiError(400, "json_too_deep", f"the JSON body nests arrays and objects more than {limit} levels "
                    "deep; send a flatter body (a job's body needs 5 levels)", {"max_depth": limit})


def is_json_media_type(media_type: str) -> bool:
    """`application/json` or a `+json` type (lower case, without parameters)."""
    return media_type == "application/json" or media_type.endswith("+json")


def media_type_of(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _structure(body: bytes) -> bytes:
    """The brackets of `body` that lie outside strings, `{}` folded into `[]`. Linear, no recursion.

    Escapes go first (backslash pairs left to right, as JSON reads them), so every quote left
    delimits a string; dropping adjacent quotes keeps each byte's side of them, and the even parts
    between the rest lie outside strings. For a malformed body this reads the valid prefix the
    parser would read before it fails."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_FOLD_OBJECTS, _NOT_STRUCTURE)
    return b"".join(text.replace(b'""', b"").split(b'"')[::2])


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in the JSON text `body` nest deeper than `limit`, without parsing
    it: the running depth of the brackets outside strings, stopped at the first level past `limit`.
    It costs less than the parse that would follow."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depths = accumulate(map(_STEP.__getitem__, _structure(body)))
    return next(filter(limit.__lt__, depths), None) is not None


def parsed_as_json(headers: dict[bytes, bytes]) -> bool:
    """Whether FastAPI would parse this request's body as JSON (it does when no type is given)."""
    if not headers.get(b"content-length", b"0").strip(b"0") and b"transfer-encoding" not in headers:
        return False  # no body at all
    media_type = media_type_of(headers.get(b"content-type", b"").decode("latin-1"))
    return not media_type or is_json_media_type(media_type)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out the body read already, then the client's later messages (a
    disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        if parsed_as_json(headers):
            await self._checked_json(scope, receive, send)
            return
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, bounded_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = body_too_large(self.max_bytes).detail
        await error_response(413, "payload_too_large", message)(scope, receive, send)

    async def _checked_json(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body whole (FastAPI would too); answer 413 or 400 `json_too_deep`, or pass it
        on."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        deep = (json_depth_exceeds(body) if len(body) <= INLINE_SCAN_BYTES
                else await run_in_threadpool(json_depth_exceeds, body))
        if deep:
            error = json_too_deep()
            await error_response(error.status_code, error.code, error.message, error.details)(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)
