"""What a worker process keeps while it runs, in one object built when the worker starts (never at import).

`worker.lifecycle` builds it in Celery's `worker_init`, in the process that receives the shutdown signal and,
with the solo pool, also runs the jobs; the task reads it from its app (`worker.celery_app.WorkerApp`). Tests
build their own, so no two runs share a set of held jobs or a shutdown flag.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fd2_config.settings import Settings, get_settings
from worker.limits import WorkerLimits, worker_limits

if TYPE_CHECKING:
    from worker.recovery import RecoveryLoop
    from worker.storage_sweep import StorageSweepLoop


@dataclass
class WorkerState:
    """Settings and timings of this worker, the jobs it runs now, its shutdown flag and its periodic loops."""

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
        """The state of a worker using `settings` (default: the process settings), with no job running."""
        settings = settings or get_settings()
        return cls(settings, worker_limits(settings))
