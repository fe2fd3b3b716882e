"""When a running pipeline is told to stop (worker.liveness)."""

from __future__ import annotations

import threading

from worker.liveness import StopPoller, StopReason


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class CancelFlag:
    """Counts how often the (database) flag is read."""

    def __init__(self, value: bool = False, error: Exception | None = None) -> None:
        self.value, self.error, self.reads = value, error, 0

    def __call__(self) -> bool:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.value


def make_poller(flag: CancelFlag, clock: FakeClock, deadline: float | None = None) -> StopPoller:
    return StopPoller(flag, poll_interval_s=1.0, deadline=deadline, shutdown=threading.Event(), clock=clock)


def test_cancel_flag_is_read_at_most_once_per_interval():
    flag, clock = CancelFlag(), FakeClock()
    poller = make_poller(flag, clock)
    for _ in range(100):  # 10 s of polling every 0.1 s
        assert poller() is False
        clock.now += 0.1
    assert 9 <= flag.reads <= 11


def test_cancel_is_seen_within_one_interval_and_sticks():
    flag, clock = CancelFlag(), FakeClock()
    poller = make_poller(flag, clock)
    assert poller() is False
    flag.value = True
    seen_after = None
    for step in range(1, 30):
        clock.now += 0.1
        if poller():
            seen_after = step * 0.1
            break
    assert seen_after is not None and seen_after <= 1.0 + 1e-9
    assert poller.reason is StopReason.CANCELLED
    flag.value = False
    assert poller() is True  # the first reason sticks


def test_shutdown_and_deadline_are_checked_on_every_call_without_reading_the_flag():
    flag, clock = CancelFlag(), FakeClock()
    poller = make_poller(flag, clock)
    poller()
    poller.shutdown.set()
    assert poller() is True and poller.reason is StopReason.SHUTDOWN
    assert flag.reads == 1

    flag2 = CancelFlag()
    timed = make_poller(flag2, clock, deadline=clock.now + 5)
    assert timed() is False
    clock.now += 5
    assert timed() is True and timed.reason is StopReason.TIME_LIMIT


def test_an_unreadable_flag_is_not_a_cancel():
    flag, clock = CancelFlag(error=RuntimeError("connection refused")), FakeClock()
    poller = make_poller(flag, clock)
    for _ in range(5):
        assert poller() is False
        clock.now += 1.0
    assert flag.reads == 5


def test_the_shutdown_line_speaks_of_a_running_job_only_when_there_is_one():
    from worker.celery_app import shutdown_message

    idle = shutdown_message("Warm", "SIGTERM", set())
    assert idle == "worker Warm shutdown (SIGTERM): no job running in this process"
    assert "resume" not in idle
    busy = shutdown_message("Warm", "SIGTERM", {"job_abc"})
    assert busy == "worker Warm shutdown (SIGTERM): stopping job job_abc so it can resume elsewhere"
