"""Uploads sent from raw sockets to a real uvicorn, as a stalled or very slow client sends them: the
headers and the start of a multipart body, then silence or a dribble of single bytes. Also an
API-only service (`start_api`: uvicorn without a worker) and keys made in-process, so a test with
many tenants starts quickly.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from service_harness import ServiceStack, start_child

BOUNDARY = "fd2-raw-upload"


class RawUpload:
    """One `POST /v1/datasets` whose body never completes unless the test sends it."""

    def __init__(self, port: int, key: str, *, sent_bytes: int = 1024, declared_bytes: int = 8 * 1024**2) -> None:
        preamble = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.zip"\r\n'
                    "Content-Type: application/zip\r\n\r\n").encode()
        head = (f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(preamble) + declared_bytes}\r\n\r\n").encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(head + preamble + b"PK\x03\x04" + b"\0" * max(sent_bytes - 4, 0))
        self.open = True

    def dribble(self) -> bool:
        """Send one more body byte; False once the server has closed the connection."""
        if self.open:
            try:
                self.sock.send(b"\0")
            except OSError:
                self.open = False
        return self.open

    def answer(self, timeout_s: float) -> tuple[int, dict[str, Any]]:
        """The status and JSON body the server sends before closing (TimeoutError when it sends
        none)."""
        self.sock.settimeout(timeout_s)
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        self.open = False
        head, _, body = data.partition(b"\r\n\r\n")
        assert head, "the server closed the connection without an answer"
        return int(head.split(b" ", 2)[1]), json.loads(body or b"null")

    def close(self) -> None:
        self.open = False
        self.sock.close()


class Dribbler:
    """A thread sending one byte every `interval_s` to each upload the server has not closed yet."""

    def __init__(self, uploads: list[RawUpload], interval_s: float = 1.0) -> None:
        self.uploads, self.interval_s = uploads, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dribbler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for upload in self.uploads:
                upload.dribble()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_api(stack: ServiceStack, ready_timeout_s: float = 90.0) -> None:
    """(Re)start the stack's uvicorn alone, on its port, and wait until it is ready."""
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", f"--port={stack.port}"]
    stack.api = start_child("api", command, stack.env, stack.log_dir)
    stack.wait_ready(ready_timeout_s)


def tenant_key(settings: Any, name: str) -> str:
    """A key for a new tenant, written straight into the service's database."""
    from store.db import session_scope
    from store.keys import create_tenant_key

    with session_scope(settings) as session:
        return create_tenant_key(session, name)


def uploads_in_flight(settings: Any) -> list[Path]:
    """Every file under the datasets folder's in-flight area (staging and lease files)."""
    folder = Path(settings.datasets_dir) / ".incoming"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def staging_files(settings: Any) -> list[Path]:
    return [path for path in uploads_in_flight(settings) if path.suffix == ".upload"]
