"""The `fd2-client` command as a script runs it (`python -m fd2_client`, a child process) against the real
embedded service: results on stdout (an id, or one JSON document with `--json`), bars and messages on stderr,
and exit codes a script can branch on (0 done, 1 job failed/cancelled, 2 usage or 4xx, 3 unavailable,
4 timeout, 5 checksum mismatch)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from typing import Any

import pytest
from client_service import FAST_SPEC, JOB_TIMEOUT_S, SLOW_SPEC, dataset_folder, service  # noqa: F401 (fixtures)
from http_stub import Reply, Seen, StubServer, error_reply, json_reply
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
    assert job["status"] == "succeeded" and job["artifacts"]
    for stage in ("pretrain", "distill", "relabel", "package"):
        assert stage in stderr
    assert "%|" in stderr and "eta" in stderr
    assert f"job {job['id']} succeeded" in stderr
    assert "no verdict against random" in stderr  # FAST_SPEC evaluates no student


@pytest.mark.service
def test_plain_submit_prints_only_the_job_id_also_with_wait(cli, finished):
    waited = cli("submit", finished["dataset"]["id"], "--spec", json.dumps(FAST_SPEC), "--wait")
    assert waited.returncode == EXIT_OK, waited.stderr
    job_id = waited.stdout.strip()
    assert waited.stdout == job_id + "\n" and job_id.startswith("job_")
    assert f"job {job_id} succeeded" in waited.stderr
    again = cli("wait", job_id)
    assert again.returncode == EXIT_OK and again.stdout == "succeeded\n", again.stderr


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
    assert "job has already succeeded" in finished_already.stderr

    unknown = cli("cancel", "job_" + "0" * 32)
    assert unknown.returncode == EXIT_REFUSED
    assert "list your jobs with `fd2-client ls jobs`" in unknown.stderr and "/v1/" not in unknown.stderr

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
    assert json.loads(cancelled.stdout)["id"] == job_id  # --json keeps the job resource
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
    assert "is the service running? check --url / $FD2_URL" in unreachable.stderr
    assert "retrying" not in unreachable.stderr  # never with --json


def test_retries_are_announced_with_progress_and_never_with_quiet():
    nobody = f"http://127.0.0.1:{free_port()}"
    shown = fd2_client("ls", "jobs", "--retries", "2", "--progress", url=nobody, key="k", timeout=120)
    assert shown.returncode == EXIT_UNAVAILABLE
    retries = [line for line in shown.stderr.splitlines() if "retrying in" in line]
    assert len(retries) == 2 and "cannot connect" in retries[0] and "(try 2 of 3)" in retries[0], shown.stderr
    assert shown.stderr.rstrip().endswith(f"is the service running? check --url / $FD2_URL (now {nobody})")
    quiet = fd2_client("ls", "jobs", "--retries", "1", "--progress", "--quiet", url=nobody, key="k", timeout=120)
    assert quiet.returncode == EXIT_UNAVAILABLE and "retrying" not in quiet.stderr
    captured = fd2_client("ls", "jobs", "--retries", "1", url=nobody, key="k", timeout=120)  # stderr is a pipe
    assert captured.returncode == EXIT_UNAVAILABLE and "retrying" not in captured.stderr


@pytest.mark.parametrize("url, says", [
    ("127.0.0.1:8765", "did you mean http://127.0.0.1:8765?"),
    ("localhost:8000", "did you mean http://localhost:8000?"),
    ("ftp://127.0.0.1:8000", "must start with http:// or https://"),
    ("http://:8000", "names no host"),
])
def test_a_url_that_cannot_be_the_service_is_a_usage_error(url, says):
    result = fd2_client("ls", "jobs", "--retries", "0", url=url, key="k")
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert says in result.stderr and "--url/$FD2_URL" in result.stderr
    assert "connection_failed" not in result.stderr


def _stub_job(status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    return {"id": "job_x", "status": status, "stage": None, "progress": 1.0, "stage_progress": 1.0,
            "eta_seconds": None, "error": None, "metrics": {}, "artifacts": [], "cancel_requested": False,
            **fields}


def test_a_url_ending_in_v1_is_taken_as_the_service_root():
    with StubServer(lambda seen: json_reply(200, {"items": [], "next_cursor": None})) as stub:
        result = fd2_client("ls", "jobs", url=stub.url + "/v1/", key="k")
    assert result.returncode == EXIT_OK, result.stderr
    assert stub.paths("GET") == ["/v1/jobs"]


def test_ls_names_its_argument_and_a_missing_spec_file_is_named():
    wrong = fd2_client("ls", "job", url="http://127.0.0.1:1", key="k")
    assert wrong.returncode == EXIT_REFUSED
    assert "argument {jobs,datasets}: invalid choice: 'job'" in wrong.stderr and "argument what" not in wrong.stderr
    missing = fd2_client("submit", "ds_x", "--spec", "nofile.json", url="http://127.0.0.1:1", key="k")
    assert missing.returncode == EXIT_REFUSED
    assert "--spec is neither JSON text nor an existing file: nofile.json" in missing.stderr
    assert "Errno" not in missing.stderr


def test_submit_and_wait_print_the_id_and_the_status_and_the_verdict_goes_to_stderr():
    metrics = {"teacher_accuracy": 0.52, "student_accuracy": 0.16, "random_baseline_accuracy": 0.2, "ior": -0.04,
               "ior_ci95": [-0.09, 0.01], "beats_random": False, "verdict": "not_distinguishable", **STORAGE}

    def serve(seen: Seen) -> Reply:
        if seen.method == "POST":
            return json_reply(202, _stub_job("queued", progress=0.0))
        return json_reply(200, _stub_job(metrics=metrics))

    with StubServer(serve) as stub:
        submitted = fd2_client("submit", "ds_x", "--wait", url=stub.url, key="k")
        waited = fd2_client("wait", "job_x", "--quiet", url=stub.url, key="k")
    assert submitted.returncode == EXIT_OK and submitted.stdout == "job_x\n", submitted.stderr
    assert "job job_x succeeded: teacher 52.0 %, student 16.0 %, random real subset 20.0 %" in submitted.stderr
    verdict = ("WARNING: verdict not_distinguishable: this set 16.0 % vs random real subset 20.0 % "
               "(IOR -4.0 points, 95 % CI [-9.0, +1.0])")
    assert verdict in submitted.stderr.splitlines()
    assert STORAGE_LINE in submitted.stderr.splitlines()
    assert waited.returncode == EXIT_OK and waited.stdout == "succeeded\n"
    assert waited.stderr.splitlines() == [verdict], "a set that does not beat random is shown even with --quiet"


STORAGE = {"distilled_images_bytes": 41_200, "soft_labels_bytes": 267_100, "soft_labels_kind": "stored",
           "compressed_bytes": 308_300, "real_data_bytes": 3_100_000, "real_data_kind": "encoded files",
           "compression_ratio": 3_100_000 / 308_300, "teacher_bytes": 1_200_000}
STORAGE_LINE = ("storage: images 41.2kB + soft labels 267kB = 308kB; real data 3.10MB (encoded files); "
                "ratio ×10.1 (real / (images + labels)); teacher 1.20MB")


def test_the_storage_line_weighs_the_download_against_the_real_data():
    from fd2_client.cli import storage_line

    assert storage_line(STORAGE) == STORAGE_LINE
    online = storage_line({**STORAGE, "soft_labels_kind": "online (teacher file)", "soft_labels_bytes": 1_200_000})
    assert online.startswith("storage: images 41.2kB + soft labels (online: teacher file) 1.20MB = ")
    # a job that ended before packaging, or one from before storage was measured
    assert storage_line({"student_accuracy": 0.4}) is None


def test_the_verdict_line_says_when_the_set_beats_random_or_was_not_compared():
    from fd2_client.cli import verdict_line

    beats = {"student_accuracy": 0.4, "random_baseline_accuracy": 0.2, "ior": 0.2, "ior_ci95": [0.1, 0.3],
             "verdict": "beats_random"}
    assert verdict_line(beats) == ("verdict beats_random: this set 40.0 % vs random real subset 20.0 % "
                                   "(IOR +20.0 points, 95 % CI [+10.0, +30.0])", True)
    line, compared = verdict_line({"student_accuracy": 0.4})
    assert compared is None and "random baseline was not measured" in line
    line, compared = verdict_line({})
    assert compared is None and "did not evaluate a student" in line


def test_cancel_says_what_happened_and_json_keeps_the_job():
    answers = {"job_q": _stub_job("cancelled", id="job_q"),
               "job_r": _stub_job("running", id="job_r", cancel_requested=True)}
    with StubServer(lambda seen: json_reply(202, answers[seen.path.split("/")[3]])) as stub:
        queued = fd2_client("cancel", "job_q", url=stub.url, key="k")
        running = fd2_client("cancel", "job_r", url=stub.url, key="k")
        as_json = fd2_client("cancel", "job_r", "--json", url=stub.url, key="k")
    assert queued.stdout == "cancelled (job was queued)\n", queued.stderr
    assert running.stdout == "cancel requested (job was running); it stops within seconds\n", running.stderr
    assert json.loads(as_json.stdout) == answers["job_r"]


def test_service_messages_name_commands_instead_of_rest_calls():
    from api.errors import not_found
    from api.routes.jobs import job_active
    from fd2_client.cli import build_parser, cli_message

    delete = build_parser().parse_args(["delete", "job_abc"])
    assert cli_message(not_found("job").message, delete) == \
        "job not found; check the id; list your jobs with `fd2-client ls jobs`"
    assert cli_message(not_found("dataset").message, delete) == \
        "dataset not found; check the id; list your datasets with `fd2-client ls datasets`"
    assert "`fd2-client download job_abc`" in cli_message(not_found("artifact").message, delete)
    assert cli_message(job_active("running").message, delete) == \
        "job is running; cancel it first: `fd2-client cancel job_abc`, then delete it once it has ended"
    unknown = "dataset 'ds_x' not found; upload one with POST /v1/datasets or use an id from GET /v1/datasets"
    assert "/v1/" not in cli_message(unknown)


def test_delete_of_a_dataset_id_without_dataset_asks_for_it_before_sending_anything():
    with StubServer(lambda seen: Reply(204)) as stub:
        result = fd2_client("delete", "ds_abc", url=stub.url, key="k")
    assert result.returncode == EXIT_REFUSED
    assert "ds_abc is a dataset id: add --dataset" in result.stderr and stub.requests == []


def test_download_of_an_unknown_artifact_lists_the_job_s_artifacts(tmp_path):
    artifacts = [{"name": n, "size": 1, "sha256": "0" * 64, "media_type": "application/json"}
                 for n in ("report.json", "preview.png")]
    with StubServer(lambda seen: json_reply(200, _stub_job(artifacts=artifacts))) as stub:
        result = fd2_client("download", "job_x", "report.jsn", "--out", str(tmp_path), url=stub.url, key="k")
    assert result.returncode == EXIT_REFUSED
    assert "job job_x has no artifact named 'report.jsn'; its artifacts: report.json, preview.png" in result.stderr
    assert list(tmp_path.iterdir()) == []
    not_found = error_reply(404, "not_found", "job not found; check the id (GET /v1/jobs lists your jobs)")
    with StubServer(lambda seen: not_found) as stub:
        missing = fd2_client("download", "job_y", url=stub.url, key="k")
    assert missing.returncode == EXIT_REFUSED and "`fd2-client ls jobs`" in missing.stderr


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


def test_installing_the_client_writes_nothing_into_its_source_folder(tmp_path):
    """The build backend builds out of tree, so `pip install ./clients/python` leaves the checkout as it was."""
    tomllib = pytest.importorskip("tomllib")
    build = tomllib.loads((CLIENT_ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "hatchling.build"
    source = tmp_path / "python"
    shutil.copytree(CLIENT_ROOT, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    before = sorted(str(p.relative_to(source)) for p in source.rglob("*"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "No matching distribution found for hatchling" in result.stderr:
        pytest.skip("hatchling, the client's build backend, cannot be fetched here")
    assert result.returncode == 0, result.stderr
    assert sorted(str(p.relative_to(source)) for p in source.rglob("*")) == before
    wheel = next((tmp_path / "dist").glob("fd2_client-*.whl"))
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
    assert {"fd2_client/cli.py", "fd2_client/py.typed"} <= names
    assert any(name.endswith("entry_points.txt") for name in names)


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
