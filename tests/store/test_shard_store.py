"""The shard rows of a job spread over several workers (store.shards) on real SQLite and PostgreSQL:
the plan, the dispatch within `max_workers` and the per-tenant cap, claims that run a shard once,
recovery of a dead worker's shard, cancel, the job's progress from its shards, and fair share
between two tenants' jobs on a FIFO queue."""

from __future__ import annotations

import socket
import subprocess
from collections import deque
from datetime import timedelta

import pytest
from api_helpers import settings  # noqa: F401  (fixture, parametrized over both backends)
from sqlalchemy import update

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.db import migrate, session_scope
from store.job_states import claim_job, mark_running, request_cancel, requeue_stale_jobs, worker_identity
from store.jobs import create_job, get_job, list_events
from store.keys import get_or_create_tenant
from store.models import JobShard, utcnow
from store.shards import (
    PlannedShard,
    beat_shard,
    claim_shard,
    dispatched_shards,
    finish_shard,
    job_shards,
    job_stop_requested,
    reconcile_sharded_jobs,
    record_plan,
    record_shard_progress,
    requeue_orphan_shards,
    select_dispatch,
    shard_held,
    shard_key,
    undo_dispatch,
)

ME = worker_identity()
STALE_S = 60.0
# pretrain → two distill blocks → merge → package: the shape of a real plan
# (fd2_core.shards.plan_shards).
PLAN = [
    PlannedShard("pretrain:m0", "pretrain", (), 0.2),
    PlannedShard("distill:c00000", "distill", ("pretrain:m0",), 0.3),
    PlannedShard("distill:c00002", "distill", ("pretrain:m0",), 0.3),
    PlannedShard("distill:merge", "distill", ("distill:c00000", "distill:c00002"), 0.0),
    PlannedShard("package", "package", ("distill:merge",), 0.2),
]


@pytest.fixture(scope="module")
def db(settings: Settings) -> Settings:  # noqa: F811
    migrate(settings)
    return settings


def started_job(db: Settings, tenant: str, plan: list[PlannedShard] = PLAN, max_workers: int = 2) -> tuple[str, str]:
    """A running, planned job of `tenant`: (job id, tenant id)."""
    with session_scope(db) as session:
        tenant_row = get_or_create_tenant(session, tenant)
        job = create_job(session, tenant_id=tenant_row.id, spec={"max_workers": max_workers}, queue=GPU_QUEUE)
        assert mark_running(session, job.id, ME) is not None
        record_plan(session, job.id, plan)
        return job.id, tenant_row.id


def dispatch(db: Settings, tenant_id: str, cap: int = 0) -> list[str]:
    with session_scope(db) as session:
        return [shard for _, shard, _ in select_dispatch(session, tenant_id, cap)]


def claim(db: Settings, job_id: str, shard_id: str, me: str = ME):
    with session_scope(db) as session:
        return claim_shard(session, job_id, shard_id, me, STALE_S)


def finish(db: Settings, job_id: str, shard_id: str, status: str = "done", me: str = ME) -> bool:
    with session_scope(db) as session:
        return finish_shard(session, job_id, shard_id, me, status)


def statuses(db: Settings, job_id: str) -> dict[str, str]:
    with session_scope(db) as session:
        return {row.shard_id: row.status for row in job_shards(session, job_id)}


def summary(db: Settings, job_id: str) -> dict:
    with session_scope(db) as session:
        return dict(get_job(session, job_id).shards)


def unique(prefix: str) -> str:
    return f"{prefix}-{utcnow().timestamp()}"


def orphans(session, job_id: str, **options) -> list[str]:
    """The shards of `job_id` a recovery pass requeues now
    (other tests' jobs share the database)."""
    return [shard for job, shard in requeue_orphan_shards(session, STALE_S, **options) if job == job_id]


def dead_holder() -> str:
    """`host:pid` of a process of this host that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}"


# --------------------------------------------------------- plan, dispatch, claim


def test_a_plan_is_recorded_once_and_the_job_has_no_single_holder(db: Settings) -> None:
    job_id, _ = started_job(db, unique("plan"))
    with session_scope(db) as session:
        assert record_plan(session, job_id, PLAN) == len(PLAN)  # re-planning keeps the rows
        job = get_job(session, job_id)
        assert job.sharded and job.worker is None and job.status == "running"
    assert summary(db, job_id)["total"] == len(PLAN) and summary(db, job_id)["queued"] == len(PLAN)
    assert [item["id"] for item in summary(db, job_id)["items"]] == [s.id for s in PLAN]


def test_dispatch_follows_dependencies_and_max_workers(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("deps"), max_workers=2)
    assert dispatch(db, tenant_id) == ["pretrain:m0"]  # the only ready shard
    assert dispatch(db, tenant_id) == []  # already dispatched: not sent twice
    assert claim(db, job_id, "pretrain:m0") is not None
    assert finish(db, job_id, "pretrain:m0")
    assert dispatch(db, tenant_id) == ["distill:c00000", "distill:c00002"]
    assert claim(db, job_id, "distill:c00000") is not None
    assert finish(db, job_id, "distill:c00000")
    assert dispatch(db, tenant_id) == []  # the merge waits for the other block
    with session_scope(db) as session:
        assert [s for j, s, _ in dispatched_shards(session) if j == job_id] == ["distill:c00002"]


def test_max_workers_bounds_the_shards_running_or_waiting(db: Settings) -> None:
    wide = [PlannedShard(f"distill:c{i:05d}", "distill", (), 0.25) for i in range(4)]
    job_id, tenant_id = started_job(db, unique("wide"), wide, max_workers=3)
    assert len(dispatch(db, tenant_id)) == 3
    assert claim(db, job_id, "distill:c00000") is not None
    assert dispatch(db, tenant_id) == []  # one running + two dispatched = 3
    assert finish(db, job_id, "distill:c00000")
    assert dispatch(db, tenant_id) == ["distill:c00003"]


def test_a_shard_runs_once_whatever_the_messages(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("once"))
    dispatch(db, tenant_id)
    other = f"{socket.gethostname()}:1"  # a live process of this host
    first = claim(db, job_id, "pretrain:m0", me=other)
    assert first is not None and first.attempts == 1 and first.stage == "pretrain"
    assert claim(db, job_id, "pretrain:m0") is None  # held by a live worker
    assert finish(db, job_id, "pretrain:m0", me=other)
    assert claim(db, job_id, "pretrain:m0") is None  # a redelivered message of a finished shard
    assert claim(db, job_id, "distill:merge") is None  # queued, not dispatched: an old message
    assert claim(db, job_id, "no-such-shard") is None
    assert statuses(db, job_id)["distill:merge"] == "queued"


def test_a_failed_publish_puts_the_shard_back(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("undo"))
    assert dispatch(db, tenant_id) == ["pretrain:m0"]
    with session_scope(db) as session:
        undo_dispatch(session, job_id, "pretrain:m0")
    assert statuses(db, job_id)["pretrain:m0"] == "queued"
    assert dispatch(db, tenant_id) == ["pretrain:m0"]


# --------------------------------------------------------- workers that die, cancel, progress


def test_a_dead_workers_shard_is_requeued_and_taken_over(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("dead"))
    dispatch(db, tenant_id)
    assert claim(db, job_id, "pretrain:m0") is not None
    with session_scope(db) as session:  # this process runs it: not an orphan
        assert orphans(session, job_id, running_here={shard_key(job_id, "pretrain:m0")}) == []
        session.execute(update(JobShard).where(JobShard.job_id == job_id).values(worker=dead_holder()))
    with session_scope(db) as session:  # its holder's process is gone
        assert orphans(session, job_id) == ["pretrain:m0"]
        kinds = [event.kind for event in list_events(session, job_id)]
    assert "shard_requeued" in kinds and statuses(db, job_id)["pretrain:m0"] == "queued"
    assert dispatch(db, tenant_id) == ["pretrain:m0"]
    again = claim(db, job_id, "pretrain:m0", me=f"{socket.gethostname()}:1")
    assert again is not None and again.attempts == 2


def test_a_silent_shard_is_requeued_after_the_stale_time(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("silent"))
    dispatch(db, tenant_id)
    claim(db, job_id, "pretrain:m0", me="elsewhere:42")
    with session_scope(db) as session:
        assert orphans(session, job_id) == []  # its heartbeat is fresh
        session.execute(update(JobShard).where(JobShard.job_id == job_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=2 * STALE_S)))
    with session_scope(db) as session:
        assert orphans(session, job_id, judge_heartbeats=False) == []
        assert orphans(session, job_id) == ["pretrain:m0"]


def test_a_sharded_job_is_not_judged_as_one_job(db: Settings) -> None:
    job_id, _ = started_job(db, unique("whole"))
    with session_scope(db) as session:
        # its shards run it, not a run_job message
        assert claim_job(session, job_id, ME, STALE_S) is None
        assert job_id not in requeue_stale_jobs(session, 0.0)
        assert get_job(session, job_id).status == "running"


def test_cancel_of_a_sharded_job(db: Settings) -> None:
    waiting, tenant_id = started_job(db, unique("cancel"))
    dispatch(db, tenant_id)
    with session_scope(db) as session:  # nothing runs: cancelled at once
        assert request_cancel(session, waiting)
        assert get_job(session, waiting).status == "cancelled"
    assert claim(db, waiting, "pretrain:m0") is None

    running, tenant_id = started_job(db, unique("cancel"))
    dispatch(db, tenant_id)
    claim(db, running, "pretrain:m0", me=dead_holder())
    with session_scope(db) as session:  # a shard runs: it stops at its next poll
        assert request_cancel(session, running)
        assert get_job(session, running).status == "running"
        assert job_stop_requested(session, running)
    with session_scope(db) as session:  # its worker died meanwhile: recovery ends the job
        requeue_orphan_shards(session, STALE_S)
    with session_scope(db) as session:
        assert get_job(session, running).status == "cancelled"
    assert statuses(db, running)["pretrain:m0"] == "cancelled"


def test_the_jobs_progress_comes_from_its_shards(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("progress"))
    dispatch(db, tenant_id)
    claim(db, job_id, "pretrain:m0")
    with session_scope(db) as session:
        record_shard_progress(session, job_id, "pretrain:m0", ME, 0.5)
        beat_shard(session, job_id, "pretrain:m0", ME)
        job = get_job(session, job_id)
        assert job.stage == "pretrain" and job.progress == pytest.approx(0.1) and job.stage_progress == 0.5
    finish(db, job_id, "pretrain:m0")
    dispatch(db, tenant_id)
    claim(db, job_id, "distill:c00000")
    with session_scope(db) as session:
        record_shard_progress(session, job_id, "distill:c00000", ME, 1 / 3)
        job = get_job(session, job_id)
    assert job.stage == "distill" and job.progress == pytest.approx(0.3) and job.stage_progress == pytest.approx(
        1 / 6)
    assert job.eta_seconds is not None and job.eta_seconds >= 0
    items = {item["id"]: item for item in job.shards["items"]}
    assert items["distill:c00000"]["worker"] == ME
    assert items["distill:c00000"]["progress"] == pytest.approx(1 / 3, abs=1e-4)
    assert job.shards["running"] == 1 and job.shards["done"] == 1


# --------------------------------------------------------- fair share


def simulate(db: Settings, tenants: dict[str, str], *, cap: int, wide_workers: int, workers: int = 2) -> list[str]:
    """Run queued work on `workers` simulated workers taking messages from a FIFO queue, as Celery's
    prefetch-1 workers do; returns the order in which `<tenant>/<shard>` started. Tenant `wide` has
    a job of eight independent shards (max_workers `wide_workers`); tenant `small`'s job of two
    shards arrives once `wide` started."""
    wide = [PlannedShard(f"distill:c{i:05d}", "distill", (), 1 / 8) for i in range(8)]
    small = [PlannedShard(f"distill:c{i:05d}", "distill", (), 1 / 2) for i in range(2)]
    queue: deque[tuple[str, str, str]] = deque()

    ids: dict[str, str] = {}

    def publish(tenant: str) -> None:
        with session_scope(db) as session:
            queue.extend((tenant, job, shard) for job, shard, _ in select_dispatch(session, ids[tenant], cap))

    ids["wide"] = started_job(db, tenants["wide"], wide, max_workers=wide_workers)[1]
    publish("wide")
    queue.append(("small", "", "run_job"))  # submitted after the wide job started
    order: list[str] = []
    while queue:
        batch = [queue.popleft() for _ in range(min(workers, len(queue)))]
        for tenant, job_id, shard in batch:
            if shard == "run_job":
                ids["small"] = started_job(db, tenants["small"], small, max_workers=2)[1]
                publish("small")
                continue
            assert claim(db, job_id, shard) is not None
            order.append(f"{tenant}/{shard}")
        for tenant, job_id, shard in batch:
            if shard != "run_job":
                assert finish(db, job_id, shard)
                publish(tenant)
    return order


@pytest.mark.parametrize(("wide_workers", "cap", "small_starts_by"), [(2, 0, 4), (8, 2, 4), (8, 0, 8)])
def test_fair_share_between_two_tenants(db: Settings, wide_workers: int, cap: int, small_starts_by: int) -> None:
    """A job's shards reach the queue only as fast as it may run them (max_workers), each behind
    what is queued already: the small job's first shard starts two rounds after its arrival although
    the wide job has five shards left. A wide job with a high max_workers fills the queue ahead of
    it (third case) unless the tenant cap (`max_shards_per_tenant`) bounds what one tenant may have
    running or waiting (second case)."""
    tenants = {"wide": unique(f"wide{wide_workers}-{cap}"), "small": unique(f"small{wide_workers}-{cap}")}
    order = simulate(db, tenants, cap=cap, wide_workers=wide_workers)
    assert sorted(order) == sorted([f"wide/distill:c{i:05d}" for i in range(8)] +
                                   [f"small/distill:c{i:05d}" for i in range(2)])
    first_small = min(i for i, name in enumerate(order) if name.startswith("small/"))
    assert first_small <= small_starts_by
    if small_starts_by < 8:
        last_small = max(i for i, name in enumerate(order) if name.startswith("small/"))
        assert last_small < 7  # the small job is done long before the wide one
    else:
        assert first_small == 8  # without a cap, max_workers 8 queues the whole wide job first


# --------------------------------------------------------- a worker that stopped between two writes


def reconcile(db: Settings, job_id: str, grace_s: float = 0.0) -> list[str]:
    with session_scope(db) as session:
        return [item.action for item in reconcile_sharded_jobs(session, grace_s) if item.job_id == job_id]


def run_all(db: Settings, job_id: str, tenant_id: str, until: str | None = None) -> None:
    """Dispatch, claim and finish shards in order until `until` (exclusive) or the end."""
    while picked := dispatch(db, tenant_id):
        for shard in picked:
            if shard == until:
                return
            assert claim(db, job_id, shard) is not None
            assert finish(db, job_id, shard)


def test_a_failed_shard_whose_job_was_not_recorded_fails_the_job(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("failed"))
    dispatch(db, tenant_id)
    claim(db, job_id, "pretrain:m0")
    with session_scope(db) as session:  # the worker died after this write, before the job's
        finish_shard(session, job_id, "pretrain:m0", ME, "failed",
                     error={"code": "bad_data", "message": "shard pretrain:m0 failed: no images"})
    assert reconcile(db, job_id) == ["job_failed"]
    with session_scope(db) as session:
        job = get_job(session, job_id)
        assert job.status == "failed" and job.error["message"] == "shard pretrain:m0 failed: no images"
    assert set(statuses(db, job_id).values()) == {"failed", "cancelled"}  # nothing left waiting
    assert reconcile(db, job_id) == []


def test_a_job_whose_package_shard_ended_unrecorded_packages_again(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("package"))
    run_all(db, job_id, tenant_id)
    assert set(statuses(db, job_id).values()) == {"done"}
    # its worker may be recording the job right now
    assert reconcile(db, job_id, grace_s=3600) == []
    assert reconcile(db, job_id) == ["package_again"]
    assert dispatch(db, tenant_id) == ["package"]


def test_a_cancel_with_no_shard_running_ends_the_job_and_closes_its_shards(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("closed"))
    dispatch(db, tenant_id)
    with session_scope(db) as session:
        assert request_cancel(session, job_id)  # nothing runs: cancelled at once
    assert statuses(db, job_id)["pretrain:m0"] == "dispatched"
    assert reconcile(db, job_id) == ["closed"]
    assert set(statuses(db, job_id).values()) == {"cancelled"}
    assert summary(db, job_id)["cancelled"] == len(PLAN)


def test_a_shard_given_to_another_worker_is_no_longer_held(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("held"))
    dispatch(db, tenant_id)
    claim(db, job_id, "pretrain:m0", me="elsewhere:1")
    with session_scope(db) as session:
        assert shard_held(session, job_id, "pretrain:m0", "elsewhere:1")
        session.execute(update(JobShard).where(JobShard.job_id == job_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=2 * STALE_S)))
    # a stale holder is taken over
    assert claim(db, job_id, "pretrain:m0", me="elsewhere:2") is not None
    with session_scope(db) as session:
        assert not shard_held(session, job_id, "pretrain:m0", "elsewhere:1")
    # the old run's end is not recorded
    assert not finish(db, job_id, "pretrain:m0", me="elsewhere:1")


def test_a_dispatched_message_not_taken_is_sent_again_once_per_period(db: Settings) -> None:
    job_id, tenant_id = started_job(db, unique("stale"))
    dispatch(db, tenant_id)
    with session_scope(db) as session:
        assert [s for j, s, _ in dispatched_shards(session, STALE_S) if j == job_id] == []
        session.execute(update(JobShard).where(JobShard.job_id == job_id)
                        .values(dispatched_at=utcnow() - timedelta(seconds=2 * STALE_S)))
    with session_scope(db) as session:
        assert [s for j, s, _ in dispatched_shards(session, STALE_S) if j == job_id] == ["pretrain:m0"]
    with session_scope(db) as session:
        assert [s for j, s, _ in dispatched_shards(session, STALE_S) if j == job_id] == []
