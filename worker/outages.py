"""Riding out database and broker outages:
retried writes for a running job, one-line logs for the rest.

A job may run for hours; a PostgreSQL restart or failover lasting seconds to minutes must neither
fail it nor lose what it records. Every write a worker makes for a job (claim, events, progress,
artifacts, final state) goes through `with_retries`: errors that mean "the database cannot serve us
right now" (`store.db.database_unavailable`) are retried with exponential backoff and jitter for up
to `FD2_DATABASE_RETRY_S`; any other error, or a longer outage, is raised. Each attempt is one whole
transaction (`session_scope` rolls back a failed one), so a retry never applies half a write.

Work that simply runs again a few seconds later (heartbeat, cancel poll, recovery pass) is not
retried; its failures during an outage are logged as one line by `log_failure`, not as a traceback
every few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from fd2_config.settings import Settings
from store.db import database_unavailable, session_scope

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0
JITTER_S = 0.5  # spread, so workers cut off together do not all retry in step


def retrying(settings: Settings, what: str = "database write", sleep: Callable[[float], None] = time.sleep
             ) -> Retrying:
    """The worker's retry policy for database writes (see the module docstring); `what` names the
    write in the log."""

    def log_retry(state: RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        log.warning("%s: database unavailable, retry %d in %.1f s (%s)", what, state.attempt_number,
                    state.next_action.sleep, _one_line(state.outcome.exception()))

    return Retrying(
        retry=retry_if_exception(database_unavailable),
        stop=stop_after_delay(settings.database_retry_s),
        wait=wait_exponential(multiplier=FIRST_WAIT_S, max=MAX_WAIT_S) + wait_random(0, JITTER_S),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )


def with_retries(settings: Settings, write: Callable[[], T], what: str = "database write",
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`write()` (one whole transaction), retried while the database is unavailable; its result.

    Raises what `write` raised when the error is not an outage or the outage outlasts
    `database_retry_s`.
    """
    return retrying(settings, what, sleep)(write)


def transact(settings: Settings, store_fn: Callable[..., T], *args: Any, retry: bool = True,
             what: str | None = None, **kwargs: Any) -> T:
    """`store_fn(session, *args, **kwargs)` in one transaction of its own; its result.

    With `retry` (every write that records a job) the transaction is retried through a database
    outage (`with_retries`); without it (heartbeat, cancel poll: they run again seconds later) it is
    tried once. `what` names the write in the log (default: the store function's name).
    """
    def once() -> T:
        with session_scope(settings) as session:
            return store_fn(session, *args, **kwargs)

    if not retry:
        return once()
    return with_retries(settings, once, what or store_fn.__name__.replace("_", " "))


def is_outage(exc: BaseException) -> bool:
    """True for a database or broker that cannot be reached right now (as opposed to a bug)."""
    if database_unavailable(exc):
        return True
    from kombu.exceptions import OperationalError as BrokerUnavailable
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (OSError, BrokerUnavailable, RedisConnectionError, RedisTimeoutError))


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """`what` failed: one line for an outage (it is expected and retried), the traceback for
    anything else."""
    if is_outage(exc):
        logger.warning("%s (%s)", what, _one_line(exc))
    else:
        logger.warning("%s", what, exc_info=exc)


def _one_line(exc: BaseException | None) -> str:
    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {detail}"
