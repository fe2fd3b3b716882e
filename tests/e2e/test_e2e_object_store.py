"""Jobs on an s3:// prefix, through real processes: uvicorn, a Celery worker and moto's S3 server, in
embedded mode (SQLite + folder broker) and distributed mode (PostgreSQL + Redis). The operator grants
the tenant a prefix with the real `fd2 uris allow`; the service reaches the store through the
standard `AWS_*` variables alone.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from pipeline_helpers import tiny_spec
from s3_server import S3Server, s3_server, s3_unavailable
from service_harness import REPO_ROOT, ServiceStack, mode_stack, wait_until

pytestmark = pytest.mark.service

BUCKET = "team-datasets"
CLASSES, TRAIN, TEST = 4, 6, 2
SPEC = tiny_spec(device="cpu", evaluate=False, eval_random_baseline=False)
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    reason = s3_unavailable()
    if reason:
        pytest.skip(reason)
    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        from fd2_core.data import fgsynth

        data = fgsynth.generate(num_classes=CLASSES, image_size=32, train_per_class=TRAIN, test_per_class=TEST,
                                seed=5)
        folder = fgsynth.write_imagefolder(data, tmp_path_factory.mktemp("tree") / "birds")
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket="other-team")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.put_object(Bucket=BUCKET, Key=f"vision/birds/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())
        yield server


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def stack(request: pytest.FixtureRequest, s3: S3Server,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with ExitStack() as resources:
        yield mode_stack(request.param, tmp_path_factory.mktemp(f"s3-{request.param}"), resources, env=s3.env())


def grant(stack: ServiceStack, tenant: str, uri: str) -> None:
    subprocess.run([sys.executable, "-m", "fd2_cli", "uris", "allow", tenant, uri], cwd=REPO_ROOT, env=stack.env,
                   capture_output=True, text=True, timeout=120, check=True)


def tenant(stack: ServiceStack, uri: str | None) -> httpx.Client:
    name = f"s3-{stack.mode}-{time.monotonic_ns()}"
    client = stack.client(stack.create_key(name))
    if uri is not None:
        grant(stack, name, uri)
    return client


def submit(client: httpx.Client, uri: str) -> httpx.Response:
    return client.post("/v1/jobs", json={"dataset": {"uri": uri}, "spec": SPEC})


def test_a_job_on_a_granted_prefix_runs_end_to_end(stack: ServiceStack) -> None:
    client = tenant(stack, f"s3://{BUCKET}/vision/")
    accepted = submit(client, f"s3://{BUCKET}/vision/birds/")
    assert accepted.status_code == 202, accepted.text
    job: dict[str, Any] = accepted.json()
    assert job["dataset_source"] == "uri" and job["dataset_uri"] == f"s3://{BUCKET}/vision/birds/"
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] in FINAL and j, 240,
                      interval_s=0.5, what="the s3 job to finish")
    assert done["status"] == "succeeded", (done["error"], stack.log_tail())
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 200}).json()["items"]
    total = CLASSES * (TRAIN + TEST)
    assert any(f"fetching {total} / {total} objects" in e["message"] for e in events), [e["message"] for e in events]
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["dataset"]["num_classes"] == CLASSES
    assert report["dataset"]["splits"] == {"train": CLASSES * TRAIN, "test": CLASSES * TEST}
    assert report["dataset"]["source"] == f"s3://{BUCKET}/vision/birds/"  # not the worker's local copy
    listed = client.get("/v1/jobs").json()["items"]
    assert [j["dataset_source"] for j in listed if j["id"] == job["id"]] == ["uri"]


def test_the_sdk_submits_an_s3_reference(stack: ServiceStack) -> None:
    from fd2_client import Client

    http = tenant(stack, f"s3://{BUCKET}/vision/birds/")
    key = http.headers["Authorization"].removeprefix("Bearer ")
    with Client(stack.base_url, key) as sdk:
        job = sdk.submit(f"s3://{BUCKET}/vision/birds/", {**SPEC, "relabel_epochs": 1})
        assert job["dataset_source"] == "uri" and job["status"] == "queued"
        sdk.cancel(job)


@pytest.mark.parametrize(("granted", "uri", "status", "code"), [
    (None, f"s3://{BUCKET}/vision/birds/", 403, "uri_not_allowed"),  # no grant at all
    (f"s3://{BUCKET}/vision/cars/", f"s3://{BUCKET}/vision/birds/", 403, "uri_not_allowed"),
    ("s3://absent-bucket/", "s3://absent-bucket/x/", 422, "no_such_bucket"),
    (f"s3://{BUCKET}/", f"s3://{BUCKET}/nothing-here/", 422, "no_images"),
    (f"s3://{BUCKET}/", "s3://Bad_Bucket/x", 422, "invalid_uri"),
])
def test_a_reference_that_cannot_run_is_refused_leaving_nothing(stack: ServiceStack, granted: str | None,
                                                                  uri: str, status: int, code: str) -> None:
    client = tenant(stack, granted)
    refused = submit(client, uri)
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["code"] == code
    assert client.get("/v1/jobs").json()["items"] == []


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_object_changed_after_admission_fails_the_job_saying_so(stack: ServiceStack, s3: S3Server) -> None:
    prefix = f"changing-{stack.mode}"
    client_s3 = s3.client()
    for c in range(2):
        for i in range(4):
            client_s3.put_object(Bucket="other-team", Key=f"{prefix}/c{c}/{i}.png", Body=_png())
    client = tenant(stack, f"s3://other-team/{prefix}/")
    # the worker is stopped so the object changes between admission and fetch
    stack.worker.stop()
    try:
        accepted = submit(client, f"s3://other-team/{prefix}/")
        assert accepted.status_code == 202, accepted.text
        client_s3.put_object(Bucket="other-team", Key=f"{prefix}/c1/2.png", Body=_png() + b"appended")
    finally:
        stack.start_worker()
    job_id = accepted.json()["id"]
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in FINAL and j, 240,
                      interval_s=0.5, what="the job to end")
    assert done["status"] == "failed" and done["error"]["code"] == "object_changed", done["error"]
    assert f"{prefix}/c1/2.png" in done["error"]["message"]


def test_a_manifest_of_object_uris_runs_and_a_missing_object_refuses_it(stack: ServiceStack, s3: S3Server) -> None:
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="vision/birds/train/")["Contents"]]
    items = [{"uri": f"s3://{BUCKET}/{key}", "label": key.split("/")[-2]} for key in keys]
    client = tenant(stack, f"s3://{BUCKET}/vision/birds/")
    body = {"dataset": {"manifest": {"items": items}}, "spec": SPEC}
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["dataset_source"] == "uri"
    job_id = accepted.json()["id"]
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in FINAL and j, 240,
                      interval_s=0.5, what="the manifest job to finish")
    assert done["status"] == "succeeded", (done["error"], stack.log_tail())
    missing = {"uri": f"s3://{BUCKET}/vision/birds/train/nope.png", "label": "wren"}
    refused = client.post("/v1/jobs", json={**body, "dataset": {"manifest": {"items": [*items, missing]}}})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "bad_manifest", refused.text
    assert refused.json()["error"]["details"]["rows"][0]["reason"] == "object not found"
    outside = {"uri": "s3://other-team/anything.png", "label": "wren"}
    forbidden = client.post("/v1/jobs", json={**body, "dataset": {"manifest": {"items": [*items, outside]}}})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "uri_not_allowed"
    mixed = client.post("/v1/jobs", json={**body, "dataset": {"manifest": {"root": "/data", "items": items}}})
    assert mixed.status_code == 422 and "no 'root'" in mixed.text
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job_id]


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.jsonl"])
def test_a_manifest_object_in_the_bucket_runs(stack: ServiceStack, s3: S3Server, name: str) -> None:
    import json

    client_s3 = s3.client()
    keys = [o["Key"] for o in client_s3.list_objects_v2(Bucket=BUCKET, Prefix="vision/birds/train/")["Contents"]]
    rows = [{"path": key.removeprefix("vision/birds/"), "label": key.split("/")[-2]} for key in keys]
    if name.endswith(".csv"):
        body = "path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows)
    else:
        body = "".join(json.dumps({"uri": f"s3://{BUCKET}/vision/birds/{r['path']}", "label": r["label"]}) + "\n"
                       for r in rows)
    client_s3.put_object(Bucket=BUCKET, Key=f"vision/birds/{name}", Body=body.encode())
    client = tenant(stack, f"s3://{BUCKET}/vision/")
    accepted = submit(client, f"s3://{BUCKET}/vision/birds/{name}")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in FINAL and j, 240,
                      interval_s=0.5, what="the manifest-object job to finish")
    assert done["status"] == "succeeded", (done["error"], stack.log_tail())
    client_s3.put_object(Bucket=BUCKET, Key="vision/birds/broken.jsonl", Body=b"{not json\n")
    broken = submit(client, f"s3://{BUCKET}/vision/birds/broken.jsonl")
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "bad_manifest", broken.text


def test_a_fetch_killed_midway_resumes_from_the_cache(stack: ServiceStack, s3: S3Server) -> None:
    """SIGKILL of the worker while it fetches; the job's next worker finds what was fetched in the cache."""
    if stack.mode != "embedded":
        pytest.skip("one mode suffices: the cache is the worker's, whatever the broker")
    prefix = "many"
    client_s3 = s3.client()
    image = _png()
    for c in range(2):
        for i in range(300):
            client_s3.put_object(Bucket="other-team", Key=f"{prefix}/c{c}/{i}.png", Body=image)
    client = tenant(stack, f"s3://other-team/{prefix}/")
    accepted = submit(client, f"s3://other-team/{prefix}/")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]

    def messages() -> list[str]:
        return [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["items"]]

    wait_until(lambda: any(m.startswith("fetching") and "/ 600 objects" in m and not m.startswith("fetching 600")
                           for m in messages()), 120, interval_s=0.2, what="the fetch to be under way")
    stack.worker.kill()
    stack.start_worker()
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in FINAL and j, 300,
                      interval_s=0.5, what="the job to finish on the new worker")
    assert done["status"] == "succeeded", (done["error"], stack.log_tail())
    final = [m for m in messages() if m.startswith("fetching 600 / 600 objects")]
    cached = int(final[-1].rsplit("(", 1)[1].split(" ")[0].replace(" ", ""))
    assert 0 < cached < 600, final  # the second fetch reused what the first had cached
