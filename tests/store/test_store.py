"""The persistence package on real SQLite and PostgreSQL: migrations, keys, the job life cycle as
the worker drives it, artifacts, pagination cursors, settings and the embedded broker."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from api_helpers import (
    BACKENDS,
    database_url,
    make_settings,
    settings,  # noqa: F401  (fixture, parametrized over both backends)
)
from celery import Celery
from kombu import Connection
from sqlalchemy import inspect, update

from fd2_config.celery_config import celery_config
from fd2_config.queues import CPU_QUEUE, GPU_QUEUE, RUN_JOB_TASK, queue_for_device
from fd2_config.settings import Settings, get_settings
from store.artifacts import register_artifact
from store.data_uris import allow_uri, list_grants, revoke_uri, tenant_grants
from store.db import alembic_config, current_revision, get_engine, migrate, session_scope
from store.job_states import finish_job, mark_running, request_cancel, requeue_stale_jobs
from store.jobs import (
    add_event,
    create_job,
    get_job,
    heartbeat,
    is_cancel_requested,
    job_workdir,
    list_events,
    list_jobs,
    update_progress,
)
from store.keys import authenticate, create_tenant_key, get_or_create_tenant, list_keys, revoke_key
from store.models import Base, Job, utcnow
from store.pagination import InvalidCursor, decode_cursor, encode_cursor


@pytest.fixture(scope="module")
def db(settings: Settings) -> Settings:  # noqa: F811
    migrate(settings)
    return settings


def new_job(session, tenant_name: str = "acme", **kwargs) -> Job:
    tenant = get_or_create_tenant(session, tenant_name)
    return create_job(session, tenant_id=tenant.id, spec={"ipc": 1}, queue=GPU_QUEUE, **kwargs)


def test_migrations_reach_head_and_match_the_models(db: Settings) -> None:
    head = ScriptDirectory.from_config(alembic_config(db.database_url)).get_current_head()
    assert current_revision(db) == head
    migrate(db)  # a second run is a no-op
    assert current_revision(db) == head
    engine = get_engine(db.database_url)
    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "api_keys", "datasets", "jobs", "job_events", "artifacts"} <= tables
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        assert compare_metadata(context, Base.metadata) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_starting_together_migrate_once(backend: str, tmp_path: Path) -> None:
    with database_url(backend, tmp_path) as url:
        fresh = make_settings(tmp_path, url)
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = [pool.submit(migrate, fresh) for _ in range(3)]
            for result in results:
                result.result()
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        assert current_revision(fresh) == head


def test_keys_authenticate_until_revoked(db: Settings) -> None:
    with session_scope(db) as session:
        key = create_tenant_key(session, "keys-tenant")
        second = create_tenant_key(session, "keys-tenant")
    with session_scope(db) as session:
        tenant = authenticate(session, key)
        assert tenant is not None and tenant.name == "keys-tenant"
        assert authenticate(session, second).id == tenant.id
        assert authenticate(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert authenticate(session, "not-a-key") is None
        stored = [k for k in list_keys(session, "keys-tenant")]
        assert len(stored) == 2 and all(key not in repr(k) for k in stored)
    with session_scope(db) as session:
        prefix = key.split("_")[0] + "_" + key.split("_")[1]
        forged = prefix + "_" + "x" * 43
        assert revoke_key(session, forged) is False  # right prefix, wrong secret
        assert revoke_key(session, key) is True
        assert revoke_key(session, key) is False  # already revoked
    with session_scope(db) as session:
        assert authenticate(session, key) is None
        assert authenticate(session, second) is not None
        second_prefix = "_".join(second.split("_")[:2])
        assert revoke_key(session, second_prefix) is True
    with session_scope(db) as session:
        assert authenticate(session, second) is None


def test_data_uri_grants_are_per_tenant(db: Settings) -> None:
    with session_scope(db) as session:
        tenant = get_or_create_tenant(session, "grants-tenant")
        other = get_or_create_tenant(session, "grants-other")
        assert allow_uri(session, "grants-tenant", "s3://datasets/acme/") == "s3://datasets/acme/"
        allow_uri(session, "grants-tenant", "s3://datasets/acme/")  # twice: one grant
        allow_uri(session, "grants-other", "s3://shared/")
    with session_scope(db) as session:
        assert tenant_grants(session, tenant.id) == ["s3://datasets/acme/"]
        assert [g.uri for g in list_grants(session, "grants-tenant")] == ["s3://datasets/acme/"]
        assert tenant_grants(session, other.id) == ["s3://shared/"]
        assert revoke_uri(session, "grants-tenant", "s3://datasets/acme/") is True
        assert revoke_uri(session, "grants-tenant", "s3://datasets/acme/") is False
    with session_scope(db) as session:
        assert tenant_grants(session, tenant.id) == []


def test_worker_life_cycle_of_a_job(db: Settings) -> None:
    with session_scope(db) as session:
        job_id = new_job(session).id
    with session_scope(db) as session:
        job = mark_running(session, job_id, "worker-1")
        assert job is not None and job.status == "running" and job.attempts == 1 and job.started_at
        update_progress(session, job_id, stage="distill", progress=0.4, stage_progress=0.5, eta_seconds=12.0)
        add_event(session, job_id, "progress", "halfway", stage="distill", progress=0.4, data={"loss": 1.5})
        heartbeat(session, job_id)
    with session_scope(db) as session:
        job = get_job(session, job_id)
        assert (job.stage, job.progress, job.stage_progress, job.eta_seconds) == ("distill", 0.4, 0.5, 12.0)
        assert not is_cancel_requested(session, job_id)
        events = list_events(session, job_id)
        assert [e.message for e in events] == ["halfway"] and events[0].data == {"loss": 1.5}
        done = finish_job(session, job_id, "succeeded", metrics={"student_accuracy": 0.5})
        assert done is not None and done.status == "succeeded" and done.progress == 1.0 and done.finished_at
    with session_scope(db) as session:
        assert finish_job(session, job_id, "failed", error={"code": "x", "message": "late"}) is None
        assert mark_running(session, job_id, "worker-2") is None
        assert get_job(session, job_id).metrics == {"student_accuracy": 0.5}


def test_non_finite_numbers_are_stored_as_null(db: Settings) -> None:
    with session_scope(db) as session:
        job_id = new_job(session).id
        mark_running(session, job_id, "w")
        update_progress(session, job_id, stage="distill", progress=float("nan"), stage_progress=0.5,
                        eta_seconds=float("inf"))
        add_event(session, job_id, "progress", "diverged", data={"losses": {"fc": float("nan"), "ce": 2.0}})
        finish_job(session, job_id, "failed", metrics={"student_accuracy": float("inf"), "n": 3},
                   error={"code": "diverged", "message": "loss is NaN"})
    with session_scope(db) as session:
        job = get_job(session, job_id)
        assert job.progress == 0.0 and job.eta_seconds is None
        assert job.metrics == {"student_accuracy": None, "n": 3}
        assert job.error == {"code": "diverged", "message": "loss is NaN"}
        assert list_events(session, job_id)[0].data == {"losses": {"fc": None, "ce": 2.0}}


def test_cancel_of_queued_and_running_jobs(db: Settings) -> None:
    with session_scope(db) as session:
        queued = new_job(session).id
        running = new_job(session).id
        mark_running(session, running, "w")
    with session_scope(db) as session:
        assert request_cancel(session, queued) and request_cancel(session, running)
    with session_scope(db) as session:
        assert get_job(session, queued).status == "cancelled"
        assert mark_running(session, queued, "w") is None
        assert get_job(session, running).status == "running"
        assert is_cancel_requested(session, running)
        assert finish_job(session, running, "cancelled") is not None
        assert request_cancel(session, running) is False
        assert is_cancel_requested(session, "job_does_not_exist")


def test_stale_running_jobs_are_requeued(db: Settings) -> None:
    with session_scope(db) as session:
        stale, fresh, stale_cancelled = (new_job(session).id for _ in range(3))
        for job_id in (stale, fresh, stale_cancelled):
            mark_running(session, job_id, "w")
        request_cancel(session, stale_cancelled)
        old = utcnow() - timedelta(hours=1)
        session.execute(update(Job).where(Job.id.in_([stale, stale_cancelled])).values(heartbeat_at=old))
    with session_scope(db) as session:
        assert requeue_stale_jobs(session, older_than_s=600) == [stale]
    with session_scope(db) as session:
        assert get_job(session, stale).status == "queued"
        assert get_job(session, fresh).status == "running"
        assert get_job(session, stale_cancelled).status == "cancelled"
        assert [e.kind for e in list_events(session, stale)] == ["requeued"]
        # A requeued job can be claimed again and counts a second attempt.
        assert mark_running(session, stale, "w2").attempts == 2


def test_running_job_takeover_respects_a_live_heartbeat(db: Settings) -> None:
    with session_scope(db) as session:
        job_id = new_job(session).id
        mark_running(session, job_id, "w1")
    with session_scope(db) as session:
        assert mark_running(session, job_id, "w2", takeover_after_s=300) is None
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    with session_scope(db) as session:
        job = mark_running(session, job_id, "w2", takeover_after_s=300)
        assert job is not None and job.worker == "w2" and job.attempts == 2


def test_register_artifact_hashes_the_file(db: Settings, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "report.json"
    path.write_bytes(payload)
    with session_scope(db) as session:
        job_id = new_job(session).id
        artifact = register_artifact(session, job_id, "report.json", path)
        assert artifact.size == len(payload)
        assert artifact.sha256 == hashlib.sha256(payload).hexdigest()
        assert artifact.media_type == "application/json"
    path.write_bytes(b"{}")
    with session_scope(db) as session:
        again = register_artifact(session, job_id, "report.json", path)
        assert again.size == 2 and again.sha256 == hashlib.sha256(b"{}").hexdigest()
        with pytest.raises(ValueError):
            register_artifact(session, job_id, "../escape", path)


def test_job_pages_are_newest_first_without_gaps(db: Settings) -> None:
    with session_scope(db) as session:
        tenant = get_or_create_tenant(session, "pager")
        created = [create_job(session, tenant_id=tenant.id, spec={}, queue=GPU_QUEUE).id for _ in range(7)]
    seen: list[Job] = []
    cursor = None
    with session_scope(db) as session:
        while True:
            page = list_jobs(session, tenant.id, limit=3, cursor=cursor)
            seen.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
    assert sorted(j.id for j in seen) == sorted(created)
    keys = [(j.created_at, j.id) for j in seen]
    assert keys == sorted(keys, reverse=True)


def test_cursor_round_trip_and_tampering() -> None:
    stamp = utcnow()
    assert decode_cursor(encode_cursor(stamp, "job_1")) == (stamp, "job_1")
    for bad in ("", "!!!", "eyJ4IjoxfQ", encode_cursor(stamp, "job_1")[:-3]):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FD2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FD2_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("FD2_CALLBACK_ALLOW_HOSTS", "Hooks.Example.com, other.example")
    monkeypatch.setenv("FD2_ALLOWED_DATA_ROOTS", json.dumps([str(tmp_path / "data")]))
    get_settings.cache_clear()
    try:
        loaded = get_settings()
        assert loaded.home == (tmp_path / "home").resolve()
        assert loaded.database_url == f"sqlite:///{(tmp_path / 'home').resolve() / 'fd2.db'}"
        assert loaded.max_upload_bytes == 1234
        assert loaded.callback_allow_hosts == ["hooks.example.com", "other.example"]
        assert loaded.allowed_data_roots == [(tmp_path / "data").resolve()]
        assert loaded.jobs_dir == loaded.home / "jobs"
        assert job_workdir(loaded, "job_abc") == loaded.home / "jobs" / "job_abc"
        with pytest.raises(ValueError):
            job_workdir(loaded, "../etc")
    finally:
        get_settings.cache_clear()


def test_celery_config_is_json_only_late_ack_and_routes_by_device(tmp_path: Path) -> None:
    config = celery_config(Settings(home=tmp_path))
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["result_backend"] is None
    assert {q.name for q in config["task_queues"]} == {GPU_QUEUE, CPU_QUEUE}
    settings_cpu_default = Settings(home=tmp_path, default_queue=CPU_QUEUE)
    assert queue_for_device(settings_cpu_default, "auto") == CPU_QUEUE
    assert queue_for_device(settings_cpu_default, "cuda") == GPU_QUEUE
    assert queue_for_device(Settings(home=tmp_path), "cpu") == CPU_QUEUE


def test_embedded_broker_delivers_each_message_once(tmp_path: Path) -> None:
    embedded = Settings(home=tmp_path)
    embedded.ensure_dirs()  # what the API and the worker do when they start
    config = celery_config(embedded)
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(config)
    for index in range(5):
        sender.send_task(RUN_JOB_TASK, args=[f"job_{index}"], queue=CPU_QUEUE, task_id=f"job_{index}")
    options = config["broker_transport_options"]
    received: list[str] = []
    consumers = [
        Connection(config["broker_url"], transport=config["broker_transport"], transport_options=options)
        for _ in range(2)
    ]
    try:
        queues = [c.SimpleQueue(CPU_QUEUE) for c in consumers]
        for turn in range(5):
            message = queues[turn % 2].get(timeout=2)
            assert message.headers["task"] == RUN_JOB_TASK
            received.append(message.headers["id"])
            message.ack()
        for queue in queues:
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.2)
    finally:
        for connection in consumers:
            connection.release()
    assert received == [f"job_{index}" for index in range(5)]
    assert not list((tmp_path / "broker" / "claimed").iterdir())
