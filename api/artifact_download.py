"""Serve a registered artifact file: checksums in headers, conditional and single-range requests.

The SHA-256 registered with the artifact is its strong ETag and its `Digest`, so a client can verify
a download (or resume one with `Range`) without another request. Multi-range requests get the whole
file, as HTTP allows; an unsatisfiable range gets 416 with the file size.

The file is opened before any header is decided and streamed from that handle: a job deleted
meanwhile answers 404 (gone before the open) or the whole file (on POSIX an unlinked file stays
readable through an open handle), never a `Content-Length` followed by a reset connection.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from store.models import Artifact

# 1 MiB: each chunk is a thread hop inside StreamingResponse; bigger halves CPU per GiB.
CHUNK_BYTES = 1024 * 1024
RANGE_PATTERN = re.compile(r"^bytes=(\d*)-(\d*)$")
ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
# O_NONBLOCK: a fifo where the file was fails the regular-file check instead of blocking the open.
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str, size: int) -> ByteRange | None:
    """The one range a `Range` header asks for; None = serve everything (absent, multi-range,
    other unit).

    Raises ApiError 416 when the range lies outside the file.
    """
    text = header.strip().replace(" ", "")
    if "," in text or not text.startswith("bytes="):
        return None
    match = RANGE_PATTERN.match(text)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise unsatisfiable(size)
    return ByteRange(start, min(end, size - 1))


def unsatisfiable(size: int) -> ApiError:
    return ApiError(416, "range_not_satisfiable", f"requested range is outside the file of {size} bytes; ask for "
                    f"bytes within 0-{max(size - 1, 0)}, or leave out the Range header",
                    {"size": size}, headers={"Content-Range": f"bytes */{size}"})


def artifact_missing(artifact: Artifact) -> ApiError:
    return ApiError(404, "artifact_missing", f"artifact {artifact.name!r} is registered but its file is gone; "
                    "submit the job again to produce it")


def precondition_failed(etag: str) -> ApiError:
    return ApiError(412, "precondition_failed", f"If-Match names no current version of this artifact (its ETag "
                    f"is {etag}; weak tags never match); ask with that tag, or without If-Match",
                    {"etag": etag}, headers={"ETag": etag})


def etag_of(artifact: Artifact) -> str:
    return f'"{artifact.sha256}"'


def entity_tags(values: list[str]) -> list[str] | None:
    """The entity-tags an If-Match / If-None-Match lists over all its lines (`W/` kept); None
    for `*`. Parsed as quoted strings, not split on commas: a comma may occur inside a tag."""
    if any(value.strip() == "*" for value in values):
        return None
    return [tag for value in values for tag in ENTITY_TAG.findall(value)]


def if_match_fails(request: Request, etag: str) -> bool:
    """RFC 9110 13.1.1: strong comparison, so a weak tag never matches; `*` matches the file
    held open."""
    values = request.headers.getlist("if-match")
    if not values:
        return False
    tags = entity_tags(values)
    return tags is not None and etag not in tags


def if_none_match_matches(request: Request, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison, so `W/"<sha>"` counts as the same version."""
    values = request.headers.getlist("if-none-match")
    if not values:
        return False
    tags = entity_tags(values)
    return tags is None or etag in (tag.removeprefix("W/") for tag in tags)


def checksum_headers(artifact: Artifact) -> dict[str, str]:
    digest_b64 = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    return {
        "ETag": etag_of(artifact),
        "Accept-Ranges": "bytes",
        "X-Checksum-SHA256": artifact.sha256,
        "Digest": f"sha-256={digest_b64}",
        "Repr-Digest": f"sha-256=:{digest_b64}:",
        "Cache-Control": "private, max-age=0, must-revalidate",
    }


def open_artifact(artifact: Artifact) -> BinaryIO:
    """The registered file, opened; 404 `artifact_missing` when it is gone, not a regular file or
    no longer of the registered size (`Content-Length` promises only what the handle holds)."""
    try:
        fd = os.open(artifact.path, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise artifact_missing(artifact) from None
    handle = os.fdopen(fd, "rb")
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != artifact.size:
            raise artifact_missing(artifact)
        if OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # only the open needed it
    except BaseException:
        handle.close()
        raise
    return handle


def read_chunks(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    handle.seek(start)
    remaining = length
    while remaining > 0:
        chunk = handle.read(min(CHUNK_BYTES, remaining))
        if not chunk:  # truncated in place: end the connection rather than pad the promised length
            raise RuntimeError(f"artifact file ended {remaining} bytes early")
        remaining -= len(chunk)
        yield chunk


class OpenFileResponse(StreamingResponse):
    """Streams from a handle opened before the headers, closed however the response ends (done,
    client gone, error)."""

    def __init__(self, handle: BinaryIO, start: int, length: int, status_code: int,
                 headers: dict[str, str], media_type: str) -> None:
        super().__init__(read_chunks(handle, start, length), status_code, headers, media_type)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.close()


def artifact_response(request: Request, artifact: Artifact) -> Response:
    """Open first (404 when gone), then preconditions in RFC 9110 13.2.2 order: If-Match (412),
    If-None-Match (304), If-Range with Range (206 or the whole file)."""
    handle = open_artifact(artifact)
    try:
        response = _response_for(request, artifact, handle)
    except BaseException:
        handle.close()
        raise
    if not isinstance(response, OpenFileResponse):
        handle.close()
    return response


def _response_for(request: Request, artifact: Artifact, handle: BinaryIO) -> Response:
    headers = checksum_headers(artifact)
    etag = headers["ETag"]
    if if_match_fails(request, etag):
        raise precondition_failed(etag)
    if if_none_match_matches(request, etag):
        return Response(status_code=304, headers=headers)

    size = artifact.size
    requested = request.headers.get("range")
    if_range = request.headers.get("if-range")
    # If-Range compares strongly too: a weak tag or a date sends the whole file.
    if requested and (if_range is None or if_range.strip() == etag):
        byte_range = parse_range(requested, size)
    else:
        byte_range = None
    if byte_range is None:
        status, start, length = 200, 0, size
    else:
        status, start, length = 206, byte_range.start, byte_range.length
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
    headers["Content-Length"] = str(length)
    headers["Content-Disposition"] = f'attachment; filename="{artifact.name}"'
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=artifact.media_type)
    return OpenFileResponse(handle, start, length, status, headers, artifact.media_type)
