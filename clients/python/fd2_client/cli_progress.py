"""The `fd2-client` progress bars (tqdm, on stderr): bytes of an upload or download, and a job's stages.

`show` is None by default: bars are drawn only where stderr is a terminal (tqdm's own rule), so scripts that
capture the output get only what they asked for; True (`--progress`) draws them anyway (CI logs), False
(`--quiet`) never.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]  # (types-tqdm has the stubs)

from fd2_client.resources import Progress

# Events printed as lines above the bars (stage changes show as a new bar instead).
LOGGED_EVENT_KINDS = frozenset({"log", "warning", "cancel_requested", "failed", "cancelled"})


class ByteBar:
    """A bytes bar; call it as `on_progress(done, total)` (bytes)."""

    def __init__(self, description: str, *, show: bool | None = None, file: IO[str] | None = None) -> None:
        self.bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                        disable=_disable(show), file=file, dynamic_ncols=True)

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


class _StageBar(tqdm):  # type: ignore[misc]
    """A stage's bar with a `{job}` field: the whole job's percent and ETA after the stage's own percent."""

    job_text = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "job": self.job_text}


class StageBars:
    """One bar per stage of a job (stage name, percent of the stage, the job's percent and ETA); call it as
    `wait`'s `on_progress`. Log lines, warnings and the outcome of the job are printed above the bars."""

    BAR_FORMAT = "{desc:<9} {percentage:3.0f}%|{bar}| {job}"

    def __init__(self, *, show: bool | None = None, file: IO[str] | None = None) -> None:
        self.show = show
        self.file = file or sys.stderr  # tqdm.write would print on stdout
        self.stage: str | None = None
        self.bar: _StageBar | None = None

    def __call__(self, progress: Progress) -> None:
        event = progress.event
        if event is not None and event.get("kind") in LOGGED_EVENT_KINDS and event.get("message"):
            self._write(f"[{event.get('kind')}] {event['message']}")
        if progress.stage is None:
            return
        if progress.stage != self.stage:
            self.close()
            self.stage = progress.stage
            self.bar = _StageBar(desc=progress.stage, total=100, leave=True, disable=_disable(self.show),
                                 file=self.file, dynamic_ncols=True, bar_format=self.BAR_FORMAT)
        assert self.bar is not None
        percent = round(min(1.0, max(0.0, progress.stage_progress)) * 100, 1)
        text = job_postfix(progress)
        if (percent, text) != (self.bar.n, self.bar.job_text):
            self.bar.n, self.bar.job_text = percent, text
            self.bar.refresh()

    def _write(self, text: str) -> None:
        if self.show is not False:
            tqdm.write(text, file=self.file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def job_postfix(progress: Progress) -> str:
    """`job 42% eta 01:10`: the whole job's part done and the service's estimate of the time left (`eta ?`
    before it has one; just the status once the job ended)."""
    if progress.finished:
        return f"job {progress.progress:.0%} {progress.status}"
    eta = "?" if progress.eta_seconds is None else tqdm.format_interval(max(0.0, progress.eta_seconds))
    return f"job {progress.progress:.0%} eta {eta}"


def _disable(show: bool | None) -> bool | None:
    """tqdm's `disable`: None lets it decide by whether the output is a terminal."""
    return None if show is None else not show
