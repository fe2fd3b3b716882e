"""POST a finished job's resource to the client's `callback_url`.

Only hosts on the operator's allow-list are contacted (the worker sits inside the operator's network, so an
arbitrary URL would let any tenant probe it). Retries with backoff are `worker.callback_delivery`'s job (a
daemon thread); this module does one attempt and says whether it may be worth another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from fd2_config.callback_hosts import callback_host_allowed


class CallbackRejected(Exception):
    """The URL may never be called (bad scheme, host not allowed); retrying would not help."""


class CallbackFailed(Exception):
    """The target did not accept the POST this time (network error, 5xx, 429); worth retrying."""


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """True when the URL's host is listed: `host`, `host:port`, or `.domain` for any subdomain of it.

    The very rule the API applied at submission, checked again here before the worker connects anywhere.
    """
    return callback_host_allowed(url, allowed_hosts)


def post_job_resource(
    url: str, resource: dict[str, Any], allowed_hosts: Iterable[str], *, timeout_s: float = 10.0
) -> int:
    """POST `resource` as JSON to `url` once; return the HTTP status of an accepted delivery."""
    if not host_allowed(url, allowed_hosts):
        raise CallbackRejected(f"callback host of {url!r} is not on the allow-list")
    headers = {"User-Agent": "fd2-service", "X-FD2-Event": "job.finished"}
    try:
        response = httpx.post(url, json=resource, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise CallbackFailed(f"callback to {url!r} failed: {type(exc).__name__}") from exc
    if response.status_code >= 500 or response.status_code == 429:
        raise CallbackFailed(f"callback to {url!r} answered {response.status_code}")
    if response.status_code >= 400:
        raise CallbackRejected(f"callback to {url!r} answered {response.status_code}")
    return response.status_code


def backoff_delays(attempts: int, base_s: float = 1.0, cap_s: float = 60.0) -> list[float]:
    """Waits before each retry: base, 2·base, 4·base, … capped (`attempts - 1` of them)."""
    return [min(cap_s, base_s * 2**index) for index in range(max(0, attempts - 1))]
