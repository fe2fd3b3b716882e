"""Turn the pipeline's frequent `on_event` calls into a few database writes.

The pipeline may report many times a second; the job row needs about one update a second and the event log
far fewer. Stage changes and log lines are written at once (they are rare and a client waits for them); plain
progress is coalesced and the latest value is flushed before the job's final state is written. Events of a
write that failed (the sink retries first, `worker.outages`) are kept and go out with the next write, so a
database outage delays the event log but does not cut holes in it. A `warning` (something the run accepted
but a person should know) is stored at once as an event of kind `warning`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.outages import log_failure

log = logging.getLogger(__name__)

STAGE_CHANGES = frozenset({"stage_start", "stage_end"})
# Events kept for the next write while writes fail; the oldest plain progress events go first past it.
MAX_UNSENT_EVENTS = 1000


@dataclass(frozen=True)
class ProgressUpdate:
    """The job row's progress fields at one moment."""

    stage: str | None
    progress: float
    stage_progress: float
    eta_seconds: float | None


@dataclass(frozen=True)
class EventRecord:
    """One entry of the job's event log."""

    kind: str
    message: str
    stage: str | None = None
    progress: float | None = None
    data: dict[str, Any] | None = None


class ProgressSink(Protocol):
    """Where throttled progress lands; one call is one short transaction."""

    def write(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None: ...


@dataclass
class ProgressReporter:
    """Callable `on_event` for the pipeline that throttles writes to `sink`.

    `min_interval_s` bounds job-row updates, `event_interval_s` bounds stored `progress` events.
    """

    sink: ProgressSink
    min_interval_s: float = 1.0
    event_interval_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _last_write: float = field(default=float("-inf"), init=False)
    _last_event: float = field(default=float("-inf"), init=False)
    _pending: ProgressUpdate | None = field(default=None, init=False)
    _unsent: list[EventRecord] = field(default_factory=list, init=False)
    writes: int = field(default=0, init=False)

    def __call__(self, event: Any) -> None:
        kind = getattr(event, "kind", "progress")
        update = ProgressUpdate(
            stage=getattr(event, "stage", None),
            progress=float(getattr(event, "progress", 0.0) or 0.0),
            stage_progress=float(getattr(event, "stage_progress", 0.0) or 0.0),
            eta_seconds=getattr(event, "eta_seconds", None),
        )
        now = self.clock()
        if kind in STAGE_CHANGES:
            self._write(update, [self._record(kind, event, update)], now)
        elif kind in ("log", "warning"):
            self._write(self._take_pending(), [self._record(kind, event, update)], now)
        elif now - self._last_write >= self.min_interval_s:
            events = []
            if now - self._last_event >= self.event_interval_s:
                events.append(self._record("progress", event, update))
            self._write(update, events, now)
        else:
            self._pending = update

    def flush(self) -> None:
        """Write the latest coalesced progress and any events a failed write kept (call before the final
        state)."""
        if self._pending is not None or self._unsent:
            self._write(self._take_pending(), [], self.clock())

    def _take_pending(self) -> ProgressUpdate | None:
        pending, self._pending = self._pending, None
        return pending

    def _record(self, kind: str, event: Any, update: ProgressUpdate) -> EventRecord:
        message = getattr(event, "message", None) or _default_message(kind, update)
        losses = getattr(event, "losses", None) or {}
        data: dict[str, Any] = {"stage_progress": update.stage_progress, "eta_seconds": update.eta_seconds}
        if losses:
            data["losses"] = {name: float(value) for name, value in losses.items()}
        return EventRecord(kind, message, stage=update.stage, progress=update.progress, data=data)

    def _write(self, update: ProgressUpdate | None, events: list[EventRecord], now: float) -> None:
        self._pending = None
        events = [*self._unsent, *events]
        if update is None and not events:
            return
        try:
            self.sink.write(update, events)
        except Exception as exc:  # a failed progress write must not fail a long job; its events wait for the next
            log_failure(log, f"progress write failed; continuing, its {len(events)} events go with the next write",
                        exc)
            self._unsent = _bounded(events)
            return
        self._unsent = []
        self.writes += 1
        if update is not None:
            self._last_write = now
        if any(record.kind == "progress" for record in events):
            self._last_event = now


def _bounded(events: list[EventRecord]) -> list[EventRecord]:
    """At most `MAX_UNSENT_EVENTS`, dropping the oldest plain progress events first (stage and log events
    are what a client reads the log for)."""
    excess = len(events) - MAX_UNSENT_EVENTS
    if excess <= 0:
        return events
    kept = []
    for record in events:
        if excess > 0 and record.kind == "progress":
            excess -= 1
            continue
        kept.append(record)
    return kept[-MAX_UNSENT_EVENTS:]


def _default_message(kind: str, update: ProgressUpdate) -> str:
    stage = update.stage or "job"
    if kind == "stage_start":
        return f"{stage} started"
    if kind == "stage_end":
        return f"{stage} finished"
    return f"{stage} {update.stage_progress:.0%}"
