"""Receive a `multipart/form-data` upload straight to disk, bounded in size.

Starlette's form parsing reads the whole body before the route runs and has no limit for file parts, so the
dataset upload parses the stream itself: the `file` part goes to disk in ~1 MiB writes (off the event loop)
and the request stops with 413 as soon as it passes the limit, without reading the rest. Everything else a
client could use to make the server hold memory is bounded too: the whole body, the number of parts, each
part's headers and the text fields together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError

FLUSH_BYTES = 1024 * 1024
MAX_TEXT_FIELD_BYTES = 4096
MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 8 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    size: int
    fields: dict[str, str]


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"upload is larger than the limit of {limit} bytes",
                    {"max_upload_bytes": limit})


class _PartCollector:
    """Callbacks of the multipart parser: routes the `file` part to disk, small text fields to memory."""

    def __init__(self, file_field: str, handle: BinaryIO, max_bytes: int) -> None:
        self.file_field = file_field
        self.handle = handle
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.pending = bytearray()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None
        self._is_file = False
        self._text = bytearray()
        self.parts = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(422, "validation_error", f"the form has more than {MAX_PARTS} parts")
        self._headers = {}
        self._current = None
        self._is_file = False
        self._text = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]
        self._check_header_size()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header_size()

    def _check_header_size(self) -> None:
        if len(self._header_field) + len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise ApiError(400, "bad_request", f"a form part header is longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._current = name
        if name == self.file_field:
            if self.filename is not None:
                raise ApiError(422, "validation_error", f"only one '{self.file_field}' part is accepted")
            self._is_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            self.pending += data[start:end]
        elif self._current:
            self._text += data[start:end]
            if len(self._text) > MAX_TEXT_FIELD_BYTES:
                raise ApiError(422, "validation_error", f"form field '{self._current}' is too long")

    def on_part_end(self) -> None:
        if not self._is_file and self._current:
            self.fields[self._current] = self._text.decode("utf-8", "replace")
        self._current = None
        self._is_file = False


async def receive_upload(request: Request, dest: Path, max_bytes: int, file_field: str = "file") -> ReceivedUpload:
    """Stream the request's `file_field` part into `dest`; raises ApiError (413, 415, 422, 400)."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the dataset as multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large(max_bytes)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as handle:
        collector = _PartCollector(file_field, handle, max_bytes)
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes + MULTIPART_OVERHEAD_BYTES:
                    raise too_large(max_bytes)
                parser.write(chunk)
                if len(collector.pending) >= FLUSH_BYTES:
                    data = bytes(collector.pending)
                    collector.pending.clear()
                    await run_in_threadpool(handle.write, data)
            parser.finalize()
        except ClientDisconnect:
            raise ApiError(400, "upload_interrupted", "the upload ended before it was complete") from None
        except ApiError:
            raise
        except Exception as exc:  # the parser's own errors: malformed multipart body
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
        if collector.pending:
            await run_in_threadpool(handle.write, bytes(collector.pending))
    if collector.filename is None:
        raise ApiError(422, "validation_error", f"the form has no '{file_field}' part",
                       [{"loc": ["body", file_field], "field": file_field, "msg": "Field required",
                         "type": "missing"}])
    return ReceivedUpload(dest, collector.filename, collector.file_bytes, collector.fields)
