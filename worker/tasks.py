"""Celery tasks of the service. `fd2.run_job(job_id)` is the only one the API sends (by name)."""

from __future__ import annotations

import logging

from celery.exceptions import Reject

from store.settings import get_settings
from worker.celery_app import app
from worker.job_claims import worker_identity
from worker.job_runner import JobReleased, JobRunner
from worker.limits import worker_limits
from worker.queues import RUN_JOB_TASK
from worker.stopping import worker_shutdown

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one job to a final state. Idempotent: a finished, cancelled or live-held job is skipped.

    When the worker is shutting down, the job is put back to `queued` and the message is requeued, so the
    next worker resumes it from its checkpoints.
    """
    if not isinstance(job_id, str):
        log.error("ignoring %s with a non-string job id %r", RUN_JOB_TASK, job_id)
        return "skipped"
    if worker_shutdown.is_set():
        raise Reject(f"worker shutting down before job {job_id} started", requeue=True)
    settings = get_settings()
    runner = JobRunner(settings, worker_limits(settings), worker_identity())
    try:
        return runner.run(job_id)
    except JobReleased:
        raise Reject(f"job {job_id} interrupted by worker shutdown", requeue=True) from None
