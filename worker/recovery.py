"""Give jobs of dead workers back to the queue, and re-send jobs whose messages the broker lost.

Late acknowledgement covers a crash only where the broker redelivers unacknowledged messages: Redis
does, after its visibility timeout (hours, so that long jobs are not delivered twice). The embedded
folder broker removes a message when a worker takes it and keeps the unacknowledged copy in that
worker's memory; a graceful shutdown puts it back, SIGKILL loses it. So every worker also runs this
loop, once when it is ready and then every `recovery_interval_s`:

1. a `running` job whose holder process ran on this host and is gone is requeued at once;
2. a `running` job whose heartbeat is older than `stale_heartbeat_s` (holder on any host) is
   requeued (a stale job with a cancel request is cancelled instead). After a pass that failed (the
   database or the broker was down) heartbeats are not judged for `stale_heartbeat_s`: no worker
   could beat during a database outage, and live ones need that long to be fresh again;
3. every `queued` job is sent again when its message may be gone: with the embedded broker at
   start-up (a worker may have died after taking the message but before claiming the job); with
   Redis whenever the broker's marker key is missing (`BrokerMarker` below: Redis restarted empty or
   was flushed, and took its queues along); and after a pass that could not send everything it meant
   to.

The shards of jobs spread over several workers are judged the same way, one by one
(`store.shards.requeue_orphan_shards`: a dead or silent holder's shard goes back to `queued`); each
pass then dispatches the shards that may run and settles jobs whose worker stopped between two
writes (`worker.shard_dispatch.settle_sharded_jobs`), and re-sends the messages of dispatched shards
when it re-sends queued jobs (the broker may have lost both) or when one was not taken for
`stale_heartbeat_s`.

The job rows change in `store.job_states.find_orphans`; this module decides when to look, and sends
each job to be run again as a fresh `fd2.run_job` message to the queue stored on the job
(`fd2_config.celery_config.send_run_job`, the one send path, also the API's). A duplicate message
(the one Redis redelivers later, or a re-send of a job whose message was still queued) is harmless:
the task skips a job that is finished, cancelled or held by a live worker.

The broker's marker (`BrokerMarker`) notices when the Redis broker has lost its messages.
A Redis without persistence comes back empty after a restart (so does one that was flushed, or a
replica promoted before it had the data). Every message waiting in a queue is gone while the
database still says `queued`, and Redis does not tell its clients. So the workers keep a marker key
in the broker's database. It lives as long as Redis keeps its data and vanishes with everything
else. A recovery pass that finds it missing sends every queued job again and then sets it.
Re-sending is safe: the job claim skips a duplicate message (`store.job_states`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from celery import Celery

from fd2_config.celery_config import send_run_job
from fd2_config.settings import Settings
from store.db import session_scope
from store.job_states import find_orphans, worker_identity
from store.shards import requeue_orphan_shards
from worker.outages import log_failure
from worker.shard_dispatch import settle_sharded_jobs

if TYPE_CHECKING:
    import redis

MARKER_KEY = "fd2:broker-marker"
REDIS_TIMEOUT_S = 5.0


class BrokerMarker:
    """The marker key in the Redis database that holds the job queues."""

    def __init__(self, broker_url: str) -> None:
        import redis

        self._client: redis.Redis = redis.Redis.from_url(
            broker_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )

    def missing(self) -> bool:
        """True when Redis lost its data since the marker was set (or it was never set); raises
        `redis.RedisError` while Redis is unreachable."""
        return not self._client.exists(MARKER_KEY)

    def set(self, holder: str) -> None:
        """Record that every queued job has a message now;
        `holder` names the worker that made sure."""
        self._client.set(MARKER_KEY, holder)

    def close(self) -> None:
        self._client.close()


def marker_for(settings: Settings) -> BrokerMarker | None:
    """A marker for a Redis broker;
    None for the embedded broker, which re-sends queued jobs at start-up."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return BrokerMarker(settings.broker_url)
    return None


log = logging.getLogger(__name__)


def requeue_orphans(
    settings: Settings, *, running_here: Collection[str] = (), include_queued: bool, judge_heartbeats: bool = True
) -> list[tuple[str, str]]:
    """Requeue the jobs of dead workers in one transaction (`store.job_states.find_orphans`);
    returns the (job id, queue) pairs to send once it has committed."""
    with session_scope(settings) as session:
        requeue_orphan_shards(session, settings.stale_heartbeat_s, running_here=running_here,
                              judge_heartbeats=judge_heartbeats)
        return find_orphans(session, settings.stale_heartbeat_s, running_here=running_here,
                            include_queued=include_queued, judge_heartbeats=judge_heartbeats)


def send_jobs(app: Celery, jobs: list[tuple[str, str]]) -> None:
    """One `fd2.run_job` message per job, to the job's own queue
    (after the requeue has committed)."""
    for job_id, queue in jobs:
        send_run_job(app, job_id, queue)
        log.info("recovery: job %s sent to %s", job_id, queue)


def recover_once(
    app: Celery, settings: Settings, *, at_start: bool, running_here: Collection[str] = ()
) -> list[str]:
    """One recovery pass; returns the ids sent."""
    resend = at_start and settings.uses_embedded_broker
    jobs = requeue_orphans(settings, running_here=running_here, include_queued=resend)
    send_jobs(app, jobs)
    settle_sharded_jobs(app, settings, resend_all=resend)
    return [job_id for job_id, _ in jobs]


class RecoveryLoop:
    """Daemon thread: a recovery pass at start, then one every `interval_s` until `stop()`.

    `running_here` is the live set of jobs this process runs (`WorkerState.running_here`),
    read on each pass.
    """

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        interval_s: float,
        marker: BrokerMarker | None = None,
        *,
        running_here: Collection[str] = (),
    ) -> None:
        self._app, self._settings, self._interval_s = app, settings, interval_s
        self._running_here = running_here
        self._marker = marker if marker is not None else marker_for(settings)
        # a pass could not send everything: the next one re-sends every queued job
        self._resend_queued = False
        # monotonic time; pushed back by each failed pass
        self._judge_heartbeats_after = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd2-recovery", daemon=True)

    def start(self) -> RecoveryLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def run_once(self, *, at_start: bool) -> list[str]:
        """One pass (module docstring); returns the ids sent.
        Raises while the database or broker is down."""
        messages_lost = self._marker is not None and self._marker.missing()
        if messages_lost:
            log.warning("recovery: no marker in the broker (new, or restarted without its data); "
                        "sending every queued job again")
        resend = messages_lost or self._resend_queued or (at_start and self._settings.uses_embedded_broker)
        judge = time.monotonic() >= self._judge_heartbeats_after
        jobs = requeue_orphans(self._settings, running_here=self._running_here, include_queued=resend,
                               judge_heartbeats=judge)
        self._resend_queued = True  # until every message is out
        send_jobs(self._app, jobs)
        settle_sharded_jobs(self._app, self._settings, resend_all=resend)
        self._resend_queued = False
        if messages_lost:
            # Set only after the re-send, and only when it was missing: setting it on every pass
            # could mark a Redis that restarted empty just after the check as complete.
            assert self._marker is not None
            self._marker.set(worker_identity())
        return [job_id for job_id, _ in jobs]

    def run_pass(self, *, at_start: bool) -> bool:
        """`run_once` that logs a failure instead of raising (what the thread runs);
        True when it succeeded."""
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
