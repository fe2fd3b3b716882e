"""Retried database writes and one-line outage logs (worker.outages); the real outage is in
tests/e2e/test_e2e_restarts.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from fd2_config.settings import Settings
from worker.outages import FIRST_WAIT_S, JITTER_S, MAX_WAIT_S, log_failure, with_retries


def refused() -> OperationalError:
    return OperationalError("UPDATE jobs", {}, Exception("connection refused"))


class FlakyWrite:
    """A write that fails `failures` times with `error`, then returns 'done'."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_an_outage_is_retried_with_growing_waits(tmp_path: Path):
    settings = Settings(home=tmp_path, database_retry_s=300)
    waits: list[float] = []
    write = FlakyWrite(4, refused())
    assert with_retries(settings, write, "test write", sleep=waits.append) == "done"
    assert write.calls == 5 and len(waits) == 4
    assert FIRST_WAIT_S <= waits[0] <= FIRST_WAIT_S + JITTER_S < waits[-1] <= MAX_WAIT_S + JITTER_S


def test_other_errors_are_raised_at_once(tmp_path: Path):
    settings = Settings(home=tmp_path, database_retry_s=300)
    write = FlakyWrite(1, IntegrityError("INSERT", {}, Exception("duplicate key")))
    with pytest.raises(IntegrityError):
        with_retries(settings, write, sleep=lambda _s: None)
    assert write.calls == 1


def test_an_outage_longer_than_the_budget_is_raised(tmp_path: Path):
    settings = Settings(home=tmp_path, database_retry_s=0)
    write = FlakyWrite(10, refused())
    with pytest.raises(OperationalError):
        with_retries(settings, write, sleep=lambda _s: None)
    assert write.calls == 1


def test_outages_log_one_line_and_bugs_their_traceback(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("fd2.test")
    with caplog.at_level(logging.WARNING, logger="fd2.test"):
        log_failure(logger, "heartbeat write failed", refused())
        log_failure(logger, "heartbeat write failed", KeyError("bug"))
    outage, bug = caplog.records
    assert outage.exc_info is None and "connection refused" in outage.getMessage()
    assert bug.exc_info is not None
