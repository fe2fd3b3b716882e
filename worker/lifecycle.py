"""Worker process lifecycle: start recovery when the worker is ready, stop the running job on shutdown.

Shutdown (SIGTERM/SIGINT, warm): the running job is asked to stop through `should_stop`, saves what it has
finished, goes back to `queued` and its message is requeued, so stopping a worker costs seconds of work,
not the job. With the solo pool the task runs in the process that receives the signal, which is why
`fd2 worker` uses it by default. A prefork pool (`--concurrency` > 1) waits for its running jobs on a warm
shutdown; a cold one (SIGQUIT) kills them, their messages are requeued (`task_reject_on_worker_lost`) and
the next claim takes over because the holder process is gone.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from worker.stopping import worker_shutdown

log = logging.getLogger(__name__)
_connected = False
_recovery: list[Any] = []


def connect_signals() -> None:
    """Connect the handlers once per process (the app module may be imported more than once)."""
    global _connected
    if _connected:
        return
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
    _connected = True


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    from store.settings import get_settings
    from worker.limits import worker_limits
    from worker.recovery import RecoveryLoop

    app = getattr(sender, "app", None)
    if app is None:
        from worker.celery_app import app
    settings = get_settings()
    _recovery.append(RecoveryLoop(app, settings, worker_limits(settings).recovery_interval_s).start())


def _on_worker_shutting_down(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    log.info("worker %s shutdown (%s): stopping the running job so it can resume elsewhere", how, sig)
    worker_shutdown.set()
    for loop in _recovery:
        loop.stop()
