"""The bottom floor `fd2_config`: it imports no other project package, creates nothing on import, and holds the
one Celery configuration and the one send path that the API and the worker share."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from celery import signals
from kombu import Connection
from service_harness import REPO_ROOT, embedded_settings

from fd2_config.celery_config import celery_config, send_run_job
from fd2_config.queues import CPU_QUEUE, RUN_JOB_TASK
from worker.celery_app import create_app


class WorkController:
    """Stands for Celery's worker as the sender of `worker_init` (handlers read only its `app`)."""

    def __init__(self, app) -> None:
        self.app = app


PROJECT_PACKAGES = ("api", "store", "worker", "fd2_core")
CONFIG_MODULES = ("settings", "queues", "celery_config", "callback_hosts", "fs_broker")


def imported_names(path: Path) -> set[str]:
    """Top-level package of every import in a source file, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_no_config_module_imports_another_project_package():
    sources = sorted((REPO_ROOT / "fd2_config").glob("*.py"))
    assert {path.stem for path in sources} >= set(CONFIG_MODULES)
    for path in sources:
        assert not imported_names(path) & set(PROJECT_PACKAGES), path.name


def test_importing_the_config_and_building_the_celery_config_creates_nothing(tmp_path):
    home = tmp_path / "home"
    modules = ", ".join(f"fd2_config.{name}" for name in CONFIG_MODULES)
    code = (
        f"import sys, json, fd2_config, {modules}\n"
        "from fd2_config.celery_config import celery_config\n"
        "from fd2_config.settings import get_settings\n"
        "celery_config(get_settings())\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin", "FD2_HOME": str(home)},
        capture_output=True, text=True, check=True,
    )
    loaded = {name.partition(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & set(PROJECT_PACKAGES)
    assert not home.exists()


def test_importing_the_worker_app_creates_no_folder(tmp_path):
    home = tmp_path / "home"
    subprocess.run(
        [sys.executable, "-c", "import worker.tasks"], cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "FD2_HOME": str(home)}, check=True,
    )
    assert not home.exists()


def test_the_run_task_is_sent_and_the_delivery_rules_set_in_one_place_only():
    """`send_task` and the acknowledgement/serialisation rules appear nowhere but in `fd2_config`."""
    needles = ("send_task(", "acks_late", "worker_prefetch_multiplier", "task_serializer", "retry_policy")
    for package in ("api", "store", "worker"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            text = path.read_text()
            found = [needle for needle in needles if needle in text]
            assert not found, f"{path.relative_to(REPO_ROOT)} sets {found} itself"


def test_send_run_job_names_the_task_the_job_and_its_queue(tmp_path):
    settings = embedded_settings(tmp_path / "home")
    settings.ensure_dirs()
    app = create_app(settings)
    send_run_job(app, "job_123", CPU_QUEUE)
    config = celery_config(settings)
    with Connection(config["broker_url"], transport=config["broker_transport"],
                    transport_options=config["broker_transport_options"]) as connection:
        queue = connection.SimpleQueue(CPU_QUEUE)
        message = queue.get(timeout=2)
        args, _kwargs, _embed = message.decode()
        message.ack()
        queue.close()
    assert (message.headers["task"], message.headers["id"], args) == (RUN_JOB_TASK, "job_123", ["job_123"])


def test_the_worker_state_is_built_at_worker_start_and_hears_the_shutdown(tmp_path):
    """Nothing exists before `worker_init`; then the state and the folders do, and shutdown sets its flag."""
    settings = embedded_settings(tmp_path / "home")
    app = create_app(settings)
    assert app.fd2_state is None and not settings.home.exists()
    signals.worker_init.send(sender=WorkController(app))
    state = app.fd2_state
    assert state is not None and state.settings is settings and not state.shutdown.is_set()
    assert (settings.broker_dir / "queue").is_dir() and settings.jobs_dir.is_dir()
    signals.worker_shutting_down.send(sender="test-node", sig="SIGTERM", how="Warm", exitcode=0)
    assert state.shutdown.is_set()
    other = create_app(embedded_settings(tmp_path / "other"))
    assert other.worker_state() is not state  # one state per app, none shared through a module global
