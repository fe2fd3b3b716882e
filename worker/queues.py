"""Queue names the worker consumes and the check of a `--queues` option.

GPU workers consume `fd2.gpu` with concurrency 1 (one job per GPU); CPU-only workers consume `fd2.cpu`.
Routing by the spec's `device` is `store.settings.queue_for_device`, shared with the API, and each job row
keeps the queue it was sent to so a recovered job goes back to the same one.
"""

from __future__ import annotations

from store.settings import CPU_QUEUE, GPU_QUEUE, RUN_JOB_TASK

ALL_QUEUES: tuple[str, ...] = (GPU_QUEUE, CPU_QUEUE)

__all__ = ["ALL_QUEUES", "CPU_QUEUE", "GPU_QUEUE", "RUN_JOB_TASK", "parse_queue_list"]


def parse_queue_list(text: str) -> list[str]:
    """Split a comma-separated `--queues` value, rejecting names the service never routes to."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_QUEUES]
    if unknown or not names:
        named = ", ".join(unknown) or repr(text)
        raise ValueError(f"unknown queue(s) {named}; choose from {', '.join(ALL_QUEUES)}")
    return names
