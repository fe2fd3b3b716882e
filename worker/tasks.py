"""Celery tasks of the service. `fd2.run_job(job_id)` is the only one the API sends (by name)."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import Reject

from fd2_config.queues import RUN_JOB_TASK
from store.job_states import worker_identity
from worker.celery_app import app
from worker.job_runner import JobReleased, JobRunner

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str:
    """Run one job to a final state. Idempotent: a finished, cancelled or live-held job is skipped.

    Delivery rules (late acknowledgement, requeue on a lost worker, no result) come from the shared
    configuration (`fd2_config.celery_config`). When the worker is shutting down, the job is put back to
    `queued` and the message is requeued, so the next worker resumes it from its checkpoints.
    """
    if not isinstance(job_id, str):
        log.error("ignoring %s with a non-string job id %r", RUN_JOB_TASK, job_id)
        return "skipped"
    state = self.app.worker_state()
    if state.shutdown.is_set():
        raise Reject(f"worker shutting down before job {job_id} started", requeue=True)
    runner = JobRunner(state, worker_identity())
    try:
        return runner.run(job_id)
    except JobReleased:
        raise Reject(f"job {job_id} interrupted by worker shutdown", requeue=True) from None
