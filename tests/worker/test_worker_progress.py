"""Throttling of pipeline events into database writes (worker.progress)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fd2_core.progress import PipelineEvent
from worker.progress import MAX_UNSENT_EVENTS, EventRecord, ProgressReporter, ProgressUpdate


@dataclass
class RecordingSink:
    writes: list[tuple[ProgressUpdate | None, list[EventRecord]]] = field(default_factory=list)
    fail_next: int = 0

    def write(self, update: ProgressUpdate | None, events: list[EventRecord]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("database is locked")
        self.writes.append((update, list(events)))

    @property
    def updates(self) -> list[ProgressUpdate]:
        return [update for update, _ in self.writes if update is not None]

    @property
    def events(self) -> list[EventRecord]:
        return [event for _, events in self.writes for event in events]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(stage: str, fraction: float, kind: str = "progress", **extra) -> PipelineEvent:
    return PipelineEvent(kind=kind, stage=stage, progress=fraction / 2, stage_progress=fraction, **extra)


def make_reporter(sink: RecordingSink, clock: FakeClock) -> ProgressReporter:
    return ProgressReporter(sink, min_interval_s=1.0, event_interval_s=5.0, clock=clock)


def test_many_events_within_a_second_become_one_write_and_the_last_is_flushed():
    sink, clock = RecordingSink(), FakeClock()
    reporter = make_reporter(sink, clock)
    for step in range(50):
        clock.now += 0.01
        reporter(progress("distill", step / 100))
    assert len(sink.updates) == 1  # the first one goes out at once, the rest are coalesced
    reporter.flush()
    assert sink.updates[-1].stage_progress == 49 / 100
    reporter.flush()  # nothing pending any more
    assert len(sink.updates) == 2


def test_progress_writes_are_spaced_by_the_interval():
    sink, clock = RecordingSink(), FakeClock()
    reporter = make_reporter(sink, clock)
    times = []
    for step in range(300):  # 30 s of events every 0.1 s
        clock.now += 0.1
        before = len(sink.writes)
        reporter(progress("pretrain", step / 300))
        if len(sink.writes) > before:
            times.append(clock.now)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps and min(gaps) >= 1.0 - 1e-9
    assert len(times) >= 25  # still about one write a second, not fewer


def test_stage_changes_and_logs_are_written_immediately():
    sink, clock = RecordingSink(), FakeClock()
    reporter = make_reporter(sink, clock)
    reporter(progress("pretrain", 0.0, kind="stage_start"))
    reporter(progress("pretrain", 1.0, kind="stage_end"))
    reporter(progress("distill", 0.0, kind="stage_start"))
    reporter(progress("distill", 0.5, kind="log", message="ipc index 1/2 distilled"))
    kinds = [event.kind for event in sink.events]
    assert kinds == ["stage_start", "stage_end", "stage_start", "log"]
    assert sink.updates[-1].stage == "distill"
    assert sink.events[-1].message == "ipc index 1/2 distilled"


def test_progress_events_are_stored_less_often_than_row_updates_and_carry_losses():
    sink, clock = RecordingSink(), FakeClock()
    reporter = make_reporter(sink, clock)
    for step in range(200):  # 20 s
        clock.now += 0.1
        reporter(progress("distill", step / 200, losses={"ce": 1.5, "fc": 0.25}))
    stored = [event for event in sink.events if event.kind == "progress"]
    assert 2 <= len(stored) <= 5
    assert len(sink.updates) > 3 * len(stored)
    assert stored[0].data["losses"] == {"ce": 1.5, "fc": 0.25}


def test_a_log_event_also_writes_pending_progress_but_not_its_own_zero_progress():
    sink, clock = RecordingSink(), FakeClock()
    reporter = make_reporter(sink, clock)
    reporter(progress("relabel", 0.1))
    clock.now += 0.2
    reporter(progress("relabel", 0.4))  # coalesced
    clock.now += 0.2
    reporter(PipelineEvent(kind="log", stage="relabel", progress=0.0, stage_progress=0.0, message="note"))
    assert sink.updates[-1].stage_progress == 0.4
    assert sink.events[-1].kind == "log"


def test_a_failed_write_does_not_raise_and_its_events_go_with_the_next_one():
    sink, clock = RecordingSink(fail_next=2), FakeClock()
    reporter = make_reporter(sink, clock)
    reporter(progress("pretrain", 0.0, kind="stage_start"))  # fails, swallowed
    reporter(progress("pretrain", 0.1, kind="log", message="epoch 1"))  # fails too
    assert sink.writes == []
    reporter(progress("pretrain", 1.0, kind="stage_end"))
    assert [event.kind for event in sink.events] == ["stage_start", "log", "stage_end"]
    assert len(sink.writes) == 1


def test_events_kept_after_a_failure_are_flushed_before_the_final_state():
    sink, clock = RecordingSink(fail_next=1), FakeClock()
    reporter = make_reporter(sink, clock)
    reporter(progress("package", 1.0, kind="stage_end"))  # fails
    reporter.flush()
    assert [event.kind for event in sink.events] == ["stage_end"]
    reporter.flush()
    assert len(sink.writes) == 1  # nothing left


def test_kept_events_are_bounded_and_drop_plain_progress_first():
    sink, clock = RecordingSink(fail_next=10**6), FakeClock()
    reporter = make_reporter(sink, clock)
    for step in range(MAX_UNSENT_EVENTS + 10):
        clock.now += 10.0  # every call writes, and stores a progress event
        reporter(progress("distill", step / 2000))
    reporter(progress("distill", 0.9, kind="log", message="ipc index 1/1 distilled"))
    sink.fail_next = 0
    reporter.flush()
    kinds = [event.kind for event in sink.events]
    assert len(kinds) == MAX_UNSENT_EVENTS and kinds[-1] == "log"
    assert sink.events[-2].progress == (MAX_UNSENT_EVENTS + 9) / 2000 / 2  # the newest progress is kept
