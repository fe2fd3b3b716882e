"""docker-compose.yml and the Dockerfiles are wired as the deployment needs (parsed; no Docker engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """container path -> named volume"""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry["source"], entry["target"]
        mounts[target] = source
    return mounts


def test_all_services_are_defined(compose):
    assert {"redis", "postgres", "api", "worker"} <= set(compose["services"])


def test_backing_services_have_health_checks_and_postgres_keeps_its_data(compose):
    services = compose["services"]
    for name in ("redis", "postgres", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "redis-cli" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    data_volume = volume_targets(services["postgres"])["/var/lib/postgresql/data"]
    assert data_volume in compose["volumes"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_point_at_postgres_redis_and_one_shared_home(compose, name):
    service = compose["services"][name]
    env = env_of(service)
    assert env["FD2_DATABASE_URL"].startswith("postgresql") and "@postgres:5432/" in env["FD2_DATABASE_URL"]
    assert env["FD2_BROKER_URL"].startswith("redis://redis:6379")
    home = env["FD2_HOME"]
    assert volume_targets(service)[home] in compose["volumes"]
    for dependency in ("postgres", "redis"):
        assert service["depends_on"][dependency]["condition"] == "service_healthy"


def test_api_and_worker_share_the_same_settings_and_volume(compose):
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert env_of(api) == env_of(worker)
    home = env_of(api)["FD2_HOME"]
    assert volume_targets(api)[home] == volume_targets(worker)[home]


def test_api_is_probed_on_healthz_and_published(compose):
    api = compose["services"]["api"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"


def test_worker_reserves_a_gpu_and_runs_one_job_from_the_gpu_queue(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    command = " ".join(worker["command"])
    assert re.search(r"--queues[ =]fd2\.gpu\b", command) and re.search(r"--concurrency[ =]1\b", command)
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"  # migrations are applied by the API
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_scaling_workers_is_documented(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert "--scale worker=" in text


def test_dockerfiles_use_the_intended_bases_and_entry_points():
    api = (ROOT / "docker" / "api.Dockerfile").read_text()
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", api, re.M)
    assert "api.main:app" in api and "torch" in api  # the torch exclusion is explicit
    assert re.search(r"^FROM pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime", worker, re.M)
    assert '"fd2", "worker"' in worker
    for text in (api, worker):
        assert re.search(r"^USER \w+", text, re.M)  # not root


@pytest.mark.parametrize("image", ["api", "worker"])
def test_both_images_hold_every_installed_package(image):
    """`pip install .` inside an image needs each package pyproject.toml lists copied in and not filtered out
    (the API image too: `docker compose exec api fd2 keys create` runs the fd2 command)."""
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    packages = [name.strip().strip('"').rstrip("*") for name in include.split(",")]
    dockerfile = (ROOT / "docker" / f"{image}.Dockerfile").read_text()
    ignore = (ROOT / "docker" / f"{image}.Dockerfile.dockerignore").read_text().splitlines()
    assert "fd2_cli" in packages
    for name in packages:
        assert re.search(rf"^COPY {name} \./{name}$", dockerfile, re.M), f"{image}.Dockerfile does not copy {name}"
        assert f"!{name}/**" in ignore, f"{image}.Dockerfile.dockerignore filters out {name}"
