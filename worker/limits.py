"""Time budgets of the worker, derived from the settings.

Soft limit: the job is stopped cooperatively (checked on every `should_stop` poll, so it also works with the
solo pool, where Celery cannot interrupt a task) and fails with code `time_limit`; the prefork pool also
raises `SoftTimeLimitExceeded` at that moment. Hard limit: a prefork child still running is killed and
the message is handled as a lost worker. The heartbeat runs often enough that a job is only considered
abandoned after several missed beats.
"""

from __future__ import annotations

from dataclasses import dataclass

from fd2_config.settings import Settings

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
