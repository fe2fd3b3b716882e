"""The `fd2-client` command as a script runs it (`python -m fd2_client`, a child process) against the real
embedded service: results on stdout (an id, or one JSON document with `--json`), bars and messages on stderr,
and exit codes a script can branch on (0 done, 1 job failed/cancelled, 2 usage or 4xx, 3 unavailable,
4 timeout, 5 checksum mismatch)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from client_service import FAST_SPEC, JOB_TIMEOUT_S, SLOW_SPEC, dataset_folder, service  # noqa: F401 (fixtures)
from service_harness import REPO_ROOT, free_port, wait_until

from fd2_client import Client
from fd2_client.cli import (
    EXIT_CHECKSUM,
    EXIT_JOB_UNSUCCESSFUL,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
)

CLIENT_ROOT = REPO_ROOT / "clients" / "python"


def fd2_client(*args: str, url: str | None = None, key: str | None = None,
               timeout: float = JOB_TIMEOUT_S + 60) -> subprocess.CompletedProcess[str]:
    """Run the command with FD2_URL / FD2_API_KEY set (when given) and nothing else of the caller's FD2_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD2_")}
    env.update({k: v for k, v in (("FD2_URL", url), ("FD2_API_KEY", key)) if v is not None})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_ROOT), env.get("PYTHONPATH")]))  # this checkout's
    return subprocess.run([sys.executable, "-m", "fd2_client", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def cli(service):  # noqa: F811
    """The command bound to the module's service and key."""
    return lambda *args, **kw: fd2_client(*args, url=service.url, key=service.key, **kw)


@pytest.fixture(scope="module")
def finished(cli, dataset_folder, tmp_path_factory) -> dict[str, Any]:  # noqa: F811
    """Upload, then `submit --wait` a tiny job, as a script would; keeps each step's result."""
    upload = cli("upload", str(dataset_folder), "--name", "birds", "--json")
    assert upload.returncode == EXIT_OK, upload.stderr
    dataset = json.loads(upload.stdout)
    submit = cli("submit", dataset["id"], "--spec", json.dumps(FAST_SPEC), "--wait", "--progress", "--json")
    assert submit.returncode == EXIT_OK, submit.stderr
    return {"dataset": dataset, "job": json.loads(submit.stdout), "submit": submit}


@pytest.mark.service
def test_upload_prints_the_dataset_and_a_plain_run_prints_only_its_id(cli, finished, dataset_folder):  # noqa: F811
    dataset = finished["dataset"]
    assert dataset["status"] == "ready" and dataset["name"] == "birds" and dataset["num_classes"] == 4
    plain = cli("upload", str(dataset_folder), "--quiet")
    assert plain.returncode == EXIT_OK, plain.stderr
    assert plain.stdout.strip().startswith("ds_") and len(plain.stdout.strip().splitlines()) == 1
    assert plain.stderr == ""


@pytest.mark.service
def test_submit_wait_draws_a_bar_per_stage_and_prints_the_succeeded_job(finished):
    job, stderr = finished["job"], finished["submit"].stderr
    open("/tmp/sdk14_bars.txt", "w").write(stderr)
    assert job["status"] == "succeeded" and job["artifacts"]
    for stage in ("pretrain", "distill", "relabel", "package"):
        assert stage in stderr
    assert "%|" in stderr and "eta" in stderr
    assert f"job {job['id']} succeeded" in stderr


@pytest.mark.service
def test_download_writes_every_artifact_verified_and_lists_them(cli, finished, tmp_path):
    job = finished["job"]
    result = cli("download", job["id"], "--out", str(tmp_path), "--json")
    assert result.returncode == EXIT_OK, result.stderr
    files = json.loads(result.stdout)["files"]
    assert {f["name"] for f in files} == {a["name"] for a in job["artifacts"]}
    for artifact in job["artifacts"]:
        path = tmp_path / artifact["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"]
    plain = cli("download", job["id"], "report.json", "--out", str(tmp_path / "one"))
    assert plain.returncode == EXIT_OK and plain.stdout.strip() == str(tmp_path / "one" / "report.json")


@pytest.mark.service
def test_ls_lists_jobs_and_datasets(cli, finished):
    jobs = cli("ls", "jobs", "--json", "--status", "succeeded")
    assert jobs.returncode == EXIT_OK, jobs.stderr
    assert finished["job"]["id"] in [j["id"] for j in json.loads(jobs.stdout)["items"]]
    datasets = cli("ls", "datasets", "--limit", "1")
    assert datasets.returncode == EXIT_OK, datasets.stderr
    assert len(datasets.stdout.strip().splitlines()) == 1 and datasets.stdout.startswith("ds_")


@pytest.mark.service
def test_refusals_exit_2_with_the_error_code_and_json_error_document(cli, finished):
    missing = cli("wait", "job_" + "0" * 32, "--json")
    assert missing.returncode == EXIT_REFUSED
    assert "not_found" in missing.stderr
    assert json.loads(missing.stdout)["error"] | {"message": None} == {
        "code": "not_found", "status": 404, "details": None, "message": None}

    finished_already = cli("cancel", finished["job"]["id"])
    assert finished_already.returncode == EXIT_REFUSED and "job_finished" in finished_already.stderr

    unrunnable = cli("submit", finished["dataset"]["id"], "--spec", json.dumps(FAST_SPEC), "--ipc", "1000")
    assert unrunnable.returncode == EXIT_REFUSED and "ipc" in unrunnable.stderr

    assert cli("submit", finished["dataset"]["id"], "--set", "novalue").returncode == EXIT_REFUSED


@pytest.mark.service
def test_an_explicit_idempotency_key_gives_the_same_job_twice(cli, finished):
    args = ("submit", finished["dataset"]["id"], "--spec", json.dumps(SLOW_SPEC), "--idempotency-key", "cli-key-1")
    first, again = cli(*args), cli(*args)
    assert first.returncode == again.returncode == EXIT_OK, first.stderr + again.stderr
    assert first.stdout.strip() == again.stdout.strip()
    cli("cancel", first.stdout.strip())


@pytest.mark.service
def test_wait_exits_4_on_timeout_and_1_once_the_job_was_cancelled(cli, service, finished):  # noqa: F811
    submitted = cli("submit", finished["dataset"]["id"], "--spec", json.dumps(SLOW_SPEC))
    job_id = submitted.stdout.strip()
    assert submitted.returncode == EXIT_OK and job_id.startswith("job_"), submitted.stderr
    with Client(service.url, service.key) as sdk:
        wait_until(lambda: sdk.get_job(job_id)["status"] == "running", JOB_TIMEOUT_S, what="the job to run")

    timed_out = cli("wait", job_id, "--timeout", "1", "--json")
    assert timed_out.returncode == EXIT_TIMEOUT, timed_out.stderr
    assert json.loads(timed_out.stdout)["status"] in ("queued", "running")

    cancelled = cli("cancel", job_id, "--json")
    assert cancelled.returncode == EXIT_OK, cancelled.stderr
    waited = cli("wait", job_id, "--json")
    assert waited.returncode == EXIT_JOB_UNSUCCESSFUL, waited.stderr
    assert json.loads(waited.stdout)["status"] == "cancelled" and "cancelled" in waited.stderr


@pytest.mark.service
def test_a_download_that_does_not_verify_exits_5_and_leaves_no_file(cli, finished, tmp_path):
    artifact = max(finished["job"]["artifacts"], key=lambda a: a["size"])
    part = tmp_path / f"{artifact['name']}.part"
    part.write_bytes(b"\xff" * (artifact["size"] // 2))
    result = cli("download", finished["job"]["id"], artifact["name"], "--out", str(tmp_path))
    assert result.returncode == EXIT_CHECKSUM and "checksum_mismatch" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.service
def test_delete_of_a_finished_job(cli, finished, tmp_path):
    result = cli("delete", finished["job"]["id"], "--json")
    if "method_not_allowed" in result.stderr:
        pytest.skip("this service has no DELETE /v1/jobs/{id} yet")
    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout) == {"deleted": finished["job"]["id"], "kind": "job"}
    # no artifacts to download any more (404 for the job, or a job without artifacts): refused either way
    assert cli("download", finished["job"]["id"], "--out", str(tmp_path)).returncode == EXIT_REFUSED


def test_usage_errors_exit_2_and_an_unreachable_service_exits_3(tmp_path):
    no_url = fd2_client("ls", "jobs", key="k")
    assert no_url.returncode == EXIT_REFUSED and "FD2_URL" in no_url.stderr
    assert fd2_client("frobnicate", url="http://127.0.0.1:1", key="k").returncode == EXIT_REFUSED
    not_an_archive = tmp_path / "notes.txt"
    not_an_archive.write_text("x")
    bad_path = fd2_client("upload", str(not_an_archive), url="http://127.0.0.1:1", key="k")
    assert bad_path.returncode == EXIT_REFUSED and "archive" in bad_path.stderr

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = fd2_client("ls", "jobs", "--retries", "1", "--json", url=nobody, key="k", timeout=120)
    assert unreachable.returncode == EXIT_UNAVAILABLE, unreachable.stderr
    assert json.loads(unreachable.stdout)["error"]["code"] == "connection_failed"


def test_the_client_distribution_stands_alone():
    """`pip install ./clients/python` brings the SDK and its command with nothing of the service."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((CLIENT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert requirements == {"httpx", "httpx-sse", "tenacity", "tqdm"}
    assert project["scripts"]["fd2-client"] == "fd2_client.cli:main"
    assert (CLIENT_ROOT / "fd2_client" / "py.typed").exists()
    from fd2_client.version import __version__

    assert project["version"] == __version__


def test_help_names_every_command_and_the_exit_codes():
    result = fd2_client("--help")
    assert result.returncode == EXIT_OK
    for command in ("upload", "submit", "wait", "download", "cancel", "delete", "ls"):
        assert command in result.stdout
    assert "exit codes" in result.stdout


def test_stage_bars_show_the_stage_its_percent_and_the_jobs_percent_and_eta():
    from fd2_client import Progress
    from fd2_client.cli_progress import StageBars

    events = [
        {"id": 1, "kind": "stage_start", "stage": "pretrain", "progress": 0.0, "message": "pretrain started"},
        {"id": 2, "kind": "progress", "stage": "pretrain", "progress": 0.3, "message": "pretrain 50%",
         "data": {"stage_progress": 0.5, "eta_seconds": 70}},
        {"id": 3, "kind": "warning", "stage": "pretrain", "message": "test images also occur in train"},
        {"id": 4, "kind": "stage_start", "stage": "distill", "progress": 0.5, "message": "distill started",
         "data": {"stage_progress": 0.0, "eta_seconds": 40}},
        {"id": 5, "kind": "succeeded", "progress": 1.0, "message": "job succeeded"},
    ]
    screen = io.StringIO()
    progress = Progress("job_x", "queued", None, 0.0, 0.0, None)
    with StageBars(show=True, file=screen) as bars:
        bars(progress)
        for event in events:
            progress = progress.after_event(event)
            bars(progress)
    lines = [line.strip() for line in screen.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    assert "pretrain   50%|#####     | job 30% eta 01:10" in lines
    assert "[warning] test images also occur in train" in lines
    assert "distill     0%|          | job 50% eta 00:40" in lines
    assert lines[-1] == "distill   100%|##########| job 100% succeeded"
    assert not any("started" in line for line in lines), "a stage change shows as a new bar, not a line"
