"""Which hosts a job's `callback_url` may reach: the operator's allow-list, matched one way everywhere.

The worker that delivers callbacks sits inside the operator's network, so an arbitrary URL would let a tenant
probe it. An entry is `host`, `host:port`, or `.domain` (any subdomain of it); the scheme must be http(s).
URLs with credentials, control characters or backslashes are refused outright: parsers disagree about which
host such a URL names, and the check must see the host the HTTP client will call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

UNSAFE_URL_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")


def callback_url_problem(url: str) -> str | None:
    """Why `url` can never be a callback target (None when its form is acceptable)."""
    if UNSAFE_URL_CHARACTERS.search(url):
        return "callback_url must not contain spaces, control characters or backslashes"
    try:
        parts = urlsplit(url)
        if parts.port == 0:  # reading the port also raises for one out of range
            return "callback_url has no valid port"
    except ValueError:
        return "callback_url is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "callback_url must be an absolute http(s) URL"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "callback_url must not carry credentials"
    return None


def callback_host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """True when the URL's host is listed as `host`, `host:port`, or `.domain` for any subdomain of it."""
    if callback_url_problem(url) is not None:
        return False
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    for entry in (item.strip().lower() for item in allowed_hosts):
        if not entry:
            continue
        if entry in (host, with_port) or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False
