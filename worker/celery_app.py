"""The worker's Celery app, built from the same `celery_config()` the API uses to send tasks by name.

What the configuration guarantees (see also docs of `worker.recovery`):
- JSON only, both ways; task arguments are job ids, never objects.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only after the job reached a
  final state, so a crashed worker's job is delivered again (Redis: after the visibility timeout; the
  embedded folder broker loses unacknowledged messages on SIGKILL, which start-up recovery makes up for).
- `worker_prefetch_multiplier=1` and concurrency 1 per GPU worker: a worker holds one job at a time, so a
  queued job never waits behind another job on a busy worker while an idle one could take it.
- Explicit soft/hard time limits (`worker.limits`); the soft one is also enforced cooperatively so the solo
  pool, where Celery cannot interrupt a task, honours it.
- Queues `fd2.gpu` and `fd2.cpu`; the sender routes by the spec's device (`store.settings.queue_for_device`).

Importing this module never imports torch: the pipeline is imported when a task runs, so the prefork pool
forks a process that has not initialised CUDA.
"""

from __future__ import annotations

from celery import Celery

from store.settings import Settings, get_settings
from worker.limits import worker_limits


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for the configured broker with the worker-side rules above."""
    settings = settings or get_settings()
    limits = worker_limits(settings)
    app = Celery("fd2", include=["worker.tasks"])
    app.conf.update(settings.celery_config())
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=limits.soft_time_limit_s,
        task_time_limit=limits.hard_time_limit_s,
        # Keep a long job running through a broker blip; a duplicate delivery is skipped by the job claim.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    from worker import lifecycle

    lifecycle.connect_signals()
    return app


app = create_app()
