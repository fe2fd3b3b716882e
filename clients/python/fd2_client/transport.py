"""One authenticated HTTP connection to the service: every request goes through here.

It adds the bearer key, retries under the `RetryPolicy` (see `fd2_client.retries` for which requests
may be repeated), turns error answers into the typed errors of `fd2_client.errors`, and a connection
that stays broken after the retries into `ConnectionFailed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from fd2_client.credentials import ApiKey, without_userinfo
from fd2_client.errors import ConnectionFailed, error_from_response
from fd2_client.retries import OnRetry, RetryPolicy, call_with_retries
from fd2_client.version import __version__

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
DEFAULT_TIMEOUT_S = 60.0
URL_EXAMPLE = "http://127.0.0.1:8000"
API_PREFIX = "/v1"


def service_root(url: str) -> str:
    """`url` as the service's root (no trailing `/` or `/v1`); ValueError, naming the problem, for a
    URL that could never connect (no http/https scheme, no host), so a typo is not reported as an
    unreachable service.

    A `user:password@` in it is refused too: httpx would send it as Basic auth in place of the API
    key, so such a URL could never authenticate; no message shows it."""
    text = url.strip()
    if not text:
        raise ValueError(f"the service URL is empty (e.g. {URL_EXAMPLE})")
    parts = urlsplit(text)
    url = without_userinfo(text)  # the URL as every message below may show it
    if "://" not in text:
        raise ValueError(f"the service URL {url!r} has no scheme: did you mean http://{url}?")
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"the service URL {url!r} must start with http:// or https:// (e.g. {URL_EXAMPLE})")
    try:
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"the service URL {url!r} has a bad port ({exc})") from None
    if not host:
        raise ValueError(f"the service URL {url!r} names no host (e.g. {URL_EXAMPLE})")
    if "@" in parts.netloc:
        raise ValueError(f"the service URL {url!r} carries a user name or password (user:password@): drop "
                         "them; the service authenticates by the API key alone, never taken from the URL")
    if parts.query or parts.fragment:
        raise ValueError(f"the service URL {url!r} is the service's root, without ?query or #fragment "
                         f"(e.g. {URL_EXAMPLE})")
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        path = path[: -len(API_PREFIX)].rstrip("/")  # the API's prefix is added to every request
    return f"{parts.scheme.lower()}://{parts.netloc}{path}"


class Transport:
    """HTTP to `url` with API key `key` (checked by `fd2_client.credentials.clean_api_key`, and
    masked in every error); `timeout` in seconds per read/write/connect; `on_retry` hears of each
    retry's wait (see `fd2_client.retries.call_with_retries`)."""

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 http_client: httpx.Client | None = None, sleep: Callable[[float], None] | None = None,
                 on_retry: OnRetry | None = None) -> None:
        self.url = service_root(url)
        self.key = ApiKey(key)
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.on_retry = on_retry
        self.http = http_client or httpx.Client(timeout=timeout)
        # The key is added per request (`_headers`), so no dict kept here shows it in a repr.
        self.headers = {"User-Agent": f"fd2-client/{__version__}"}

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send and read the whole answer; 4xx/5xx raise their `ApiError`, a dead connection
        `ConnectionFailed`.

        `idempotent` defaults to the method's nature (GET, PUT, DELETE are); `kwargs` go to
        `httpx.Client.request`.
        """
        headers = self._headers(kwargs)

        def once() -> httpx.Response:
            response = self.http.request(method, self._url(path), headers=headers, **kwargs)
            if response.status_code >= 400:
                raise error_from_response(response, self.key)
            return response

        return self._with_retries(method, idempotent, once)

    @contextmanager
    def stream(self, method: str, path: str, *, idempotent: bool | None = None,
               **kwargs: Any) -> Iterator[httpx.Response]:
        """An answer whose body is read by the caller (downloads, event streams); opening it is
        retried like `request`, reading it is the caller's to guard (`httpx.TransportError` when the
        connection breaks)."""
        headers = self._headers(kwargs)

        def open_once() -> httpx.Response:
            request = self.http.build_request(method, self._url(path), headers=headers, **kwargs)
            response = self.http.send(request, stream=True)
            if response.status_code >= 400:
                try:
                    raise error_from_response(response, self.key)
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
            return call_with_retries(self.retry, idempotent, call, self.sleep, on_retry=self.on_retry)
        except httpx.TransportError as exc:
            text = f"{method} {self.url}: {type(exc).__name__}: {exc or 'connection failed'}"
            shown = self.key.redact(text)  # an error quoting the header must not carry the key on
            raise ConnectionFailed(shown) from (exc if shown == text else None)

    def _url(self, path: str) -> str:
        return f"{self.url}{path}"

    def _headers(self, kwargs: dict[str, Any]) -> dict[str, str]:
        """The key and agent plus the call's own headers (taken out of `kwargs`)."""
        return {"Authorization": self.key.authorization(), **self.headers, **(kwargs.pop("headers", None) or {})}
