"""Per-key request rate limit: a token bucket per API key, kept in this process.

One client looping on an endpoint must not starve the others sharing the API. Each key holds up to `burst`
tokens, refilled at `per_minute / 60` per second; a request takes one token, and without one the answer is
429 with `Retry-After` (whole seconds until a token is back). The buckets live in the API process, so with
several processes behind a balancer a key gets the limit in each of them; keys are held by their SHA-256.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED_KEYS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`acquire(key_hash)` answers 0 when the request may go ahead, else the seconds to wait."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key_hash: str) -> int:
        if not self.enabled:
            return 0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key_hash)
            if bucket is None:
                if len(self._buckets) >= MAX_TRACKED_KEYS:
                    self._forget_full_buckets(now)
                bucket = self._buckets[key_hash] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0
            return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))

    def _forget_full_buckets(self, now: float) -> None:
        """Drop keys that would be back at a full bucket anyway (idle ones); they lose nothing."""
        refill_s = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < refill_s}
