"""Give jobs of dead workers back to the queue, and re-send jobs whose messages the broker lost.

Late acknowledgement covers a crash only where the broker redelivers unacknowledged messages: Redis does,
after its visibility timeout (hours, so that long jobs are not delivered twice). The embedded folder broker
removes a message when a worker takes it and keeps the unacknowledged copy in that worker's memory; a
graceful shutdown puts it back, SIGKILL loses it. So every worker also runs this loop, once when it is
ready and then every `recovery_interval_s`:

1. a `running` job whose holder process ran on this host and is gone is requeued at once;
2. a `running` job whose heartbeat is older than `stale_heartbeat_s` (holder on any host) is requeued
   (`store.jobs.requeue_stale_jobs`; a stale job with a cancel request is cancelled instead). After a pass
   that failed (the database or the broker was down) heartbeats are not judged for `stale_heartbeat_s`:
   no worker could beat during a database outage, and live ones need that long to be fresh again;
3. every `queued` job is sent again when its message may be gone: with the embedded broker at start-up
   (a worker may have died after taking the message but before claiming the job); with Redis whenever the
   broker's marker key is missing (`worker.broker_marker`: Redis restarted empty or was flushed, and took
   its queues along); and after a pass that could not send everything it meant to.

Each requeued job is sent as a fresh `fd2.run_job` message to the queue stored on the job. A duplicate
message (the one Redis redelivers later, or a re-send of a job whose message was still queued) is harmless:
the task skips a job that is finished, cancelled or held by a live worker.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from sqlalchemy import select

from store.db import session_scope
from store.jobs import finish_job, requeue_stale_jobs
from store.models import Job
from store.settings import Settings
from worker.broker_marker import BrokerMarker, marker_for
from worker.job_claims import held_here, holder_is_dead, release_job, worker_identity
from worker.outages import log_failure
from worker.queues import RUN_JOB_TASK

log = logging.getLogger(__name__)


def find_orphans(
    settings: Settings, *, include_queued: bool, judge_heartbeats: bool = True
) -> list[tuple[str, str]]:
    """Requeue the jobs of dead workers (see the module docstring); returns (job id, queue) pairs to send.

    `judge_heartbeats=False` skips step 2 (stale heartbeats) for a pass right after an outage.
    """
    to_send: list[tuple[str, str]] = []
    with session_scope(settings) as session:
        running = session.execute(
            select(Job.id, Job.worker, Job.queue, Job.cancel_requested).where(Job.status == "running")
        ).all()
        for job_id, holder, queue, cancel_requested in running:
            if not holder_is_dead(holder, running_here=job_id in held_here):
                continue
            if cancel_requested:
                finish_job(session, job_id, "cancelled")
            elif release_job(session, job_id, holder, f"worker {holder} is gone; job requeued"):
                to_send.append((job_id, queue))
        stale_ids = requeue_stale_jobs(session, settings.stale_heartbeat_s) if judge_heartbeats else []
        queues = dict(session.execute(select(Job.id, Job.queue).where(Job.id.in_(stale_ids))).all())
        to_send.extend((job_id, queues[job_id]) for job_id in stale_ids)
        if include_queued:
            sent = {job_id for job_id, _ in to_send}
            queued = session.execute(
                select(Job.id, Job.queue).where(Job.status == "queued").order_by(Job.created_at)
            ).all()
            to_send.extend((job_id, queue) for job_id, queue in queued if job_id not in sent)
    return to_send


def send_jobs(app: Celery, jobs: list[tuple[str, str]]) -> None:
    """One `fd2.run_job` message per job, to the job's own queue (after the requeue has committed).

    The task id is the job id, as the API sends it, so logs and revokes name the job.
    """
    for job_id, queue in jobs:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, task_id=job_id)
        log.info("recovery: job %s sent to %s", job_id, queue)


def recover_once(app: Celery, settings: Settings, *, at_start: bool) -> list[str]:
    """One recovery pass; returns the ids sent."""
    jobs = find_orphans(settings, include_queued=at_start and settings.uses_embedded_broker)
    send_jobs(app, jobs)
    return [job_id for job_id, _ in jobs]


class RecoveryLoop:
    """Daemon thread: a recovery pass at start, then one every `interval_s` until `stop()`."""

    def __init__(
        self, app: Celery, settings: Settings, interval_s: float, marker: BrokerMarker | None = None
    ) -> None:
        self._app, self._settings, self._interval_s = app, settings, interval_s
        self._marker = marker if marker is not None else marker_for(settings)
        self._resend_queued = False  # a pass could not send everything: the next one re-sends every queued job
        self._judge_heartbeats_after = float("-inf")  # monotonic time; pushed back by each failed pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd2-recovery", daemon=True)

    def start(self) -> RecoveryLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def run_once(self, *, at_start: bool) -> list[str]:
        """One pass (module docstring); returns the ids sent. Raises while the database or broker is down."""
        messages_lost = self._marker is not None and self._marker.missing()
        if messages_lost:
            log.warning("recovery: no marker in the broker (new, or restarted without its data); "
                        "sending every queued job again")
        resend = messages_lost or self._resend_queued or (at_start and self._settings.uses_embedded_broker)
        judge = time.monotonic() >= self._judge_heartbeats_after
        jobs = find_orphans(self._settings, include_queued=resend, judge_heartbeats=judge)
        self._resend_queued = True  # until every message is out
        send_jobs(self._app, jobs)
        self._resend_queued = False
        if messages_lost:
            # Set only after the re-send, and only when it was missing: setting it on every pass could
            # mark a Redis that restarted empty just after the check as complete.
            assert self._marker is not None
            self._marker.set(worker_identity())
        return [job_id for job_id, _ in jobs]

    def run_pass(self, *, at_start: bool) -> bool:
        """`run_once` that logs a failure instead of raising (what the thread runs); True when it succeeded."""
        try:
            self.run_once(at_start=at_start)
        except Exception as exc:  # the database or broker may be briefly away; try again next round
            log_failure(log, "recovery pass failed; next try in the next round", exc)
            self._judge_heartbeats_after = time.monotonic() + self._settings.stale_heartbeat_s
            return False
        return True

    def _run(self) -> None:
        at_start = True
        while not self._stop.is_set():
            if self.run_pass(at_start=at_start):
                at_start = False
            if self._stop.wait(self._interval_s):
                break
        if self._marker is not None:
            self._marker.close()
