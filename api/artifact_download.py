"""Serve a registered artifact file: checksums in headers, conditional and single-range requests.

The SHA-256 registered with the artifact is its strong ETag and its `Digest`, so a client can verify a
download (or resume one with `Range`) without another request. Multi-range requests get the whole file, as
HTTP allows; an unsatisfiable range gets 416 with the file size.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from api.errors import ApiError
from store.models import Artifact

CHUNK_BYTES = 1024 * 1024  # 1 MiB: each chunk is a thread hop inside StreamingResponse; bigger halves CPU per GiB
RANGE_PATTERN = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str, size: int) -> ByteRange | None:
    """The one range a `Range` header asks for; None = serve everything (absent, multi-range, other unit).

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


def etag_of(artifact: Artifact) -> str:
    return f'"{artifact.sha256}"'


def etag_matches(header: str, etag: str) -> bool:
    candidates = [part.strip().removeprefix("W/") for part in header.split(",")]
    return "*" in candidates or etag in candidates


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


def read_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def artifact_response(request: Request, artifact: Artifact) -> Response:
    path = Path(artifact.path)
    if not path.is_file():
        raise ApiError(404, "artifact_missing", f"artifact {artifact.name!r} is registered but its file is gone; "
                       "submit the job again to produce it")
    headers = checksum_headers(artifact)
    disposition = {"Content-Disposition": f'attachment; filename="{artifact.name}"'}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)

    size = artifact.size
    requested = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if requested and (if_range is None or if_range.strip() == headers["ETag"]):
        byte_range = parse_range(requested, size)
    else:
        byte_range = None
    if byte_range is None:
        status, start, length = 200, 0, size
    else:
        status, start, length = 206, byte_range.start, byte_range.length
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
    headers["Content-Length"] = str(length)
    headers.update(disposition)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=artifact.media_type)
    return StreamingResponse(read_chunks(path, start, length), status_code=status, headers=headers,
                             media_type=artifact.media_type)
