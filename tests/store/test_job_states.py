"""Claiming, releasing and recovering jobs against a real (SQLite) database and the embedded
broker."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from service_harness import embedded_settings, seed_job
from sqlalchemy import update

from store.db import dispose_engines, migrate, session_scope
from store.job_states import (
    claim_job,
    end_job,
    finish_job,
    holder_is_dead,
    release_job,
    request_cancel,
    worker_identity,
)
from store.jobs import get_job, list_events
from store.models import (
    FINAL_EVENT_KINDS,
    FINISHED_JOB_STATUSES,
    DatasetStatus,
    EventKind,
    Job,
    JobStatus,
    ShardStatus,
    utcnow,
)
from worker.celery_app import create_app
from worker.recovery import recover_once, requeue_orphans

SPEC = {"preset": "cpu-small", "device": "cpu"}
STALE_S = 30.0


@pytest.fixture
def settings(tmp_path: Path) -> Iterator:
    settings = embedded_settings(tmp_path / "home", stale_heartbeat_s=STALE_S)
    migrate(settings)
    yield settings
    dispose_engines()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def here(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


def set_running(settings, job_id: str, holder: str, heartbeat_age_s: float = 0.0) -> None:
    beat = utcnow() - timedelta(seconds=heartbeat_age_s)
    with session_scope(settings) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker=holder, heartbeat_at=beat)
        )


def job_row(settings, job_id: str) -> Job:
    with session_scope(settings) as session:
        return get_job(session, job_id)


def event_kinds(settings, job_id: str) -> list[str]:
    with session_scope(settings) as session:
        return [event.kind for event in list_events(session, job_id)]


def claim(settings, job_id: str, me: str = "other-host:1") -> Job | None:
    with session_scope(settings) as session:
        return claim_job(session, job_id, me, STALE_S)


# ---------------------------------------------------------------- holder liveness


def test_holder_liveness_on_this_host():
    assert holder_is_dead(here(dead_pid()), running_here=False)
    assert not holder_is_dead(here(os.getppid()), running_here=False)  # our parent is alive
    assert holder_is_dead(here(os.getpid()), running_here=False)  # this process, not running it
    assert not holder_is_dead(here(os.getpid()), running_here=True)
    assert not holder_is_dead(f"elsewhere-{socket.gethostname()}:{dead_pid()}", running_here=False)
    assert not holder_is_dead(None, running_here=False)
    assert not holder_is_dead("garbage", running_here=False)


# ---------------------------------------------------------------- claims


def test_a_queued_job_is_claimed_once(settings):
    job_id = seed_job(settings, SPEC)
    first = claim(settings, job_id, "host-a:10")
    assert first is not None and first.status == "running" and first.worker == "host-a:10"
    assert first.attempts == 1
    assert claim(settings, job_id, "host-b:20") is None  # a live holder (fresh heartbeat) keeps it
    assert job_row(settings, job_id).worker == "host-a:10"


def test_finished_and_cancelled_jobs_are_skipped(settings):
    finished = seed_job(settings, SPEC)
    cancelled = seed_job(settings, SPEC)
    with session_scope(settings) as session:
        finish_job(session, finished, "succeeded", metrics={})
        request_cancel(session, cancelled)
    assert claim(settings, finished) is None
    assert claim(settings, cancelled) is None
    assert job_row(settings, finished).status == "succeeded"
    assert job_row(settings, cancelled).status == "cancelled"


def test_a_dead_holder_on_this_host_is_taken_over_at_once(settings):
    job_id = seed_job(settings, SPEC)
    set_running(settings, job_id, here(dead_pid()), heartbeat_age_s=0)
    claimed = claim(settings, job_id, worker_identity())
    assert claimed is not None and claimed.worker == worker_identity()
    assert "takeover" in event_kinds(settings, job_id)


def test_a_remote_holder_is_taken_over_only_after_its_heartbeat_is_stale(settings):
    job_id = seed_job(settings, SPEC)
    set_running(settings, job_id, "remote-host:7", heartbeat_age_s=STALE_S / 3)
    assert claim(settings, job_id) is None
    set_running(settings, job_id, "remote-host:7", heartbeat_age_s=STALE_S * 2)
    assert claim(settings, job_id, "host-b:20") is not None


def test_a_running_job_cancelled_while_its_worker_died_ends_cancelled(settings):
    job_id = seed_job(settings, SPEC)
    set_running(settings, job_id, here(dead_pid()))
    with session_scope(settings) as session:
        assert request_cancel(session, job_id)
    assert claim(settings, job_id) is None
    assert job_row(settings, job_id).status == "cancelled"


def test_release_only_affects_the_named_holder(settings):
    job_id = seed_job(settings, SPEC)
    set_running(settings, job_id, "host-a:10")
    with session_scope(settings) as session:
        assert not release_job(session, job_id, "host-b:20", "not mine")
    assert job_row(settings, job_id).status == "running"
    with session_scope(settings) as session:
        assert release_job(session, job_id, "host-a:10", "shutting down")
    row = job_row(settings, job_id)
    assert (row.status, row.worker, row.heartbeat_at) == ("queued", None, None)
    assert "requeued" in event_kinds(settings, job_id)


# ---------------------------------------------------------------- recovery


def broker_messages(settings, queue: str) -> list[str]:
    """Job ids of the `fd2.run_job` messages waiting in the embedded broker's queue
    (consumed here)."""
    app = create_app(settings)
    ids = []
    with Connection(app.conf.broker_url, transport_options=app.conf.broker_transport_options) as conn:
        simple = conn.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                break
            args, _kwargs, _embed = message.decode()
            ids.append(args[0])
            message.ack()
        simple.close()
    return ids


def test_recovery_requeues_dead_and_stale_jobs_and_leaves_live_ones(settings):
    dead_here = seed_job(settings, SPEC, queue="fd2.cpu")
    stale_remote = seed_job(settings, SPEC, queue="fd2.gpu")
    live_remote = seed_job(settings, SPEC)
    running_in_this_process = seed_job(settings, SPEC)
    set_running(settings, dead_here, here(dead_pid()))
    set_running(settings, stale_remote, "remote-host:7", heartbeat_age_s=STALE_S * 2)
    set_running(settings, live_remote, "remote-host:8", heartbeat_age_s=1)
    set_running(settings, running_in_this_process, worker_identity())
    found = dict(requeue_orphans(settings, running_here={running_in_this_process}, include_queued=False))
    assert found == {dead_here: "fd2.cpu", stale_remote: "fd2.gpu"}
    assert job_row(settings, dead_here).status == "queued"
    assert job_row(settings, stale_remote).status == "queued"
    assert job_row(settings, live_remote).status == "running"
    assert job_row(settings, running_in_this_process).status == "running"


def test_recovery_sends_each_job_to_its_queue_through_the_broker(settings):
    dead_here = seed_job(settings, SPEC, queue="fd2.cpu")
    waiting = seed_job(settings, SPEC, queue="fd2.gpu")
    set_running(settings, dead_here, here(dead_pid()))
    app = create_app(settings)
    # embedded broker: queued jobs are re-sent too
    sent = recover_once(app, settings, at_start=True)
    assert sorted(sent) == sorted([dead_here, waiting])
    assert broker_messages(settings, "fd2.cpu") == [dead_here]
    assert broker_messages(settings, "fd2.gpu") == [waiting]
    assert recover_once(app, settings, at_start=False) == []  # nothing left to recover


# ---------------------------------------------------------------- one state machine

ROOT = Path(__file__).resolve().parents[2]
STATUS_SPELLINGS = {str(s) for enum in (JobStatus, ShardStatus, DatasetStatus) for s in enum}
# The same words in another vocabulary: the readiness probe's answer.
OTHER_VOCABULARIES = {("api/routes/health.py", "ready")}


def quoted_statuses(path: Path) -> list[str]:
    """`file:line word` for each string constant spelling a status outside an Enum class body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_enums = {
        id(node)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and any(getattr(b, "id", "").endswith("Enum") for b in cls.bases)
        for node in ast.walk(cls)
    }
    rel = path.relative_to(ROOT).as_posix()
    return [
        f"{rel}:{node.lineno} {node.value}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in STATUS_SPELLINGS and id(node) not in in_enums
        and (rel, node.value) not in OTHER_VOCABULARIES
    ]


def test_statuses_are_spelled_only_in_stores_enums():
    files = [p for pkg in ("store", "worker", "api") for p in sorted((ROOT / pkg).rglob("*.py"))
             if "migrations" not in p.parts]
    assert len(files) > 30
    found = [hit for path in files for hit in quoted_statuses(path)]
    assert found == []


def test_the_check_finds_a_quoted_status():
    sample = ROOT / "store" / "_sample_for_check.py"
    try:
        sample.write_text('from enum import Enum\nclass A(Enum):\n    X = "done"\nSTATUS = "running"\n')
        assert quoted_statuses(sample) == ["store/_sample_for_check.py:4 running"]
    finally:
        sample.unlink()


def test_the_api_schema_lists_stores_statuses(settings):
    from api.main import create_app as create_api

    schemas = create_api(settings, run_migrations=False).openapi()["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [str(s) for s in JobStatus]
    assert schemas["ShardStatus"]["enum"] == [str(s) for s in ShardStatus]
    assert schemas["DatasetStatus"]["enum"] == [str(s) for s in DatasetStatus]


def test_a_final_event_has_a_kind_of_its_own_with_the_statuss_spelling(settings):
    job_id = seed_job(settings, SPEC)
    with session_scope(settings) as session:
        assert end_job(session, job_id, JobStatus.FAILED, error={"code": "x", "message": "boom"}) is not None
        # already final: no second event
        assert end_job(session, job_id, JobStatus.CANCELLED) is None
    with session_scope(settings) as session:
        events = [(e.kind, e.message, e.data) for e in list_events(session, job_id)]
    assert events[-1] == (EventKind.JOB_FAILED, "job failed: boom", {"error": {"code": "x", "message": "boom"}})
    assert sum(kind == "failed" for kind, _, _ in events) == 1
    assert {FINAL_EVENT_KINDS[s] for s in FINISHED_JOB_STATUSES} == {"succeeded", "failed", "cancelled"}
