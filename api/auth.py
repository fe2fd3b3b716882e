"""Bearer-key authentication with a short in-memory cache.

Every `/v1` request needs its key checked; a cache of a few seconds keeps that off the database on hot
paths (job polling) while a revoked key still stops working within `auth_cache_ttl_s`. Keys are cached by
their SHA-256, never in plaintext.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from store.keys import hash_key

MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True)
class CurrentTenant:
    """The authenticated tenant as routes see it (a plain value, safe to share across requests)."""

    id: str
    name: str


class TenantCache:
    """key hash -> (tenant, expiry) for keys that authenticated recently."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[CurrentTenant, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> CurrentTenant | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        tenant, expires = entry
        if time.monotonic() >= expires:
            self._entries.pop(key_hash, None)
            return None
        return tenant

    def put(self, key_hash: str, tenant: CurrentTenant) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= MAX_CACHED_KEYS:
                self._entries.clear()
            self._entries[key_hash] = (tenant, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


__all__ = ["CurrentTenant", "TenantCache", "hash_key"]
