"""Publish the shards that may run now: one `fd2.run_shard` message per shard
`store.shards.select_dispatch` picked.

Called when a job was split into shards, after every shard ends, and by each recovery pass
(`settle_sharded_jobs`, which also catches a tenant whose cap freed up when another of its jobs
ended, re-sends messages that may never have reached the broker, and settles jobs whose worker
stopped between writing a shard's end and the job's). The rows are committed before anything is
sent, and a shard whose message could not be published goes back to `queued`, so a broker outage
delays shards but never loses one.
"""

from __future__ import annotations

import logging

from celery import Celery

from fd2_config.celery_config import send_run_shard
from fd2_config.settings import Settings
from store.db import session_scope
from store.jobs import job_workdir
from store.models import JobStatus
from store.shards import (
    dispatched_shards,
    reconcile_sharded_jobs,
    select_dispatch,
    tenants_with_sharded_jobs,
    undo_dispatch,
)
from worker.outages import log_failure, transact
from worker.storage_sweep import discard_workdir

log = logging.getLogger(__name__)


def dispatch_tenant(app: Celery, settings: Settings, tenant_id: str) -> list[tuple[str, str]]:
    """Dispatch the tenant's ready shards; returns the (job id, shard id) pairs published."""
    picked = transact(settings, select_dispatch, tenant_id, settings.max_shards_per_tenant,
                      what=f"tenant {tenant_id}: shard dispatch")
    return _send(app, settings, picked)


def dispatch_all(app: Celery, settings: Settings) -> list[tuple[str, str]]:
    """Dispatch for every tenant with a running sharded job (a recovery pass)."""
    tenants = transact(settings, tenants_with_sharded_jobs, retry=False)
    sent: list[tuple[str, str]] = []
    for tenant_id in tenants:
        sent.extend(dispatch_tenant(app, settings, tenant_id))
    return sent


def settle_sharded_jobs(app: Celery, settings: Settings, *, resend_all: bool = False) -> None:
    """One recovery pass over sharded jobs: settle those whose shards say more than the job row
    (`store.shards.reconcile_sharded_jobs`; an ended job's folder is freed and its callback started,
    as a worker ending it would), re-send the messages of dispatched shards not taken for
    `FD2_STALE_HEARTBEAT_S` (every dispatched shard's with `resend_all`: the broker may have lost
    them), then dispatch."""
    with session_scope(settings) as session:
        settled = reconcile_sharded_jobs(session, settings.stale_heartbeat_s)
        resend = dispatched_shards(session, 0.0 if resend_all else settings.stale_heartbeat_s)
    for item in settled:
        log.info("recovery: job %s: %s", item.job_id, item.action.replace("_", " "))
        if item.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            discard_workdir(job_workdir(settings, item.job_id))
        if item.job_ended_now and item.callback_url:
            from worker.callbacks import start_callback

            start_callback(item.job_id, settings)
    for job_id, shard_id, queue in resend:
        send_run_shard(app, job_id, shard_id, queue)
        log.info("recovery: job %s: shard %s sent again", job_id, shard_id)
    dispatch_all(app, settings)


def _send(app: Celery, settings: Settings, picked: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    for job_id, shard_id, queue in picked:
        try:
            send_run_shard(app, job_id, shard_id, queue)
        except Exception as exc:  # the broker is away: the shard waits for the next dispatch
            log_failure(log, f"job {job_id}: shard {shard_id} could not be published; back to queued", exc)
            try:
                transact(settings, undo_dispatch, job_id, shard_id, retry=False)
            # a recovery pass re-sends dispatched shards after a failed pass
            except Exception as undo_exc:
                log_failure(log, f"job {job_id}: shard {shard_id} stays dispatched until the next recovery pass",
                            undo_exc)
                raise exc from undo_exc
            continue
        log.info("job %s: shard %s sent to %s", job_id, shard_id, queue)
        sent.append((job_id, shard_id))
    return sent


__all__ = ["dispatch_all", "dispatch_tenant", "settle_sharded_jobs"]
