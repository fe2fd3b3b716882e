"""A size bound on request bodies other than dataset uploads (those stream to disk under their own limit).

FastAPI reads a JSON body whole before validating it, so an unbounded body is an easy way to exhaust memory.
Past the bound the answer is the usual JSON error with 413, whether or not the client announced the size.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

UPLOAD_PATH = "/v1/datasets"


def body_too_large(limit: int) -> HTTPException:
    # An HTTPException, because FastAPI passes those through from body reading (others become 400).
    return HTTPException(413, f"request body is larger than {limit} bytes; send a smaller body (datasets go "
                              "through POST /v1/datasets, which has its own limit)")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = body_too_large(self.max_bytes).detail
            await error_response(413, "payload_too_large", message)(scope, receive, send)
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
