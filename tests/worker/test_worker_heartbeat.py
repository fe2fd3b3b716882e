"""The background heartbeat of a running job (worker.liveness)."""

from __future__ import annotations

import threading

from worker.liveness import Heartbeat


def test_beats_while_running_survives_failures_and_stops_on_exit():
    calls: list[int] = []
    third_call = threading.Event()

    def beat() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")  # a missed beat is tolerated
        if len(calls) >= 3:
            third_call.set()

    with Heartbeat(beat, interval_s=0.01) as heartbeat:
        assert third_call.wait(timeout=30)
    after_exit = len(calls)
    assert heartbeat.beats == after_exit - 1  # the failed one is not counted
    assert not heartbeat._thread.is_alive()  # noqa: SLF001 (the thread is joined on exit)
    assert len(calls) == after_exit
