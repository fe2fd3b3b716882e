"""The worker's one outcome table, its job recorder and `transact`,
against a real (SQLite) database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from service_harness import embedded_settings, seed_job

from fd2_core.data.errors import DataError
from fd2_core.pipeline import StopRequested
from fd2_core.shards import ShardNotReady
from fd2_core.spec import JobSpec
from store.db import dispose_engines, migrate, session_scope
from store.job_states import job_max_workers, mark_running
from store.jobs import get_job, job_workdir, list_events
from store.models import EventKind, JobStatus
from worker.liveness import StopReason
from worker.outages import transact
from worker.outcomes import SKIPPED, Ending, JobRecorder, outcome_of
from worker.source_check import SourceRejected

SPEC = {"preset": "cpu-small", "device": "cpu"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A dataset folder as the rows name it (the recorder reads rows only, never the files)."""
    root = tmp_path / "data" / "ds1" / "files"
    (root / "train" / "a").mkdir(parents=True)
    return root


@pytest.fixture
def settings(tmp_path: Path) -> Iterator:
    settings = embedded_settings(tmp_path / "home")
    migrate(settings)
    yield settings
    dispose_engines()


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which the table recognises by name
    (the worker's parent never imports torch)."""


def invalid_spec() -> ValidationError:
    try:
        JobSpec.model_validate({"ipc": "many"})
    except ValidationError as exc:
        return exc
    raise AssertionError("the spec was accepted")


def table(exc: BaseException, stop_reason: StopReason | None = None, settings=None):
    outcome = outcome_of(exc, stop_reason=stop_reason, settings=settings or embedded_settings(Path("/nowhere")),
                         soft_time_limit_s=60.0, where="job j")
    return outcome.ending, (outcome.error or {}).get("code")


def test_every_row_of_the_outcome_table():
    assert table(SourceRejected("not_found", "gone")) == (Ending.FAILED, "not_found")
    assert table(StopRequested()) == (Ending.CANCELLED, None)
    assert table(StopRequested(), StopReason.CANCELLED) == (Ending.CANCELLED, None)
    assert table(StopRequested(), StopReason.SHUTDOWN) == (Ending.RELEASED, None)
    assert table(StopRequested(), StopReason.TIME_LIMIT) == (Ending.TIME_LIMIT, "time_limit")
    assert table(SoftTimeLimitExceeded()) == (Ending.TIME_LIMIT, "time_limit")
    assert table(ShardNotReady("distill:c0", ["pretrain:m0"])) == (Ending.FAILED, "shard_inputs_missing")
    assert table(DataError("no_images", "the folder holds no images")) == (Ending.FAILED, "no_images")
    assert table(invalid_spec()) == (Ending.FAILED, "invalid_spec")
    assert table(OutOfMemoryError("CUDA out of memory")) == (Ending.FAILED, "out_of_memory")
    assert table(KeyError("x")) == (Ending.FAILED, "internal_error")


def test_an_unexpected_error_names_no_path_of_the_home(tmp_path):
    settings = embedded_settings(tmp_path / "home")
    outcome = outcome_of(RuntimeError(f"cannot open {settings.home}/jobs/j/x.pt\nmore"), stop_reason=None,
                         settings=settings, soft_time_limit_s=1.0, where="job j")
    assert outcome.error == {"code": "internal_error",
                             "message": "the job failed on the worker (RuntimeError: cannot open <home>/jobs/j/x.pt)"}


def test_transact_runs_a_store_function_in_one_transaction(settings):
    job_id = seed_job(settings, {**SPEC, "max_workers": 3})
    assert transact(settings, job_max_workers, job_id) == 3
    assert transact(settings, job_max_workers, "no-such-job", retry=False) == 1
    claimed = transact(settings, mark_running, job_id, "host:1")
    assert claimed is not None and claimed.status == JobStatus.RUNNING
    with session_scope(settings) as session:
        assert get_job(session, job_id).worker == "host:1"  # committed


def test_the_recorder_refuses_a_job_whose_dataset_is_gone(settings):
    job_id = seed_job(settings, SPEC)  # no dataset row
    assert JobRecorder(settings, "host:1").claim(job_id, stale_after_s=30.0) == JobStatus.FAILED
    with session_scope(settings) as session:
        assert get_job(session, job_id).error["code"] == "not_found"


def test_the_recorder_ends_a_job_once_and_applies_the_disk_rule(settings, folder):
    job_id = seed_job(settings, SPEC, dataset_folder=folder)
    keeper = JobRecorder(settings, "host:1", discard_stopped=False)
    claimed = keeper.claim(job_id, stale_after_s=30.0)
    assert not isinstance(claimed, str) and claimed.id == job_id and claimed.attempts == 1
    workdir = job_workdir(settings, job_id)
    (workdir / "stages").mkdir(parents=True)
    assert keeper.end(job_id, outcome_of(StopRequested(), stop_reason=None, settings=settings,
                                         soft_time_limit_s=1.0, where="j")) == JobStatus.CANCELLED
    assert workdir.exists()  # a sharded job's folder is the last shard's to remove
    # a second end finds the job final and reports its status as it is
    assert JobRecorder(settings, "host:2").fail(job_id, "x", "late") == JobStatus.CANCELLED
    with session_scope(settings) as session:
        kinds = [event.kind for event in list_events(session, job_id)]
    assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.JOB_CANCELLED) == 1
    assert JobRecorder(settings, "host:2").claim(job_id, stale_after_s=30.0) == SKIPPED

    other = seed_job(settings, SPEC, dataset_folder=folder)
    discarding = JobRecorder(settings, "host:1")
    assert not isinstance(discarding.claim(other, stale_after_s=30.0), str)
    (job_workdir(settings, other) / "stages").mkdir(parents=True)
    assert discarding.fail(other, "boom", "it broke") == JobStatus.FAILED
    assert not job_workdir(settings, other).exists()
