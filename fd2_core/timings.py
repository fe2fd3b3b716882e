"""Wall-clock time of a run's steps, for `report.json` → `timings_s`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    """Seconds per named step on the monotonic clock, and the total since the object was made.

    A step is timed with `with timings.measure(name): ...`; a step that raises records nothing, because a run
    that fails writes no report.
    """

    def __init__(self) -> None:
        self._started = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Record the seconds the `with` block took as `seconds[name]`."""
        started = time.monotonic()
        yield
        self.seconds[name] = time.monotonic() - started

    def finish(self) -> dict[str, float]:
        """Record `total` (seconds since creation) and return every entry in seconds, rounded to the millisecond."""
        self.seconds["total"] = time.monotonic() - self._started
        return {name: round(value, 3) for name, value in self.seconds.items()}
