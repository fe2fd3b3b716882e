"""Worker process lifecycle: build the worker's state at start, start recovery and the storage sweep when the
worker is ready, stop the running job on shutdown.

Shutdown (SIGTERM/SIGINT, warm): the running job is asked to stop through `should_stop`, saves what it has
finished, goes back to `queued` and its message is requeued, so stopping a worker costs seconds of work,
not the job. With the solo pool the task runs in the process that receives the signal, which is why
`fd2 worker` uses it by default. A prefork pool (`--concurrency` > 1) waits for its running jobs on a warm
shutdown; a cold one (SIGQUIT) kills them, their messages are requeued (`task_reject_on_worker_lost`) and
the next claim takes over because the holder process is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from celery import signals

log = logging.getLogger(__name__)


def connect_signals() -> None:
    """Connect the handlers; connecting again (the app module imported twice) changes nothing."""
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="fd2.worker_init")
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="fd2.worker_ready")


def shutdown_message(how: str | None, sig: str | None, running_here: Collection[str]) -> str:
    """The shutdown log line; it speaks of stopping a job only when this process runs one, so an idle
    worker's log does not suggest that work was interrupted."""
    start = f"worker {how or 'warm'} shutdown ({sig or 'no signal'})"
    jobs = sorted(running_here)
    if not jobs:
        return f"{start}: no job running in this process"
    if len(jobs) == 1:
        return f"{start}: stopping job {jobs[0]} so it can resume elsewhere"
    return f"{start}: stopping jobs {', '.join(jobs)} so they can resume elsewhere"


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """The worker starts: create its folders and its one state object, and hear its shutdown signal."""
    from worker.celery_app import WorkerApp
    from worker.state import WorkerState

    app = getattr(sender, "app", None)
    if not isinstance(app, WorkerApp):
        return  # a worker of some other Celery app in this process
    state = app.fd2_state = WorkerState.create(app.fd2_settings)
    state.settings.ensure_dirs()

    def on_shutting_down(sig: str | None = None, how: str | None = None, **_: Any) -> None:
        log.info("%s", shutdown_message(how, sig, state.running_here))
        state.shutdown.set()
        if state.recovery is not None:
            state.recovery.stop()
        if state.storage_sweep is not None:
            state.storage_sweep.stop()

    signals.worker_shutting_down.connect(on_shutting_down, weak=False)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    from worker.celery_app import WorkerApp
    from worker.recovery import RecoveryLoop
    from worker.storage_sweep import StorageSweepLoop

    app = getattr(sender, "app", None)
    if not isinstance(app, WorkerApp):
        return
    state = app.worker_state()
    interval_s = state.limits.recovery_interval_s
    state.recovery = RecoveryLoop(app, state.settings, interval_s, running_here=state.running_here).start()
    state.storage_sweep = StorageSweepLoop(state.settings, state.settings.storage_sweep_interval_s).start()
