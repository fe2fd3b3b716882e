"""The worker's Celery configuration and what importing it costs."""

from __future__ import annotations

import json
import subprocess
import sys

from kombu import Queue
from service_harness import REPO_ROOT, embedded_settings

from fd2_config.celery_config import celery_config
from worker.celery_app import create_app, worker_limits


def test_delivery_rules_for_long_jobs(tmp_path):
    settings = embedded_settings(tmp_path / "home")
    conf = create_app(settings).conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    limits = worker_limits(settings)
    assert conf.task_soft_time_limit == limits.soft_time_limit_s
    assert conf.task_time_limit > conf.task_soft_time_limit
    assert {q.name for q in conf.task_queues} == {"fd2.gpu", "fd2.cpu"}
    assert all(isinstance(q, Queue) for q in conf.task_queues)


def test_the_worker_shares_the_api_broker_settings(tmp_path):
    settings = embedded_settings(tmp_path / "home", broker_url="redis://127.0.0.1:6379/14")
    conf = create_app(settings).conf
    shared = celery_config(settings)
    for key in ("broker_url", "broker_transport_options", "task_default_queue", "task_routes"):
        assert conf[key] == shared[key]


def test_heartbeat_is_several_times_faster_than_staleness(tmp_path):
    for stale in (5.0, 60.0, 300.0, 3600.0):
        limits = worker_limits(embedded_settings(tmp_path / "home", stale_heartbeat_s=stale))
        assert limits.heartbeat_interval_s * 3 <= stale
        assert limits.recovery_interval_s < stale


def test_the_run_job_task_is_registered_under_its_public_name():
    from worker.tasks import app

    task = app.tasks["fd2.run_job"]
    assert task.acks_late is True and task.reject_on_worker_lost is True


def test_importing_the_worker_app_does_not_import_torch_or_the_api(tmp_path):
    """The prefork pool forks after import: the parent must not have initialised torch/CUDA."""
    code = "import sys, json, worker.tasks, fd2_cli.main; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "FD2_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(json.loads(result.stdout))
    assert "torch" not in modules
    assert not any(name == "api" or name.startswith("api.") for name in modules)
