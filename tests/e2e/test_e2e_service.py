"""End to end through real processes: uvicorn serving the API and a Celery worker running the pipeline.

Each scenario runs in two modes: embedded (SQLite + folder broker) and distributed (PostgreSQL + Redis).
Specs are tiny (10 classes, 32 px, a few iterations) so the file stays within minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_helpers import tiny_spec
from service_harness import ServiceStack, mode_stack, wait_until

from fd2_core.pipeline import ARTIFACT_NAMES

pytestmark = pytest.mark.service

CLASSES = 10
JOB_TIMEOUT_S = 240
FINAL = {"succeeded", "failed", "cancelled"}
CPU_SPEC = tiny_spec(device="cpu")
EXPECTED_ARTIFACTS = set(ARTIFACT_NAMES)
# Long enough per ipc index that a test can act between two indices, short enough to finish quickly.
SLOW_DISTILL_SPEC = tiny_spec(
    device="cpu", ipc=3, distill_iterations=40, evaluate=False, eval_random_baseline=False
)


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """A running API + worker for one mode, shared by the scenarios of this module."""
    with ExitStack() as resources:
        yield mode_stack(request.param, tmp_path_factory.mktemp(f"e2e-{request.param}"), resources)


@pytest.fixture
def service(stack: ServiceStack) -> Iterator[ServiceStack]:
    """The shared stack, with this test's process output printed (and so shown when the test fails)."""
    stack.log_tail()  # skip output from before this test
    yield stack
    print(stack.log_tail())
    if not stack.worker.alive:
        stack.start_worker()  # leave a working stack for the next scenario


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=CLASSES, image_size=32, train_per_class=12, test_per_class=4, seed=3)
    return fgsynth.write_zip(data, tmp_path_factory.mktemp("upload") / "fgsynth.zip")


# ---------------------------------------------------------------- client helpers


def upload_dataset(client: httpx.Client, archive: Path) -> dict[str, Any]:
    with archive.open("rb") as handle:
        response = client.post(
            "/v1/datasets", files={"file": (archive.name, handle, "application/zip")}, data={"name": "birds"}
        )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "ready" and dataset["num_classes"] == CLASSES
    return dataset


def submit_job(client: httpx.Client, dataset_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": spec})
    assert response.status_code == 202, response.text
    return response.json()


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(client: httpx.Client, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_until(
        lambda: (job := get_job(client, job_id))["status"] in FINAL and job,
        timeout_s,
        interval_s=0.5,
        what=f"job {job_id} to finish",
    )


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        response = client.get(f"/v1/jobs/{job_id}/events", params={"after": after} if after else None)
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        after = page["next_cursor"]
        if not after:
            return items


def new_tenant(service: ServiceStack, name: str) -> httpx.Client:
    return service.client(service.create_key(f"{name}-{service.mode}-{time.monotonic_ns()}"))


# ---------------------------------------------------------------- scenarios


def test_upload_distill_and_download_every_artifact(service: ServiceStack, dataset_zip: Path):
    with new_tenant(service, "alpha") as client:
        dataset = upload_dataset(client, dataset_zip)
        job = submit_job(client, dataset["id"], CPU_SPEC)
        assert job["status"] in ("queued", "running")
        job = wait_for_status(client, job["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"] == 1.0 and job["error"] is None
        assert {"teacher_accuracy", "student_accuracy", "random_baseline_accuracy"} <= set(job["metrics"])
        bodies = download_all(client, job)
        kinds = [(event["kind"], event["stage"]) for event in all_events(client, job["id"])]

    assert EXPECTED_ARTIFACTS <= set(bodies)
    check_distilled_tar(bodies["distilled.tar.gz"], dataset["classes"], CPU_SPEC["ipc"])
    report = json.loads(bodies["report.json"])
    assert report["metrics"]["student_accuracy"] == job["metrics"]["student_accuracy"]
    for stage in ("pretrain", "distill", "relabel", "evaluate", "package"):
        assert ("stage_start", stage) in kinds and ("stage_end", stage) in kinds
    assert kinds[-1][0] == "succeeded"


def test_cancel_mid_distill_is_fast_and_frees_the_worker(service: ServiceStack, dataset_zip: Path):
    with new_tenant(service, "beta") as client:
        dataset = upload_dataset(client, dataset_zip)
        long_job = submit_job(client, dataset["id"], tiny_spec(device="cpu", distill_iterations=50_000))
        next_job = submit_job(client, dataset["id"], CPU_SPEC)  # waits behind the long one
        in_distill = lambda: get_job(client, long_job["id"])["stage"] == "distill"
        wait_until(in_distill, JOB_TIMEOUT_S, what="the distill stage")
        assert get_job(client, next_job["id"])["status"] == "queued"

        requested = time.monotonic()
        response = client.post(f"/v1/jobs/{long_job['id']}/cancel")
        assert response.status_code == 202, response.text
        cancelled = wait_for_status(client, long_job["id"], timeout_s=30)
        elapsed = time.monotonic() - requested
        assert cancelled["status"] == "cancelled" and cancelled["stage"] == "distill"
        assert elapsed < 10, f"cancel took {elapsed:.1f} s"
        assert client.post(f"/v1/jobs/{long_job['id']}/cancel").status_code == 409

        finished = wait_for_status(client, next_job["id"])
        assert finished["status"] == "succeeded", finished["error"]


def test_a_killed_worker_s_job_resumes_on_a_new_worker(service: ServiceStack, dataset_zip: Path):
    with new_tenant(service, "gamma") as client:
        dataset = upload_dataset(client, dataset_zip)
        job = submit_job(client, dataset["id"], SLOW_DISTILL_SPEC)
        wait_until(
            lambda: any("ipc index 1/3 distilled" in e["message"] for e in all_events(client, job["id"])),
            JOB_TIMEOUT_S,
            interval_s=0.3,
            what="the first ipc index to be distilled",
        )
        service.worker.kill()  # SIGKILL: no chance to save or requeue anything
        assert get_job(client, job["id"])["status"] == "running"

        service.start_worker()
        finished = wait_for_status(client, job["id"])
        assert finished["status"] == "succeeded", finished["error"]
        events = all_events(client, job["id"])
        report = json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").content)

    messages = [event["message"] for event in events]
    kinds = [event["kind"] for event in events]
    assert "takeover" in kinds or "requeued" in kinds
    assert sum(kind == "started" for kind in kinds) == 2
    assert any("resuming" in message for message in messages)
    # the distill stage continued after the saved index instead of starting again from index 0
    assert any("ipc index 0 already distilled" in message for message in messages)
    assert report["resumed"] is True


def test_tenants_cannot_see_each_other(service: ServiceStack, dataset_zip: Path):
    with new_tenant(service, "owner") as owner, new_tenant(service, "other") as other:
        dataset = upload_dataset(owner, dataset_zip)
        job = wait_for_status(owner, submit_job(owner, dataset["id"], CPU_SPEC)["id"])
        assert job["status"] == "succeeded", job["error"]
        artifact = job["artifacts"][0]["name"]
        assert owner.get(f"/v1/jobs/{job['id']}/artifacts/{artifact}").status_code == 200

        unknown_job, unknown_dataset = "job_" + "0" * 32, "ds_" + "0" * 32
        probes = [
            ("GET", "/v1/datasets/{ds}"),
            ("DELETE", "/v1/datasets/{ds}"),
            ("GET", "/v1/jobs/{job}"),
            ("GET", "/v1/jobs/{job}/events"),
            ("POST", "/v1/jobs/{job}/cancel"),
            ("DELETE", "/v1/jobs/{job}"),
            ("GET", "/v1/jobs/{job}/artifacts/" + artifact),
        ]
        for method, template in probes:
            foreign = other.request(method, template.format(ds=dataset["id"], job=job["id"]))
            missing = other.request(method, template.format(ds=unknown_dataset, job=unknown_job))
            assert foreign.status_code == 404, (method, template, foreign.text)
            assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]

        foreign_submit = other.post("/v1/jobs", json={"dataset": {"id": dataset["id"]}, "spec": CPU_SPEC})
        missing_submit = other.post("/v1/jobs", json={"dataset": {"id": unknown_dataset}, "spec": CPU_SPEC})
        assert foreign_submit.status_code == missing_submit.status_code
        assert foreign_submit.status_code in (404, 422)
        assert foreign_submit.json()["error"]["code"] == missing_submit.json()["error"]["code"]

        assert dataset["id"] not in {d["id"] for d in other.get("/v1/datasets").json()["items"]}
        assert job["id"] not in {j["id"] for j in other.get("/v1/jobs").json()["items"]}
        assert owner.get(f"/v1/datasets/{dataset['id']}").status_code == 200  # the probes changed nothing
        assert owner.get(f"/v1/jobs/{job['id']}/artifacts/{artifact}").status_code == 200


# The paper's other rows, each run by a real worker: RDED, FADRM+ alone, and FD² on FADRM+ with a committee of two.
PAPER_ROWS = {
    "rded": {"method": "rded"},
    "fadrm+": {"method": "fadrm+", "fadrm_phase_steps": [2, 2, 3]},
    "fd2 on fadrm+, committee": {
        "method": "fd2", "base": "fadrm+", "fadrm_phase_steps": [2, 2, 3],
        "committee": [{"backbone": "convnet", "model_width": 8}, {"backbone": "convnet", "model_width": 12}],
    },
}


@pytest.mark.parametrize("row", sorted(PAPER_ROWS))
def test_each_paper_method_runs_through_the_service(service: ServiceStack, dataset_zip: Path, row: str):
    spec = tiny_spec(device="cpu", eval_random_baseline=False, **PAPER_ROWS[row])
    with new_tenant(service, "rows") as client:
        dataset = upload_dataset(client, dataset_zip)
        job = wait_for_status(client, submit_job(client, dataset["id"], spec)["id"])
        assert job["status"] == "succeeded", job["error"]
        bodies = download_all(client, job)
    report = json.loads(bodies["report.json"])
    assert report["method"] == spec["method"] and report["spec"]["base"] == spec.get("base")
    check_distilled_tar(bodies["distilled.tar.gz"], dataset["classes"], spec["ipc"])
    assert 0.0 <= job["metrics"]["student_accuracy"] <= 1.0
    if "committee" in spec:
        assert [m["model_width"] for m in report["teacher"]["members"]] == [8, 12]
        teacher_meta = json.loads(bodies["teacher.safetensors"][8:8 + int.from_bytes(
            bodies["teacher.safetensors"][:8], "little")])["__metadata__"]
        assert teacher_meta["format"] == "fd2.teacher.committee.v1"
        assert [m["prefix"] for m in json.loads(teacher_meta["members"])] == ["members.0.", "members.1."]


def test_follow_a_job_live_over_server_sent_events_then_delete_it(service: ServiceStack, dataset_zip: Path):
    """What a console does: watch the stream until `end`, then remove the job and everything it kept."""
    with new_tenant(service, "delta") as client:
        dataset = upload_dataset(client, dataset_zip)
        job = submit_job(client, dataset["id"], tiny_spec(device="cpu", evaluate=False, eval_random_baseline=False))
        streamed: list[tuple[str, str, str]] = []  # (id, event, data) per SSE block
        block: dict[str, str] = {}
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"},
                           timeout=JOB_TIMEOUT_S) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    name, _, value = line.partition(":")
                    block[name] = value.removeprefix(" ")
                    continue
                if "event" in block:
                    streamed.append((block.get("id", ""), block["event"], block.get("data", "")))
                block = {}
        *events, end = streamed
        assert end[1] == "end" and json.loads(end[2]) == {"job_id": job["id"], "status": "succeeded"}
        listed = all_events(client, job["id"])
        assert [json.loads(data) for _, _, data in events] == listed[:len(events)]
        assert [event for _, event, _ in events][-1] == "succeeded"
        assert ("stage_start", "pretrain") in [(e["kind"], e["stage"]) for e in listed]

        workdir = service_home(service) / "jobs" / job["id"]
        assert workdir.is_dir()
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert not workdir.exists()


def service_home(service: ServiceStack) -> Path:
    return Path(service.env["FD2_HOME"])


# ---------------------------------------------------------------- checks


def download_all(client: httpx.Client, job: dict[str, Any]) -> dict[str, bytes]:
    """Every listed artifact, checked against its listed size, sha256 and ETag."""
    bodies = {}
    for artifact in job["artifacts"]:
        response = client.get(artifact["url"])
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert len(response.content) == artifact["size"]
        assert response.headers["etag"].strip('"') == artifact["sha256"]
        bodies[artifact["name"]] = response.content
    return bodies


def check_distilled_tar(blob: bytes, classes: list[str], ipc: int) -> None:
    """images/<class>/<class>_<i>.png per class and index, labels.csv, per-file sha256 in manifest.json."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    images = {name for name in files if name.startswith("images/")}
    assert len(images) == len(classes) * ipc
    labels = list(csv.DictReader(io.StringIO(files["labels.csv"].decode())))
    assert {row["file"] for row in labels} == images
    assert {row["class_name"] for row in labels} == set(classes)
    for row in labels:
        assert classes[int(row["class_index"])] == row["class_name"]
        _, folder, file_name = row["file"].split("/")
        assert file_name.startswith(f"{folder}_") and file_name.endswith(".png")
    manifest = json.loads(files["manifest.json"])
    assert manifest["files"] == {name: hashlib.sha256(files[name]).hexdigest() for name in images}
