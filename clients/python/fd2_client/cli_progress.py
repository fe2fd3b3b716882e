"""The `fd2-client` progress bars (tqdm, on stderr): bytes of an upload or download, and a job's stages.

Bars are drawn only where stderr is a terminal (tqdm's own rule) and never with `--quiet`, so scripts that
capture the output get only what they asked for.
"""

from __future__ import annotations

from typing import IO, Any

from tqdm import tqdm

from fd2_client.resources import Progress

LOGGED_EVENT_KINDS = frozenset({"log", "warning", "stage_start", "cancel_requested", "failed", "cancelled"})


class ByteBar:
    """A bytes bar; call it as `on_progress(done, total)` (bytes)."""

    def __init__(self, description: str, *, quiet: bool = False, file: IO[str] | None = None) -> None:
        self.bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                        disable=True if quiet else None, file=file, dynamic_ncols=True)

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


class StageBars:
    """One bar per stage of a job (stage name, percent of the stage, the job's percent and ETA); call it as
    `wait`'s `on_progress`. Log lines and warnings of the job are printed above the bars."""

    def __init__(self, *, quiet: bool = False, file: IO[str] | None = None) -> None:
        self.quiet = quiet
        self.file = file
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, progress: Progress) -> None:
        event = progress.event
        if event is not None and event.get("kind") in LOGGED_EVENT_KINDS and event.get("message"):
            self._write(f"[{event.get('kind')}] {event['message']}")
        if progress.stage is None:
            return
        if progress.stage != self.stage:
            self.close()
            self.stage = progress.stage
            self.bar = tqdm(desc=progress.stage, total=100, unit="%", leave=True, disable=True if self.quiet else None,
                            file=self.file, dynamic_ncols=True, bar_format="{desc:<9} {percentage:3.0f}%|{bar}| "
                            "{postfix}")
        assert self.bar is not None
        self.bar.n = round(min(1.0, max(0.0, progress.stage_progress)) * 100, 1)
        self.bar.set_postfix_str(job_postfix(progress), refresh=True)

    def _write(self, text: str) -> None:
        if not self.quiet:
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
    """`job 42% eta 01:10`: the whole job's part done and the service's estimate of the time left."""
    eta = "?" if progress.eta_seconds is None else tqdm.format_interval(max(0.0, progress.eta_seconds))
    return f"job {progress.progress:.0%} eta {eta}"
