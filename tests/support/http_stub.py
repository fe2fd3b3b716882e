"""A tiny local HTTP server for the client tests: conditions the real service cannot be made to show on cue.

`StubServer(handler)` answers each request with `handler(seen)`: a `Reply` (status, headers, body), a reply
that stops after some body bytes (`cut_after`), `CUT` (the connection closes with no answer at all), or what
the real service answered (`forward_to(url)`, a recording proxy that can cut chosen answers). Every request is
kept in `requests`, so a test can check the headers the client sent (`Range`, `Idempotency-Key`, …).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding",
              "content-encoding"}


@dataclass
class Seen:
    """One request as it arrived."""

    method: str
    path: str  # with the query
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    cut_after: int | None = None  # close the connection after this many body bytes


CUT = Reply(status=0)  # close the connection without answering


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(document).encode())


def error_reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message, "details": None}}, headers)


def forward_to(upstream: str) -> Callable[[Seen], Reply]:
    """A handler that sends each request on to `upstream` and answers with its reply."""
    client = httpx.Client(base_url=upstream, timeout=60)

    def forward(seen: Seen) -> Reply:
        headers = {k: v for k, v in seen.headers.items() if k not in HOP_BY_HOP}
        response = client.request(seen.method, seen.path, headers=headers, content=seen.body)
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return Reply(response.status_code, kept, response.content)

    return forward


class StubServer:
    """`with StubServer(handler) as stub:` serves on `stub.url` until the block ends."""

    def __init__(self, handler: Callable[[Seen], Reply]) -> None:
        self.handler = handler
        self.requests: list[Seen] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                stub.requests.append(seen)
                reply = stub.handler(seen)
                if reply.status == 0:
                    self.close_connection = True
                    return
                chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
                streamed = not isinstance(reply.body, bytes)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if streamed:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(reply.body)))  # type: ignore[arg-type]
                self.end_headers()
                sent = 0
                for chunk in chunks:
                    if reply.cut_after is not None:
                        chunk = chunk[: max(0, reply.cut_after - sent)]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    if reply.cut_after is not None and sent >= reply.cut_after:
                        self.close_connection = True
                        return

            do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
