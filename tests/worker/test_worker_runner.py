"""A job id through the real pipeline on a tiny spec:
outcomes, artifacts, cancel, shutdown, limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_spec
from service_harness import embedded_settings, seed_job, wait_until, write_fgsynth_folder

from fd2_core.pipeline import ARTIFACT_NAMES
from store.artifacts import file_digest, list_artifacts
from store.db import dispose_engines, migrate, session_scope
from store.job_states import request_cancel, worker_identity
from store.jobs import get_job, job_workdir, list_events
from store.models import Job
from worker.celery_app import WorkerState, worker_limits
from worker.job_runner import JobReleased, JobRunner
from worker.outcomes import MAX_ATTEMPTS

EXPECTED_ARTIFACTS = set(ARTIFACT_NAMES)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator:
    settings = embedded_settings(tmp_path / "home")
    migrate(settings)
    yield settings
    dispose_engines()


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fgsynth_folder(tmp_path_factory.mktemp("data") / "fgsynth", classes=4, train=12, test=4)


def runner(settings, state: WorkerState | None = None, **limit_overrides) -> JobRunner:
    state = state or WorkerState(settings, replace(worker_limits(settings), **limit_overrides))
    return JobRunner(state, worker_identity())


def job_row(settings, job_id: str) -> Job:
    with session_scope(settings) as session:
        return get_job(session, job_id)


def events(settings, job_id: str) -> list:
    with session_scope(settings) as session:
        return list_events(session, job_id, limit=10_000)


def test_a_job_succeeds_with_every_artifact_registered(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(), dataset_folder=dataset_folder)
    assert runner(settings).run(job_id) == "succeeded"

    job = job_row(settings, job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.error is None
    assert job.finished_at is not None and job.started_at is not None
    assert {"teacher_accuracy", "student_accuracy", "random_baseline_accuracy"} <= set(job.metrics)
    with session_scope(settings) as session:
        artifacts = list_artifacts(session, job_id)
    assert {a.name for a in artifacts} == EXPECTED_ARTIFACTS
    for artifact in artifacts:
        assert file_digest(Path(artifact.path)) == (artifact.size, artifact.sha256)
        assert artifact.media_type
    kinds = [(e.kind, e.stage) for e in events(settings, job_id)]
    for stage in ("pretrain", "distill", "relabel", "evaluate", "package"):
        assert ("stage_start", stage) in kinds and ("stage_end", stage) in kinds
    assert kinds[0][0] == "started" and kinds[-1][0] == "succeeded"
    workdir = job_workdir(settings, job_id)
    assert not (workdir / "stages").exists()  # checkpoints are dropped, the registered files stay


def test_bad_data_fails_with_its_code_and_a_one_line_message(settings, tmp_path):
    folder = write_fgsynth_folder(tmp_path / "one", classes=2, train=4, test=2)
    for split in ("train", "test"):  # leave a single class
        extra = sorted((folder / split).iterdir())[1]
        for image in extra.iterdir():
            image.unlink()
        extra.rmdir()
    job_id = seed_job(settings, tiny_spec(), dataset_folder=folder)
    assert runner(settings).run(job_id) == "failed"
    error = job_row(settings, job_id).error
    assert error["code"] == "one_class"
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unexpected_error_fails_cleanly_without_traceback_or_paths(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(device="cuda"), dataset_folder=dataset_folder)
    assert runner(settings).run(job_id) == "failed"
    error = job_row(settings, job_id).error
    assert error["code"] == "internal_error"
    assert "RuntimeError" in error["message"]
    assert "Traceback" not in error["message"] and str(settings.home) not in error["message"]


def test_cancel_mid_stage_is_honoured_quickly(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(distill_iterations=20_000), dataset_folder=dataset_folder)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner(settings).run(job_id)))
    thread.start()
    wait_until(lambda: job_row(settings, job_id).stage == "distill", 120, what="the distill stage")
    with session_scope(settings) as session:
        assert request_cancel(session, job_id)
    thread.join(timeout=10)  # the spec's bound: cancelled within seconds, mid-stage
    assert not thread.is_alive()
    assert outcome == ["cancelled"]
    job = job_row(settings, job_id)
    assert job.status == "cancelled" and job.stage == "distill"
    assert not job_workdir(settings, job_id).exists()


def test_worker_shutdown_requeues_the_job_and_the_next_run_resumes(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(ipc=2, distill_iterations=60), dataset_folder=dataset_folder)
    raised: list[BaseException] = []
    state = WorkerState.create(settings)

    def run() -> None:
        try:
            runner(settings, state).run(job_id)
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion below)
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(
            lambda: any("ipc index 1/2 distilled" in e.message for e in events(settings, job_id)),
            180,
            what="the first ipc index",
        )
        state.shutdown.set()
        thread.join(timeout=10)
    finally:
        state.shutdown.clear()
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], JobReleased)
    job = job_row(settings, job_id)
    assert (job.status, job.worker) == ("queued", None)

    assert runner(settings).run(job_id) == "succeeded"
    messages = [e.message for e in events(settings, job_id)]
    assert any("resuming" in m for m in messages)
    assert any("ipc index 0 already distilled" in m for m in messages)
    assert job_row(settings, job_id).attempts == 2


def test_the_soft_time_limit_fails_the_job_with_time_limit(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(), dataset_folder=dataset_folder)
    assert runner(settings, soft_time_limit_s=0.01).run(job_id) == "failed"
    assert job_row(settings, job_id).error["code"] == "time_limit"


def test_a_job_that_keeps_dying_is_failed_instead_of_retried_forever(settings, dataset_folder):
    from sqlalchemy import update

    job_id = seed_job(settings, tiny_spec(), dataset_folder=dataset_folder)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempts=MAX_ATTEMPTS))
    assert runner(settings).run(job_id) == "failed"
    assert job_row(settings, job_id).error["code"] == "too_many_attempts"


def test_a_finished_job_is_skipped_without_side_effects(settings, dataset_folder):
    job_id = seed_job(settings, tiny_spec(), dataset_folder=dataset_folder)
    with session_scope(settings) as session:
        request_cancel(session, job_id)
    before = len(events(settings, job_id))
    assert runner(settings).run(job_id) == "skipped"
    assert len(events(settings, job_id)) == before
    assert job_row(settings, job_id).status == "cancelled"


def test_a_stored_spec_the_schema_rejects_fails_as_invalid_spec(settings, dataset_folder):
    from sqlalchemy import update

    job_id = seed_job(settings, tiny_spec(), dataset_folder=dataset_folder)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(spec={"preset": "cpu-small", "ipc": 0}))
    assert runner(settings).run(job_id) == "failed"
    error = job_row(settings, job_id).error
    assert error["code"] == "invalid_spec" and "ipc" in error["message"]
