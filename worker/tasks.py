"""Celery tasks of the service, and where a job goes: run on one worker, or planned into shards.

`fd2.run_job(job_id)` is the only task the API sends (by name). A job whose spec asks for
`max_workers` > 1 is split into shards (`worker.shard_runner`); workers then send
`fd2.run_shard(job_id, shard_id)` for each.
"""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import Reject

from fd2_config.queues import RUN_JOB_TASK, RUN_SHARD_TASK
from store.job_states import job_max_workers, worker_identity
from worker.celery_app import app
from worker.job_runner import JobReleased, JobRunner
from worker.outages import transact
from worker.outcomes import SKIPPED
from worker.shard_runner import ShardReleased, ShardRunner

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str:
    """Run one job to a final state, or plan it into shards. Idempotent: a finished, cancelled or
    live-held job is skipped.

    Delivery rules (late acknowledgement, requeue on a lost worker, no result) come from the shared
    configuration (`fd2_config.celery_config`). When the worker is shutting down, the job is put
    back to `queued` and the message is requeued,
    so the next worker resumes it from its checkpoints.
    """
    if not isinstance(job_id, str):
        log.error("ignoring %s with a non-string job id %r", RUN_JOB_TASK, job_id)
        return SKIPPED
    state = self.app.worker_state()
    if state.shutdown.is_set():
        raise Reject(f"worker shutting down before job {job_id} started", requeue=True)
    if transact(state.settings, job_max_workers, job_id, what=f"job {job_id}: read") > 1:
        # spread over several workers: docs/ARCHITECTURE.md "One job on many workers"
        return ShardRunner(state, worker_identity(), self.app).plan_job(job_id)
    try:
        return JobRunner(state, worker_identity()).run(job_id)
    except JobReleased:
        raise Reject(f"job {job_id} interrupted by worker shutdown", requeue=True) from None


@app.task(name=RUN_SHARD_TASK, bind=True)
def run_shard(self: Task, job_id: str, shard_id: str) -> str:
    """Run one shard of a sharded job. Idempotent like `run_job`: a finished shard, one held by a
    live worker or one of a job that stopped is skipped. On worker shutdown the shard goes back to
    `dispatched` and its message is requeued."""
    if not isinstance(job_id, str) or not isinstance(shard_id, str):
        log.error("ignoring %s with non-string ids %r, %r", RUN_SHARD_TASK, job_id, shard_id)
        return SKIPPED
    state = self.app.worker_state()
    if state.shutdown.is_set():
        raise Reject(f"worker shutting down before shard {shard_id} of job {job_id} started", requeue=True)
    runner = ShardRunner(state, worker_identity(), self.app)
    try:
        return runner.run_shard(job_id, shard_id)
    except ShardReleased:
        raise Reject(f"shard {shard_id} of job {job_id} interrupted by worker shutdown", requeue=True) from None
