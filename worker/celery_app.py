"""The worker's Celery app, its state and timings, and its life from start to shutdown.

The app: the shared rules of `fd2_config.celery_config` plus the worker-only ones:
- concurrency 1 per GPU worker (with the shared prefetch of one message: one job at a time);
- explicit soft/hard time limits (`WorkerLimits`); the soft one is also enforced cooperatively, so
  the solo pool, where Celery cannot interrupt a task, honours it;
- a long job keeps running through a broker blip; the job claim skips a duplicate delivery.

Timings (`worker_limits`): at the soft limit the job is stopped cooperatively (checked on every
`should_stop` poll) and fails with code `time_limit`; the prefork pool also raises
`SoftTimeLimitExceeded` then. At the hard limit a prefork child still running is killed, and the
message is handled as a lost worker. The heartbeat runs often enough that a job is only considered
abandoned after several missed beats.

State (`WorkerState`): what a worker process keeps while it runs, in one object built when the
worker starts (Celery's `worker_init`), never at import. With the solo pool that process receives
the shutdown signal and also runs the jobs. The task reads the state from its app
(`WorkerApp.worker_state`).
Tests build their own, so no two runs share a set of held jobs or a shutdown flag.

Lifecycle: when the worker is ready, recovery and the storage sweep start. On a warm shutdown
(SIGTERM, SIGINT) the running job is asked to stop through `should_stop`. It saves what it has
finished, goes back to `queued`, and its message is requeued, so stopping a worker costs seconds of
work, not the job. With the solo pool the task runs in the process that receives the signal, which
is why `fd2 worker` uses it by default. A prefork pool (`--concurrency` > 1) waits for its running
jobs on a warm shutdown. A cold one (SIGQUIT) kills them; their messages are requeued
(`task_reject_on_worker_lost`), and the next claim takes over because the holder process is gone.

Importing this module never imports torch: the pipeline is imported when a task runs, so the prefork
pool forks a process that has not initialised CUDA.
Nor does it create folders: the worker does at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery, signals

from fd2_config.celery_config import celery_config
from fd2_config.settings import Settings, get_settings

DEFAULT_SOFT_TIME_LIMIT_S = 3 * 24 * 3600.0
HARD_LIMIT_GRACE_S = 300.0
MISSED_BEATS_BEFORE_STALE = 5
MAX_HEARTBEAT_INTERVAL_S = 30.0
MIN_HEARTBEAT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WorkerLimits:
    soft_time_limit_s: float
    hard_time_limit_s: float
    stale_after_s: float
    heartbeat_interval_s: float
    recovery_interval_s: float


def worker_limits(settings: Settings) -> WorkerLimits:
    """Every timing the worker uses, from the one settings object."""
    soft = float(settings.job_soft_time_limit_s or DEFAULT_SOFT_TIME_LIMIT_S)
    hard = float(settings.job_time_limit_s or soft + HARD_LIMIT_GRACE_S)
    stale = float(settings.stale_heartbeat_s)
    beat = min(MAX_HEARTBEAT_INTERVAL_S, max(MIN_HEARTBEAT_INTERVAL_S, stale / MISSED_BEATS_BEFORE_STALE))
    return WorkerLimits(
        soft_time_limit_s=soft,
        hard_time_limit_s=max(hard, soft + 1.0),
        stale_after_s=stale,
        heartbeat_interval_s=beat,
        recovery_interval_s=max(1.0, min(60.0, stale / 2)),
    )


if TYPE_CHECKING:
    from worker.recovery import RecoveryLoop
    from worker.storage_sweep import StorageSweepLoop


@dataclass
class WorkerState:
    """Settings and timings of this worker, the jobs it runs now,
    its shutdown flag and its periodic loops."""

    settings: Settings
    limits: WorkerLimits
    # Jobs this process is running right now: the recovery pass must not mistake them for orphans.
    running_here: set[str] = field(default_factory=set)
    # Set by the worker's shutdown signal; the running job stops at its next `should_stop` poll.
    shutdown: threading.Event = field(default_factory=threading.Event)
    recovery: RecoveryLoop | None = None
    storage_sweep: StorageSweepLoop | None = None

    @classmethod
    def create(cls, settings: Settings | None = None) -> WorkerState:
        """The state of a worker using `settings` (default: the process settings),
        with no job running."""
        settings = settings or get_settings()
        return cls(settings, worker_limits(settings))


log = logging.getLogger(__name__)


def connect_signals() -> None:
    """Connect the handlers; connecting again (the app module imported twice) changes nothing."""
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="fd2.worker_init")
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="fd2.worker_ready")


def shutdown_message(how: str | None, sig: str | None, running_here: Collection[str]) -> str:
    """The shutdown log line; it speaks of stopping a job only when this process runs one, so an
    idle worker's log does not suggest that work was interrupted."""
    start = f"worker {how or 'warm'} shutdown ({sig or 'no signal'})"
    jobs = sorted(running_here)
    if not jobs:
        return f"{start}: no job running in this process"
    if len(jobs) == 1:
        return f"{start}: stopping job {jobs[0]} so it can resume elsewhere"
    return f"{start}: stopping jobs {', '.join(jobs)} so they can resume elsewhere"


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """The worker starts:
    create its folders and its one state object, and hear its shutdown signal."""

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
    from worker.recovery import RecoveryLoop
    from worker.storage_sweep import StorageSweepLoop

    app = getattr(sender, "app", None)
    if not isinstance(app, WorkerApp):
        return
    state = app.worker_state()
    interval_s = state.limits.recovery_interval_s
    state.recovery = RecoveryLoop(app, state.settings, interval_s, running_here=state.running_here).start()
    state.storage_sweep = StorageSweepLoop(state.settings, state.settings.storage_sweep_interval_s).start()


class WorkerApp(Celery):
    """The Celery app with the settings it was built from and, once a worker started on it,
    that worker's state.

    Celery's own constructor is kept (an app unpickled in a spawned pool process is rebuilt through
    it); the two attributes are set by `create_app` and `_on_worker_init`.
    """

    fd2_settings: Settings | None = None
    fd2_state: WorkerState | None = None

    def worker_state(self) -> WorkerState:
        """The state built at worker start; built here on first use where no `worker_init` ran in
        this process (a pool process started by spawn)."""
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
    connect_signals()
    return app


app = create_app()
