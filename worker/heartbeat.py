"""Background heartbeat for the job a worker process is running.

A separate thread keeps the job's heartbeat fresh even while the pipeline sits in one long step (loading a
large archive, a slow epoch), so only a dead process, never a busy one, looks stale to recovery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
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
