"""One authenticated HTTP connection to the service: every request goes through here.

It adds the bearer key, retries under the `RetryPolicy` (see `fd2_client.retries` for which requests may be
repeated), turns error answers into the typed errors of `fd2_client.errors`, and a connection that stays
broken after the retries into `ConnectionFailed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from fd2_client.errors import ConnectionFailed, error_from_response
from fd2_client.retries import RetryPolicy, call_with_retries
from fd2_client.version import __version__

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
DEFAULT_TIMEOUT_S = 60.0


class Transport:
    """HTTP to `url` with API key `key`; `timeout` in seconds per read/write/connect."""

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 http_client: httpx.Client | None = None, sleep: Callable[[float], None] | None = None) -> None:
        if not url:
            raise ValueError("the service URL is empty (e.g. http://127.0.0.1:8000)")
        if not key:
            raise ValueError("the API key is empty (the operator makes one with `fd2 keys create <tenant>`)")
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.http = http_client or httpx.Client(timeout=timeout)
        self.headers = {"Authorization": f"Bearer {key}", "User-Agent": f"fd2-client/{__version__}"}

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send and read the whole answer; a 4xx/5xx raises its `ApiError`, a dead connection `ConnectionFailed`.

        `idempotent` defaults to the method's nature (GET, PUT, DELETE are); `kwargs` go to `httpx.Client.request`.
        """
        headers = self._headers(kwargs)

        def once() -> httpx.Response:
            response = self.http.request(method, self._url(path), headers=headers, **kwargs)
            if response.status_code >= 400:
                raise error_from_response(response)
            return response

        return self._with_retries(method, idempotent, once)

    @contextmanager
    def stream(self, method: str, path: str, *, idempotent: bool | None = None,
               **kwargs: Any) -> Iterator[httpx.Response]:
        """An answer whose body is read by the caller (downloads, event streams); opening it is retried like
        `request`, reading it is the caller's to guard (`httpx.TransportError` when the connection breaks)."""
        headers = self._headers(kwargs)

        def open_once() -> httpx.Response:
            request = self.http.build_request(method, self._url(path), headers=headers, **kwargs)
            response = self.http.send(request, stream=True)
            if response.status_code >= 400:
                try:
                    raise error_from_response(response)
                finally:
                    response.close()
            return response

        response = self._with_retries(method, idempotent, open_once)
        try:
            yield response
        finally:
            response.close()

    def _with_retries(self, method: str, idempotent: bool | None, call: Callable[[], httpx.Response]) -> httpx.Response:
        if idempotent is None:
            idempotent = method.upper() in IDEMPOTENT_METHODS
        try:
            return call_with_retries(self.retry, idempotent, call, self.sleep)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{method} {self.url}: {type(exc).__name__}: {exc or 'connection failed'}") from exc

    def _url(self, path: str) -> str:
        return f"{self.url}{path}"

    def _headers(self, kwargs: dict[str, Any]) -> dict[str, str]:
        """The key and agent plus the call's own headers (taken out of `kwargs`)."""
        return {**self.headers, **(kwargs.pop("headers", None) or {})}
