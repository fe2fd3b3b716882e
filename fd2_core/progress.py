"""Progress events and cooperative stopping shared by every stage.

Stages report units of work done; the reporter turns them into throttled events (overall progress,
stage progress, ETA, current losses) and polls `should_stop` so a cancel is honoured within about a
second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EVENT_INTERVAL_S = 1.0
STOP_POLL_INTERVAL_S = 0.5


class StopRequested(Exception):
    """Raised when `should_stop()` answers true; everything finished so far is already on disk."""


@dataclass(frozen=True)
class PipelineEvent:
    # "stage_start" | "progress" | "stage_end" | "log" | "warning" (a log line a person must see)
    kind: str
    stage: str
    progress: float
    stage_progress: float
    eta_seconds: float | None = None
    message: str = ""
    losses: dict[str, float] = field(default_factory=dict)


EventSink = Callable[[PipelineEvent], None]
StopCheck = Callable[[], bool]


class ProgressTracker:
    """Maps stage-local work onto one overall 0–1 scale using per-stage weights
    (estimated costs)."""

    def __init__(self, weights: dict[str, float], on_event: EventSink | None, should_stop: StopCheck | None):
        total = sum(weights.values()) or 1.0
        self._spans: dict[str, tuple[float, float]] = {}
        start = 0.0
        for name, w in weights.items():
            self._spans[name] = (start, w / total)
            start += w / total
        self._on_event = on_event
        self._should_stop = should_stop
        self._run_started = time.monotonic()
        self._progress_at_start: float | None = None

    def stage(self, name: str) -> StageReporter:
        start, span = self._spans.get(name, (1.0, 0.0))
        return StageReporter(self, name, start, span)

    def emit(self, event: PipelineEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def check_stop(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise StopRequested("stop requested")

    def eta(self, progress: float) -> float | None:
        """Remaining time from the rate of this process (work resumed from disk does not count)."""
        if self._progress_at_start is None:
            self._progress_at_start = progress
            self._run_started = time.monotonic()
            return None
        done = progress - self._progress_at_start
        elapsed = time.monotonic() - self._run_started
        if done <= 1e-6 or elapsed < 1.0:
            return None
        return max(0.0, elapsed / done * (1.0 - progress))


class StageReporter:
    def __init__(self, tracker: ProgressTracker, name: str, start: float, span: float):
        self.tracker, self.name, self.start, self.span = tracker, name, start, span
        self.total = 1
        self._last_emit = 0.0
        self._last_poll = 0.0
        self._fraction = 0.0
        self.started_at = time.monotonic()

    def overall(self, fraction: float) -> float:
        return min(1.0, self.start + self.span * min(max(fraction, 0.0), 1.0))

    def begin(self, total_units: int, message: str = "") -> None:
        self.total = max(1, int(total_units))
        self.started_at = time.monotonic()
        self.tracker.check_stop()
        self._emit("stage_start", 0.0, message or f"{self.name} started")

    def poll(self) -> None:
        """Check the stop flag, at most every STOP_POLL_INTERVAL_S."""
        now = time.monotonic()
        if now - self._last_poll >= STOP_POLL_INTERVAL_S:
            self._last_poll = now
            self.tracker.check_stop()

    def step(self, done_units: int, losses: dict[str, Any] | None = None, message: str = "") -> None:
        """Cheap to call every iteration: polls the stop flag and emits at most one event per
        interval.

        `losses` may hold tensors: they are read (a device sync) only when an event is actually
        emitted.
        """
        self.poll()
        self._fraction = max(self._fraction, done_units / self.total)
        if time.monotonic() - self._last_emit >= EVENT_INTERVAL_S:
            self._emit("progress", self._fraction, message, losses or {})

    def log(self, message: str, fraction: float | None = None) -> None:
        if fraction is not None:
            self._fraction = max(self._fraction, fraction)
        self._emit("log", self._fraction, message)

    def warn(self, message: str) -> None:
        """A `warning` event: something the run accepted but a person should know
        (shown even by a quiet CLI)."""
        self._emit("warning", self._fraction, message)

    def end(self, message: str = "") -> None:
        self._emit("stage_end", 1.0, message or f"{self.name} finished")

    def _emit(self, kind: str, fraction: float, message: str, losses: dict[str, Any] | None = None) -> None:
        self._last_emit = time.monotonic()
        overall = self.overall(fraction)
        self.tracker.emit(
            PipelineEvent(
                kind=kind,
                stage=self.name,
                progress=round(overall, 4),
                stage_progress=round(min(max(fraction, 0.0), 1.0), 4),
                eta_seconds=self.tracker.eta(overall),
                message=message,
                losses={k: round(float(v), 5) for k, v in (losses or {}).items()},
            )
        )


class UnitReporter(StageReporter):
    """One unit's view of its stage (a teacher, a class block, a range of relabel epochs): its share
    of the stage's progress, from `offset` (a fraction of the stage) for `share` of it.

    The stage's first unit starts the stage and its last unit ends it; the others log instead, so a
    run of several units shows each stage once. A unit run alone (one shard) is `first` and `last`:
    the whole stage. `prefix` names the unit in its messages; `begin_message` and `end_message` are
    its defaults.
    """

    def __init__(self, parent: StageReporter, offset: float, share: float, *, first: bool, last: bool,
                 prefix: str = "", begin_message: str = "", end_message: str = "") -> None:
        super().__init__(parent.tracker, parent.name, parent.start + offset * parent.span, share * parent.span)
        self.first, self.last, self.prefix = first, last, prefix
        self.begin_message, self.end_message = begin_message, end_message

    def begin(self, total_units: int, message: str = "") -> None:
        self.total = max(1, int(total_units))
        self.tracker.check_stop()
        text = message or self.begin_message
        if self.first:
            self._emit("stage_start", 0.0, text or f"{self.name} started")
        elif text:
            self._emit("log", 0.0, text)

    def end(self, message: str = "") -> None:
        text = message or self.end_message
        if self.last:
            self._emit("stage_end", 1.0, text or f"{self.name} finished")
        elif text:
            self._emit("log", 1.0, text)

    def _emit(self, kind: str, fraction: float, message: str, losses: dict[str, Any] | None = None) -> None:
        super()._emit(kind, fraction, f"{self.prefix}: {message}" if self.prefix and message else message, losses)


class UnitTracker:
    """The run's progress tracker as one unit sees it: its own stage through a `UnitReporter`, every
    other stage as the run's own."""

    def __init__(self, tracker: ProgressTracker, stage: str, offset: float, share: float, *, first: bool,
                 last: bool, prefix: str = "", begin_message: str = "", end_message: str = "") -> None:
        self._tracker, self._stage = tracker, stage
        self._unit = dict(offset=offset, share=share, first=first, last=last, prefix=prefix,
                          begin_message=begin_message, end_message=end_message)

    def stage(self, name: str) -> StageReporter:
        reporter = self._tracker.stage(name)
        if name != self._stage:
            return reporter
        unit = self._unit
        return UnitReporter(reporter, unit["offset"], unit["share"], first=unit["first"], last=unit["last"],
                            prefix=unit["prefix"], begin_message=unit["begin_message"],
                            end_message=unit["end_message"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


def unit_tracker(tracker: ProgressTracker, stage: str, index: int, count: int, *, prefix: str = "",
                 begin_message: str = "", end_message: str = "") -> UnitTracker:
    """Unit `index` of `count` equal units of `stage` as one run drives them
    (a shard is `count` 1)."""
    return UnitTracker(tracker, stage, index / count, 1 / count, first=index == 0, last=index == count - 1,
                       prefix=prefix, begin_message=begin_message, end_message=end_message)
