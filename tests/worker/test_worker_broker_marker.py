"""Recovery with a Redis broker that restarts empty:
queued jobs are sent again, live jobs are left alone.

A private `redis-server` (no persistence; `tests/support/private_servers.py`) is killed and started again;
the job rows live in SQLite.
The messages are read straight from the Redis lists the worker consumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from private_servers import PrivateRedis, private_redis
from service_harness import embedded_settings, seed_job
from sqlalchemy import update

from store.db import dispose_engines, migrate, session_scope
from store.job_states import finish_job
from store.jobs import get_job
from store.models import Job, utcnow
from worker.celery_app import create_app
from worker.recovery import MARKER_KEY, RecoveryLoop

SPEC = {"preset": "cpu-small", "device": "cpu"}
STALE_S = 30.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, redis_server: PrivateRedis) -> Iterator:
    settings = embedded_settings(tmp_path / "home", broker_url=redis_server.url, stale_heartbeat_s=STALE_S)
    migrate(settings)
    yield settings
    dispose_engines()


def queued_messages(url: str, queue: str) -> list[str]:
    """Task ids of the messages waiting in a queue's Redis list, oldest first."""
    raw = redis.Redis.from_url(url).lrange(queue, 0, -1)
    return [json.loads(message)["headers"]["id"] for message in reversed(raw)]


def status(settings, job_id: str) -> str:
    with session_scope(settings) as session:
        return get_job(session, job_id).status


def test_queued_jobs_are_sent_again_exactly_when_redis_lost_its_data(settings, redis_server: PrivateRedis):
    gpu_job = seed_job(settings, SPEC, queue="fd2.gpu")
    cpu_job = seed_job(settings, SPEC, queue="fd2.cpu")
    done = seed_job(settings, SPEC)
    with session_scope(settings) as session:
        finish_job(session, done, "succeeded", metrics={})
    loop = RecoveryLoop(create_app(settings), settings, interval_s=60)

    # a new Redis: no marker yet
    assert sorted(loop.run_once(at_start=True)) == sorted([gpu_job, cpu_job])
    assert queued_messages(redis_server.url, "fd2.gpu") == [gpu_job]
    assert queued_messages(redis_server.url, "fd2.cpu") == [cpu_job]
    assert redis.Redis.from_url(redis_server.url).exists(MARKER_KEY)
    assert loop.run_once(at_start=False) == []  # the marker is there: nothing was lost
    assert queued_messages(redis_server.url, "fd2.gpu") == [gpu_job]

    redis_server.kill()
    # unreachable: the pass fails and is retried later
    assert loop.run_pass(at_start=False) is False
    redis_server.start()  # empty
    assert queued_messages(redis_server.url, "fd2.gpu") == []
    assert sorted(loop.run_once(at_start=False)) == sorted([gpu_job, cpu_job])
    assert queued_messages(redis_server.url, "fd2.gpu") == [gpu_job]
    assert queued_messages(redis_server.url, "fd2.cpu") == [cpu_job]
    assert loop.run_once(at_start=False) == []


def test_after_an_outage_heartbeats_are_not_judged_until_workers_could_beat_again(
    settings, redis_server: PrivateRedis
):
    silent = seed_job(settings, SPEC, queue="fd2.gpu")
    old_beat = utcnow() - timedelta(seconds=STALE_S * 2)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == silent).values(
            status="running", worker="remote-host:7", heartbeat_at=old_beat))
    app = create_app(settings)
    loop = RecoveryLoop(app, settings, interval_s=60)

    redis_server.kill()
    assert loop.run_pass(at_start=True) is False
    redis_server.start()
    assert loop.run_pass(at_start=True) is True
    # its worker may have been cut off by the same outage
    assert status(settings, silent) == "running"

    untroubled = RecoveryLoop(app, settings, interval_s=60)  # saw no outage: judges the heartbeat
    assert untroubled.run_once(at_start=False) == [silent]
    assert status(settings, silent) == "queued"
    assert queued_messages(redis_server.url, "fd2.gpu") == [silent]
