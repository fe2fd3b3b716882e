"""Download an artifact so that the file at `dest` is either complete and verified, or not there at all.

Bytes go to `<dest>.part` first. A `.part` left by an earlier, interrupted download is continued with a
`Range` request (`If-Range` = the artifact's ETag, so a changed file is sent whole); a connection that breaks
mid-file is continued the same way. The SHA-256 of the whole file is compared with the one the service
registered (the job resource's `sha256`, else the `X-Checksum-SHA256`/`ETag` header); only a match is renamed
to `dest` (atomically), a mismatch removes the `.part` and raises `ChecksumMismatch`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from fd2_client.errors import ChecksumMismatch, RangeNotSatisfiable
from fd2_client.retries import call_with_retries
from fd2_client.transport import Transport

HASH_READ_BYTES = 4 * 1024 * 1024
PART_SUFFIX = ".part"

ByteProgress = Callable[[int, "int | None"], None]  # (bytes done, bytes in all or None)


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def download_verified(transport: Transport, path: str, dest: Path, *, sha256: str | None = None,
                      size: int | None = None, on_progress: ByteProgress | None = None) -> Path:
    """Fetch `path` into `dest` (resuming `dest.part`), verify its SHA-256 (hex) and rename it into place.

    `size` (bytes) and `sha256` are what the job resource says, when known. Raises `ChecksumMismatch` (no file
    left), an `ApiError` for a refused request, `ConnectionFailed` when the service stays unreachable.
    """
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the artifact: not a prefix of it
    fetch = _PartFetch(transport, path, part, sha256, size, on_progress)
    # opening the request is retried by the transport; this goes on after a connection broken mid-file
    call_with_retries(transport.retry, True, fetch.run, transport.sleep, only=(httpx.TransportError,),
                      on_retry=transport.on_retry)
    expected = (sha256 or fetch.header_sha256 or "").lower()
    actual = fetch.hasher.hexdigest()
    if not expected or actual != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(dest.name, expected or "(none sent by the service)", actual)
    os.replace(part, dest)
    return dest


class _PartFetch:
    """One artifact's bytes appended to its `.part`; `run` may be called again after a broken connection."""

    def __init__(self, transport: Transport, path: str, part: Path, sha256: str | None, size: int | None,
                 on_progress: ByteProgress | None) -> None:
        self.transport = transport
        self.path = path
        self.part = part
        self.sha256 = sha256
        self.size = size
        self.on_progress = on_progress
        self.header_sha256: str | None = None
        self.hasher = hashlib.sha256()
        self.hashed = 0  # bytes of the .part already in `hasher`

    def run(self) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and offset == self.size and self.sha256:
            self._hash_part(offset)  # complete already: verify without a request
            return
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.sha256:
                headers["If-Range"] = f'"{self.sha256}"'
        try:
            with self.transport.stream("GET", self.path, headers=headers) as response:
                self._take_headers(response)
                if response.status_code != 206:
                    offset = 0  # the whole file came (no range asked, or the artifact changed)
                self._write(response, offset)
        except RangeNotSatisfiable:
            self.part.unlink(missing_ok=True)  # the .part was not a prefix of this file: start again
            self._reset()
            raise httpx.RemoteProtocolError("range not satisfiable; starting over") from None

    def _take_headers(self, response: httpx.Response) -> None:
        self.header_sha256 = response.headers.get("x-checksum-sha256") or _etag_sha256(response)
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if self.size is None and total.isdigit():
            self.size = int(total)
        elif self.size is None and response.status_code == 200 and "content-length" in response.headers:
            self.size = int(response.headers["content-length"])

    def _write(self, response: httpx.Response, offset: int) -> None:
        mode = "ab" if offset else "wb"
        if not offset:
            self._reset()
        else:
            self._hash_part(offset)
        with open(self.part, mode) as handle:
            handle.truncate(offset)
            done = offset
            self._report(done)
            for chunk in response.iter_bytes():  # as it arrives: a cut keeps every byte received
                handle.write(chunk)
                self.hasher.update(chunk)
                done += len(chunk)
                self.hashed = done
                self._report(done)
            _flush(handle)

    def _hash_part(self, upto: int) -> None:
        """Bring `hasher` to the first `upto` bytes of the .part (it may hold a prefix from an earlier run)."""
        if self.hashed > upto:
            self._reset()
        with open(self.part, "rb") as handle:
            handle.seek(self.hashed)
            while self.hashed < upto:
                block = handle.read(min(HASH_READ_BYTES, upto - self.hashed))
                if not block:
                    break
                self.hasher.update(block)
                self.hashed += len(block)

    def _reset(self) -> None:
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def _report(self, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, self.size)


def _etag_sha256(response: httpx.Response) -> str | None:
    etag = response.headers.get("etag", "").removeprefix("W/").strip('"')
    return etag if len(etag) == 64 and all(c in "0123456789abcdefABCDEF" for c in etag) else None


def _flush(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())
