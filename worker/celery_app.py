"""The worker's Celery app: the shared rules of `fd2_config.celery_config` plus the worker-only ones.

Worker-only rules:
- concurrency 1 per GPU worker (with the shared prefetch of one message: one job at a time);
- explicit soft/hard time limits (`worker.limits`); the soft one is also enforced cooperatively so the solo
  pool, where Celery cannot interrupt a task, honours it;
- a long job keeps running through a broker blip; a duplicate delivery is skipped by the job claim.
The worker's state (`worker.state.WorkerState`) is built when a worker starts on the app (`worker.lifecycle`),
not here.

Importing this module never imports torch: the pipeline is imported when a task runs, so the prefork pool
forks a process that has not initialised CUDA. Nor does it create folders: the worker does at start.
"""

from __future__ import annotations

from celery import Celery

from fd2_config.celery_config import celery_config
from fd2_config.settings import Settings, get_settings
from worker.limits import worker_limits
from worker.state import WorkerState


class WorkerApp(Celery):
    """The Celery app with the settings it was built from and, once a worker started on it, that worker's state.

    Celery's own constructor is kept (an app unpickled in a spawned pool process is rebuilt through it); the
    two attributes are set by `create_app` and `worker.lifecycle`.
    """

    fd2_settings: Settings | None = None
    fd2_state: WorkerState | None = None

    def worker_state(self) -> WorkerState:
        """The state built at worker start; built here on first use where no `worker_init` ran in this
        process (a pool process started by spawn)."""
        if self.fd2_state is None:
            self.fd2_state = WorkerState.create(self.fd2_settings)
        return self.fd2_state


def create_app(settings: Settings | None = None) -> WorkerApp:
    """A Celery app for the configured broker with the worker-side rules above."""
    settings = settings or get_settings()
    limits = worker_limits(settings)
    app = WorkerApp("fd2", include=["worker.tasks"])
    app.fd2_settings = settings
    app.conf.update(celery_config(settings))
    app.conf.update(
        worker_concurrency=1,
        task_soft_time_limit=limits.soft_time_limit_s,
        task_time_limit=limits.hard_time_limit_s,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    from worker import lifecycle

    lifecycle.connect_signals()
    return app


app = create_app()
