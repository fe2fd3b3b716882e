"""Receive a `multipart/form-data` upload straight to disk, bounded in size.

Starlette's form parsing reads the whole body before the route runs and has no limit for file parts,
so the dataset upload parses the stream itself: the `file` part goes to disk in ~1 MiB writes (off
the event loop) and the request stops with 413 as soon as it passes the limit, without reading the
rest. Everything else a client could use to make the server hold memory is bounded too: the whole
body, the number of parts, each part's headers and the text fields together. Every refusal names
what was received and what the form expects (a file part in another field than `file` is refused as
soon as its headers arrive). Time is bounded as well (`api.upload_timeouts`): a body that stalls or
takes too long in all answers 408.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError
from api.upload_timeouts import BodyClock, UploadTimeouts

FLUSH_BYTES = 1024 * 1024
MAX_TEXT_FIELD_BYTES = 4096
MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 8 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024
CURL_EXAMPLE = "curl -F file=@data.zip"


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    size: int
    fields: dict[str, str]


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"upload is larger than the limit of {limit} bytes; split the dataset "
                    "into smaller archives or use smaller images", {"max_upload_bytes": limit})


def _form_error(message: str, field: str, msg: str, kind: str, **extra: object) -> ApiError:
    """422 in the shape of FastAPI's own validation errors (`details[0].field`), with what was
    received."""
    return ApiError(422, "validation_error", message,
                    [{"loc": ["body", field], "field": field, "msg": msg, "type": kind, **extra}])


class _PartCollector:
    """Callbacks of the multipart parser: routes the `file` part to disk, small text fields to
    memory."""

    def __init__(self, file_field: str, handle: BinaryIO, max_bytes: int, text_fields: tuple[str, ...]) -> None:
        self.file_field = file_field
        self.text_fields = text_fields
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
            raise ApiError(422, "validation_error", f"the form has more than {MAX_PARTS} parts; send one "
                           f"'{self.file_field}' part and the text fields {self._known_text()} only",
                           {"max_parts": MAX_PARTS})
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
            raise ApiError(400, "bad_request", f"a form part header is longer than {MAX_PART_HEADER_BYTES} bytes; "
                           "send shorter part headers (e.g. a shorter file name)",
                           {"max_part_header_bytes": MAX_PART_HEADER_BYTES})

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
                raise _form_error(f"the form has more than one '{self.file_field}' part; send one archive per upload",
                                  self.file_field, "only one file part is accepted", "too_many_parts")
            self._is_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        elif b"filename" in options:
            # a file under another name, e.g. `files`: refused before its bytes arrive
            shown = name[:100]
            raise _form_error(
                f"the archive was sent in form field {shown!r}; send it in the '{self.file_field}' field "
                f"(e.g. {CURL_EXAMPLE})",
                self.file_field, f"Field required; a file arrived in {shown!r} instead", "missing",
                received_field=shown,
            )

    def _known_text(self) -> str:
        return ", ".join(f"'{name}'" for name in self.text_fields) or "(none)"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            self.pending += data[start:end]
        elif self._current:
            self._text += data[start:end]
            if len(self._text) > MAX_TEXT_FIELD_BYTES:
                raise self._text_too_long(self._current)

    def _text_too_long(self, name: str) -> ApiError:
        shown = name[:100]
        if name in self.text_fields:
            message = f"form field {shown!r} is longer than {MAX_TEXT_FIELD_BYTES} bytes; shorten it"
        else:
            message = (f"form field {shown!r} is longer than {MAX_TEXT_FIELD_BYTES} bytes and is not a field of this "
                       f"form; send the archive as a file in the '{self.file_field}' field (e.g. {CURL_EXAMPLE}); "
                       f"the text fields are {self._known_text()}")
        return _form_error(message, shown, f"at most {MAX_TEXT_FIELD_BYTES} bytes", "string_too_long",
                           max_bytes=MAX_TEXT_FIELD_BYTES)

    def on_part_end(self) -> None:
        if not self._is_file and self._current:
            self.fields[self._current] = self._text.decode("utf-8", "replace")
        self._current = None
        self._is_file = False


async def receive_upload(request: Request, dest: Path, max_bytes: int, timeouts: UploadTimeouts,
                         file_field: str = "file", text_fields: tuple[str, ...] = ()) -> ReceivedUpload:
    """Stream the request's `file_field` part into `dest`; ApiError 413, 415, 422, 408 or 400.

    `text_fields` are the text fields the form takes (named in the messages of refused forms; others
    are kept in `fields` too). The caller removes `dest` whatever happens. A failed write raises its
    OSError (the disk's state, for the caller to answer), never a 400."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        received = content_type.decode("latin-1")[:100] or "no Content-Type"
        cause = "multipart/form-data without a boundary" if content_type == b"multipart/form-data" else received
        raise ApiError(415, "unsupported_media_type",
                       f"the body is {cause}; send the dataset as multipart/form-data with a '{file_field}' part "
                       f"(e.g. {CURL_EXAMPLE})", {"received": received, "expected": "multipart/form-data"})
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large(max_bytes)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as handle:
        collector = _PartCollector(file_field, handle, max_bytes, text_fields)
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        clock = BodyClock(timeouts)
        chunks = request.stream()
        try:
            while (chunk := await clock.read(chunks)) is not None:
                if clock.received > max_bytes + MULTIPART_OVERHEAD_BYTES:
                    raise too_large(max_bytes)
                parser.write(chunk)
                if len(collector.pending) >= FLUSH_BYTES:
                    data = bytes(collector.pending)
                    collector.pending.clear()
                    await run_in_threadpool(handle.write, data)
            parser.finalize()
        except ClientDisconnect:
            raise ApiError(400, "upload_interrupted",
                           "the upload ended before it was complete; send it again") from None
        except (ApiError, OSError):  # a write to disk that failed is the server's, not the body's
            raise
        except Exception as exc:  # the parser's own errors: malformed multipart body
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}; send a multipart/form-data body "
                           f"with a '{file_field}' part (e.g. {CURL_EXAMPLE})") from None
        if collector.pending:
            await run_in_threadpool(handle.write, bytes(collector.pending))
    if collector.filename is None:
        raise _form_error(f"the form has no '{file_field}' part; send the archive as a file in the '{file_field}' "
                          f"field (e.g. {CURL_EXAMPLE})", file_field, "Field required", "missing",
                          received_fields=sorted(name[:100] for name in collector.fields))
    return ReceivedUpload(dest, collector.filename, collector.file_bytes, collector.fields)
