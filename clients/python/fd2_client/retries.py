"""When a failed request is tried again, and how long to wait before it.

A request is retried only when repeating it cannot do something twice:
- any request, when the service certainly did not act on it: the connection was never made (refused, connect
  timeout), or the answer was 429 (the rate limit is checked before anything is done);
- an idempotent request (GET, DELETE, a cancel, a submit with its `Idempotency-Key`) also after a connection
  that broke once the request was sent, and after 502/503/504.
An upload is not idempotent (the service keeps no key for it), so a broken upload is reported, not repeated.
The wait is the service's `Retry-After` when it sent one (capped at `max_wait_s`), else an exponential
backoff with full jitter (a random wait up to `initial_wait_s` doubled per retry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import tenacity

from fd2_client.errors import ApiError, RateLimited, ServerError

T = TypeVar("T")

NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
NOT_RETRIED = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)  # a wrong URL or request stays wrong
GATEWAY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` in all (the first included), waits from `initial_wait_s` doubling up to
    `max_wait_s` seconds; `Retry-After` is honoured up to `max_wait_s` too."""

    attempts: int = 6
    initial_wait_s: float = 0.5
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1 (the first try)")


def is_retryable(exc: BaseException, idempotent: bool) -> bool:
    """True when `exc` is worth another try of a request that is (or is not) `idempotent`."""
    if isinstance(exc, NOT_RETRIED):
        return False
    if isinstance(exc, RateLimited) or isinstance(exc, NEVER_SENT):
        return True
    if not idempotent:
        return False
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, ServerError) and exc.status in GATEWAY_STATUSES)


class _RetryAfterOrBackoff(tenacity.wait.wait_base):
    """The service's `Retry-After` when the last error carries one, else exponential backoff with full jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = tenacity.wait_random_exponential(multiplier=policy.initial_wait_s, max=policy.max_wait_s)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return min(exc.retry_after, self.policy.max_wait_s)
        return float(self.backoff(retry_state))


# Told before each wait: the error that failed the try, the seconds about to be waited, the try that failed (1…).
OnRetry = Callable[[BaseException, float, int], None]


def call_with_retries(policy: RetryPolicy, idempotent: bool, call: Callable[[], T],
                      sleep: Callable[[float], None] | None = None,
                      only: tuple[type[BaseException], ...] = (BaseException,), on_retry: OnRetry | None = None) -> T:
    """`call()`, tried again under `policy` while it raises a retryable error (of the `only` kinds); the last
    error is raised. `on_retry` hears of each wait, so a command can say why it seems to hang."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is None or state.outcome is None or state.next_action is None:
            return
        exc = state.outcome.exception()
        if exc is not None:
            on_retry(exc, float(state.next_action.sleep), state.attempt_number)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, only) and is_retryable(exc, idempotent)),
        wait=_RetryAfterOrBackoff(policy),
        stop=tenacity.stop_after_attempt(policy.attempts),
        reraise=True,
        sleep=sleep or time.sleep,
        before_sleep=before_sleep,
    )
    return retrying(call)
