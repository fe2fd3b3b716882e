"""While a job runs: the heartbeat that shows it is alive, and the poll that tells it to stop.

Heartbeat: a separate thread keeps the job's heartbeat fresh even while the pipeline sits in one
long step (loading a large archive, a slow epoch), so only a dead process, never a busy one, looks
stale to recovery.

Stop poll: the pipeline calls `should_stop()` often, for a cancel request, a worker shutdown or the
time limit. The cancel flag lives in the database, so it is read at most once per `poll_interval_s`
and cached in between. A worker shutdown (SIGTERM) and the job's time budget are checked on every
call because they cost nothing. The first reason seen sticks, so the task can tell a cancelled job
(final) from an interrupted one (to be resumed elsewhere).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType

from worker.outages import log_failure

log = logging.getLogger(__name__)


class Heartbeat:
    """Context manager that calls `beat()` every `interval_s` seconds until exit."""

    def __init__(self, beat: Callable[[], None], interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd2-heartbeat", daemon=True)
        self.beats = 0

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self._interval_s))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._beat()
                self.beats += 1
            except Exception as exc:  # a missed beat is tolerated; recovery waits several intervals
                log_failure(log, "heartbeat write failed", exc)




class StopReason(str, Enum):
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    TIME_LIMIT = "time_limit"


@dataclass
class StopPoller:
    """Callable `should_stop` for the pipeline; `shutdown` is the worker's shutdown flag
    (`WorkerState`)."""

    is_cancel_requested: Callable[[], bool]
    poll_interval_s: float = 1.0
    deadline: float | None = None
    shutdown: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic
    reason: StopReason | None = field(default=None, init=False)
    _next_poll: float = field(default=float("-inf"), init=False)

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        now = self.clock()
        if self.shutdown.is_set():
            self.reason = StopReason.SHUTDOWN
        elif self.deadline is not None and now >= self.deadline:
            self.reason = StopReason.TIME_LIMIT
        elif now >= self._next_poll:
            self._next_poll = now + self.poll_interval_s
            if self._cancel_requested():
                self.reason = StopReason.CANCELLED
        return self.reason is not None

    def _cancel_requested(self) -> bool:
        try:
            return bool(self.is_cancel_requested())
        except Exception as exc:  # an unreachable database must not look like a cancel
            log_failure(log, "cancel poll failed; will retry", exc)
            return False
