"""Deadlines on an upload's body: the whole body, and any silence between its bytes.

Neither uvicorn nor Starlette bounds how long a request body may take, so a client that sends
headers and then slows down or stops would keep its upload slot (and anything else the request
holds) forever. Each wait for the next chunk lasts at most `FD2_UPLOAD_STALL_TIMEOUT_S` and never
past the body's deadline (`FD2_UPLOAD_BODY_TIMEOUT_S` from the first read); either answers 408
`upload_timeout`. The answer closes the connection, since the rest of that body will never be read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from api.errors import ApiError
from fd2_config.settings import Settings

UPLOAD_TIMEOUT = "upload_timeout"


@dataclass(frozen=True)
class UploadTimeouts:
    body_s: float
    stall_s: float

    @classmethod
    def of(cls, settings: Settings) -> UploadTimeouts:
        return cls(settings.upload_body_timeout_s, settings.upload_stall_timeout_s)


def upload_timeout(kind: str, limit_s: float, received: int) -> ApiError:
    """408 for a body that stalled (`kind` "stall") or took too long in all (`kind` "body")."""
    if kind == "stall":
        cause = f"the upload sent nothing for {limit_s:g} s"
        fix = "send it again over a connection that keeps sending"
    else:
        cause = f"the upload's body took longer than {limit_s:g} s"
        fix = "send it again over a faster connection, or split the dataset into smaller archives"
    return ApiError(408, UPLOAD_TIMEOUT, f"{cause} (after {received} bytes); {fix}",
                    {"timeout": kind, "timeout_s": limit_s, "received_bytes": received},
                    headers={"Connection": "close"})


class BodyClock:
    """Hands out a body's chunks one `read` at a time, each within the stall and body deadlines."""

    def __init__(self, timeouts: UploadTimeouts) -> None:
        self.timeouts = timeouts
        self.deadline = anyio.current_time() + timeouts.body_s
        self.received = 0

    async def read(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk, None at the end of the body; raises the 408 past either deadline."""
        left = self.deadline - anyio.current_time()
        if left <= 0:
            raise upload_timeout("body", self.timeouts.body_s, self.received)
        stalled = self.timeouts.stall_s < left
        chunk: bytes | None = None
        with anyio.move_on_after(min(self.timeouts.stall_s, left)) as scope:
            chunk = await anext(chunks, None)
        if scope.cancelled_caught:
            if stalled:
                raise upload_timeout("stall", self.timeouts.stall_s, self.received)
            raise upload_timeout("body", self.timeouts.body_s, self.received)
        if chunk is not None:
            self.received += len(chunk)
        return chunk
