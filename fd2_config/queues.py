"""Queue and task names, the routing of a job by its spec's device, and the check of a `--queues` option.

GPU workers consume `fd2.gpu` with concurrency 1 (one job per GPU); CPU-only workers consume `fd2.cpu`.
The API routes a job with `queue_for_device` and each job row keeps the queue it was sent to, so a recovered
job goes back to the same one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fd2_config.settings import Settings

GPU_QUEUE = "fd2.gpu"
CPU_QUEUE = "fd2.cpu"
RUN_JOB_TASK = "fd2.run_job"
# One shard of a job spread over several workers (spec `max_workers` > 1), sent to the job's queue.
RUN_SHARD_TASK = "fd2.run_shard"
ALL_QUEUES: tuple[str, ...] = (GPU_QUEUE, CPU_QUEUE)


def queue_for_device(settings: Settings, device: str) -> str:
    """Route a job by its spec's device: explicit cpu/cuda pick their queue, `auto` the configured default."""
    if device == "cpu":
        return CPU_QUEUE
    if device == "cuda":
        return GPU_QUEUE
    return settings.default_queue


def parse_queue_list(text: str) -> list[str]:
    """Split a comma-separated `--queues` value; raises ValueError naming queues the service never routes to."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_QUEUES]
    if unknown or not names:
        named = ", ".join(unknown) or repr(text)
        raise ValueError(f"unknown queue(s) {named}; choose from {', '.join(ALL_QUEUES)}")
    return names
