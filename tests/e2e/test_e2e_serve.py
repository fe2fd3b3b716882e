"""`fd2 serve` as a user runs it: first key, readiness, and a stop/start that resumes a running job."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pipeline_helpers import tiny_spec
from service_harness import REPO_ROOT, free_port, service_env, wait_until

pytestmark = pytest.mark.service

# Slow enough per ipc index (seconds even on an idle machine) that SIGTERM lands while the job runs.
SPEC = tiny_spec(device="cpu", ipc=3, distill_iterations=400, evaluate=False, eval_random_baseline=False)
FINAL = ("succeeded", "failed", "cancelled")
KEY_LINE = re.compile(r"API key for tenant 'default'.*: (fd2_\S+)")


class Serve:
    """One `fd2 serve` process with its output in a file."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fd2_cli", "serve", "--home", str(home), "--port", str(port)],
                cwd=REPO_ROOT,
                env=service_env({}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout_s: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def test_serve_stops_cleanly_and_resumes_the_running_job_on_restart(tmp_path, dataset_zip):
    home, port, log = tmp_path / "home", free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    first = Serve(home, port, log)
    try:
        first_key = lambda: (m := KEY_LINE.search(first.output())) and m.group(1)
        key = wait_until(first_key, 60, what="the first key")
        assert f"http://127.0.0.1:{port}" in first.output()
        wait_until(lambda: _ready(base), 90, what="/readyz")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        with dataset_zip.open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("d.zip", handle, "application/zip")}).json()
        job = client.post("/v1/jobs", json={"dataset": {"id": dataset["id"]}, "spec": SPEC}).json()
        wait_until(lambda: _has_event(client, job["id"], "ipc index 1/3 distilled"), 240, what="ipc index 1")

        assert first.terminate() == 0  # the worker saved its work and requeued the job in time
        assert "SIGTERM received" in first.output()
    finally:
        first.kill()
        print(first.output()[-8000:])

    second = Serve(home, port, log)
    try:
        wait_until(lambda: _ready(base), 90, what="/readyz after restart")
        assert "API keys exist already" in second.output()  # no second default key
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        finished = lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] in FINAL and j
        done = wait_until(finished, 240, what="the resumed job")
        assert done["status"] == "succeeded", done["error"]
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["items"]]
        assert any("requeued" in m for m in messages)
        assert any("ipc index 0 already distilled" in m for m in messages)
        assert second.terminate() == 0
    finally:
        second.kill()
        print(second.output()[-8000:])


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _has_event(client: httpx.Client, job_id: str, text: str) -> bool:
    return any(text in e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["items"])


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=10, image_size=32, train_per_class=12, test_per_class=4, seed=5)
    return fgsynth.write_zip(data, tmp_path_factory.mktemp("upload") / "fgsynth.zip")
