"""Shard scaling: one job spread over 1 and then 2 Celery worker processes,
wall time per stage; and a paper-scale estimate for CUB-200 on 1, 2, 4 and
8 GPUs from the per-step times measured on an H200.

What is measured.
In one invocation, twice (1 worker, then 2 workers), each time in a fresh FD2_HOME: an embedded
service (a real `uvicorn api.main:app` and real `python -m fd2_cli worker` processes, SQLite + the
folder broker, no external servers) is started, the built-in FGSynth data is uploaded (`POST
/v1/datasets`), a warm-up job runs, then the measured job is submitted (`POST /v1/jobs`) and polled
until it ends, and its event log (`GET /v1/jobs/{id}/events`) is read.
Per stage: the wall time from the first `shard_started` event of the stage to its last
`shard_finished` event (server timestamps; `worker/shard_runner.py` writes them when a worker claims
a shard and when the shard ends `done`, with `data.shard` and the shard's stage), so the merge
shards (`distill:merge`, `relabel:merge`) and the gaps between shards (a message waits up to one
broker poll, 1 s, for a free worker) count in their stage.
Whole job: `finished_at - created_at` of the job resource (submission to `succeeded`).
Speed-up = 1-worker time / 2-worker time; targets: >= 1.8x for distill, >= 1.7x for relabel.
The result file also holds every shard's start and end (`timeline`) and its seconds per stage.

Fair comparison.
Both runs submit the same spec with `max_workers: 2`, so both plan the same shards (class blocks,
relabel epoch ranges: the ranges depend on `max_workers`) and pay the same per-shard costs (loading
the data and the teacher, dispatch); only the number of live worker processes differs, and with one
worker the shards run one after another (the second dispatched message waits in the broker).
A `max_workers: 1` job would run unsharded, so the comparison would also measure the cost of
sharding, not only the parallelism.
A worker imports torch and the pipeline at its first task (several seconds),
which would land in whichever stage first gives the second worker a shard: a
short warm-up job (seed 1, its own work folder, nothing of it reused) runs
first, repeated (at most 3 times) until every worker has run a shard.

Configuration.
Preset `cpu-small`, device cpu, one teacher (pretrain is one shard: no speed-up expected), an even
number of class blocks (`--classes` / `--block`, at least 4), `--iterations` distill steps per ipc
index, `--relabel-epochs` >= 50 (two ranges of >= 25 epochs), evaluation off (`evaluate: false`):
the evaluation students that need no distilled set (the random-subset baseline) would be scheduled
beside the distill blocks, so the stage windows would overlap.
Default: 32 classes x 20 train images at 32 px, IPC 4, 4 blocks of 8 classes, 600 iterations (about
35-50 s per block on one core), 800 relabel epochs (2 ranges of 400, about 30-40 s each), 4 pretrain
epochs: about 10 minutes in all on 2 idle cores.
Every child process runs with one torch thread: the worker sets no thread count of its own (no
`set_num_threads` in worker/ or fd2_cli/, no FD2_* thread setting), so torch follows
OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1); the thread count the package shard ran with is read back
from `report.json` (`device.threads`).
The figures mean something only with two idle cores for the two workers:
the idle cores just before each run and the load average before and after are recorded, and a
warning is printed when fewer than two cores were idle.

Paper-scale estimate (`--estimate-only` prints it alone, no service): from figures measured on one
H200, cited per line in the output (bench/results/fadrm_run_h200.json and the "GPU check" tables of
docs/BENCHMARKS.md), per stage the work on one GPU and the wall time with N GPUs as
`fd2_core.shards.plan_shards` splits it: one pretrain shard per teacher, one distill shard per block
of `distill_batch_classes` classes (CUB-200 at 100 classes per block: 2 blocks, so distillation
stops scaling at 2 GPUs), relabel epoch ranges of at least 25 epochs (at most N).
The assumptions and what is left out are printed with it.

    .venv/bin/python bench/shard_scaling.py                  # default configuration, about 10 min
on 2 idle cores .venv/bin/python bench/shard_scaling.py --quick --json /tmp/shard_quick.json   #
smoke run, about 1-2 min .venv/bin/python bench/shard_scaling.py --estimate-only    # the
paper-scale estimate alone """

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

DEFAULT_JSON = REPO / "bench" / "results" / "shard_scaling.json"
QUICK_JSON = REPO / "bench" / "results" / "shard_scaling_quick.json"
FADRM_RUN_JSON = REPO / "bench" / "results" / "fadrm_run_h200.json"
TARGETS = {"distill": 1.8, "relabel": 1.7}
STAGES = ("pretrain", "distill", "relabel", "evaluate", "package")
FINAL = {"succeeded", "failed", "cancelled"}
WORKER_READY = " ready."  # Celery's "<node name> ready." line, printed once the worker consumes
POLL_S = 1.0
START_TIMEOUT_S = 180.0
WARMUP_JOBS = 3  # at most this many warm-up jobs, until every worker has run a shard


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """The job and the data; `spec()` is what both runs submit."""

    classes: int = 32
    block: int = 8  # distill_batch_classes
    iterations: int = 600  # distill_iterations per ipc index
    relabel_epochs: int = 800
    ipc: int = 4
    train_per_class: int = 20
    test_per_class: int = 4
    pretrain_epochs: int = 4
    image_size: int = 32
    max_workers: int = 2
    job_timeout_s: float = 3600.0

    def spec(self) -> dict[str, Any]:
        return {
            "preset": "cpu-small", "device": "cpu", "seed": 0, "ipc": self.ipc, "image_size": self.image_size,
            "pretrain_epochs": self.pretrain_epochs, "distill_iterations": self.iterations,
            "distill_batch_classes": self.block, "relabel_epochs": self.relabel_epochs, "evaluate": False,
            "max_workers": self.max_workers,
        }

    def warmup_spec(self) -> dict[str, Any]:
        """A short job of the same shape (a job of its own, so a work folder of its own, and seed
        1): every worker process imports torch and the pipeline before the measured job."""
        return {**self.spec(), "seed": 1, "pretrain_epochs": 1, "distill_iterations": min(self.iterations, 100),
                "relabel_epochs": 50}

    def check(self) -> None:
        """The shape the comparison needs (parser errors name the flag)."""
        blocks = math.ceil(self.classes / self.block) if self.block > 0 else 0
        if blocks < 4 or blocks % 2:
            raise ValueError(f"--classes {self.classes} / --block {self.block} gives {blocks} class blocks; "
                             "need an even number, at least 4")
        if self.relabel_epochs < 50:
            raise ValueError("--relabel-epochs must be at least 50 (two ranges of at least 25 epochs)")


QUICK = Config(classes=4, block=1, iterations=300, relabel_epochs=600, ipc=1, train_per_class=8, pretrain_epochs=1,
               job_timeout_s=900.0)


# ---------------------------------------------------------------- child processes


@dataclass
class Child:
    """A child process in a session of its own, its output in `log_path`."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to its process group, SIGKILL after `timeout_s`."""
        if not self.alive:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def child_env(home: Path) -> dict[str, str]:
    """The caller's environment without FD2_* settings, with the embedded
    home and one torch thread."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FD2_")}
    env.update({"FD2_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def start_child(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Child(name, process, log_path)


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Service:
    """An embedded API and `workers` worker processes under one home."""

    home: Path
    port: int
    children: list[Child] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for child in reversed(self.children):  # workers first, the API last
            child.stop()

    def log_tail(self, limit: int = 4000) -> str:
        return "\n".join(f"----- {c.name} -----\n{c.log_text()[-limit:]}" for c in self.children)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_key(home: Path) -> str:
    """A tenant key, written to the fresh home's database before any process starts."""
    from fd2_config.settings import Settings
    from store.db import dispose_engines, migrate, session_scope
    from store.keys import create_tenant_key

    settings = Settings(home=home)
    migrate(settings)
    with session_scope(settings) as session:
        key = create_tenant_key(session, "shard-bench")
    dispose_engines()
    return key


def start_service(home: Path, workers: int, log_dir: Path) -> Service:
    """uvicorn, then `workers` workers, each waited for until it consumes."""
    env = child_env(home)
    service = Service(home, free_port())
    try:
        api = start_child("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                  f"--port={service.port}"], env, log_dir)
        service.children.append(api)

        def api_ready() -> bool:
            if not api.alive:
                raise RuntimeError(f"the API exited:\n{api.log_text()[-4000:]}")
            try:
                return httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(api_ready, START_TIMEOUT_S, "the API's /readyz")
        for index in range(workers):
            worker = start_child(f"worker-{index}", [sys.executable, "-m", "fd2_cli", "worker", "--queues=fd2.cpu"],
                                 env, log_dir)
            service.children.append(worker)
            wait_for(lambda w=worker: WORKER_READY in w.log_text() or not w.alive, START_TIMEOUT_S,
                     f"worker {index} to be ready")
            if not worker.alive:
                raise RuntimeError(f"worker {index} exited at start:\n{worker.log_text()[-4000:]}")
    except BaseException:
        service.stop()
        raise
    return service


# ---------------------------------------------------------------- the API calls


def upload_dataset(client: httpx.Client, config: Config, folder: Path) -> str:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=config.classes, image_size=config.image_size,
                            train_per_class=config.train_per_class, test_per_class=config.test_per_class, seed=0)
    archive = fgsynth.write_zip(data, folder / "fgsynth.zip")
    with archive.open("rb") as handle:
        response = client.post("/v1/datasets", files={"file": (archive.name, handle, "application/zip")},
                               data={"name": "shard-bench"})
    response.raise_for_status()
    return str(response.json()["id"])


def submit(client: httpx.Client, dataset_id: str, spec: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": spec})
    response.raise_for_status()
    return str(response.json()["id"])


def wait_final(client: httpx.Client, job_id: str, timeout_s: float, service: Service) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        if not all(child.alive for child in service.children):
            raise RuntimeError(f"a service process exited during the job:\n{service.log_tail()}")
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        return job if job["status"] in FINAL else None

    return wait_for(final, timeout_s, f"job {job_id} to end", interval_s=POLL_S)


def warm_up(client: httpx.Client, dataset_id: str, config: Config, service: Service, workers: int
            ) -> dict[str, Any]:
    """Warm-up jobs until every worker process has run a shard (at most
    WARMUP_JOBS): a worker imports torch and the pipeline at its first task,
    which would otherwise land in whichever stage first gives it a shard."""
    warm: set[str] = set()
    jobs: list[str] = []
    while len(warm) < workers and len(jobs) < WARMUP_JOBS:
        job_id = submit(client, dataset_id, config.warmup_spec())
        job = wait_final(client, job_id, config.job_timeout_s, service)
        if job["status"] != "succeeded":
            raise RuntimeError(f"warm-up job {job_id} {job['status']}: {job.get('error')}\n{service.log_tail()}")
        jobs.append(job_id)
        warm |= {s["worker"] for s in (job.get("shards") or {}).get("items", []) if s.get("worker")}
    return {"jobs": jobs, "warm_workers": len(warm)}


def job_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after} if after else None)
        page = page.raise_for_status().json()
        items.extend(page["items"])
        after = page["next_cursor"]
        if not after:
            return items


def report_threads(client: httpx.Client, job: dict[str, Any]) -> str | None:
    """torch threads of the worker that ran the package shard (report.json `device.threads`)."""
    url = next((a["url"] for a in job["artifacts"] if a["name"] == "report.json"), None)
    if url is None:
        return None
    return client.get(url).raise_for_status().json().get("device", {}).get("threads")


# ---------------------------------------------------------------- timing from the events


def timestamp(value: str) -> float:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def event_stage(event: dict[str, Any]) -> str:
    return event.get("stage") or event["data"]["shard"].split(":")[0]


def stage_times(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage: first `shard_started` to last `shard_finished` (s), its
    shards, and the seconds each shard ran (its last start to its finish);
    a stage whose shards never all finished is left out."""
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    stage_of: dict[str, str] = {}
    first_start: dict[str, float] = {}
    for event in events:
        if event["kind"] not in ("shard_started", "shard_finished"):
            continue
        shard, at = event["data"]["shard"], timestamp(event["created_at"])
        stage_of[shard] = event_stage(event)
        if event["kind"] == "shard_started":
            started[shard] = at
            first_start.setdefault(shard, at)
        else:
            finished[shard] = at
    result: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        shards = [s for s in stage_of if stage_of[s] == stage]
        if not shards or any(s not in finished for s in shards):
            continue
        begin = min(first_start[s] for s in shards)
        end = max(finished[s] for s in shards)
        per_shard = {s: round(finished[s] - started[s], 2) for s in sorted(shards)}
        result[stage] = {"seconds": round(end - begin, 2), "shards": len(shards),
                         "shard_seconds": round(sum(per_shard.values()), 2), "per_shard_s": per_shard}
    return result


def timeline(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every shard attempt: its start and end in seconds after the job's
    first shard started, and its worker."""
    shard_events = [e for e in events if e["kind"].startswith("shard_") and "shard" in (e.get("data") or {})]
    if not shard_events:
        return []
    zero = min(timestamp(e["created_at"]) for e in shard_events)
    rows: list[dict[str, Any]] = []
    open_rows: dict[str, dict[str, Any]] = {}
    for event in shard_events:
        shard, at = event["data"]["shard"], round(timestamp(event["created_at"]) - zero, 2)
        if event["kind"] == "shard_started":
            open_rows[shard] = {"shard": shard, "worker": event["data"].get("worker"), "start_s": at, "end_s": None}
            rows.append(open_rows[shard])
        elif shard in open_rows and event["kind"] in ("shard_finished", "shard_failed", "shard_cancelled",
                                                      "shard_requeued"):
            open_rows.pop(shard)["end_s"] = at
    return rows


# ---------------------------------------------------------------- one run


def run_once(config: Config, workers: int, root: Path) -> dict[str, Any]:
    """A fresh home, the service with `workers` workers, one job; its stage times."""
    home, logs = root / f"home-{workers}w", root / f"logs-{workers}w"
    logs.mkdir(parents=True)
    key = create_key(home)
    idle_before = idle_cores()
    load_before = os.getloadavg()
    service = start_service(home, workers, logs)
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=service.base_url, headers=headers, timeout=120) as client:
            dataset_id = upload_dataset(client, config, root)
            warmup = warm_up(client, dataset_id, config, service, workers)
            submitted = time.monotonic()
            job_id = submit(client, dataset_id, config.spec())
            job = wait_final(client, job_id, config.job_timeout_s, service)
            client_s = time.monotonic() - submitted
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{service.log_tail()}")
            events = job_events(client, job_id)
            threads = report_threads(client, job)
    finally:
        service.stop()
    items = (job.get("shards") or {}).get("items", [])
    return {
        "workers": workers, "job_id": job_id, "warmup": warmup,
        "job_s": round(timestamp(job["finished_at"]) - timestamp(job["created_at"]), 2),
        "job_client_s": round(client_s, 2),
        "stages": stage_times(events),
        "timeline": timeline(events),
        "shard_workers": sorted({s["worker"] for s in items if s.get("worker")}),
        "shard_attempts": {s["id"]: s["attempts"] for s in items if s["attempts"] != 1},
        "torch_threads_in_worker": threads,
        "idle_cores_before": idle_before,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def speedups(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
    result = {stage: round(one["stages"][stage]["seconds"] / two["stages"][stage]["seconds"], 3)
              for stage in STAGES if stage in one["stages"] and stage in two["stages"]
              and two["stages"][stage]["seconds"] > 0}
    result["job"] = round(one["job_s"] / two["job_s"], 3)
    return result


def run_warnings(runs: list[dict[str, Any]]) -> list[str]:
    """What makes a run's figures doubtful: fewer workers used or warmed than started, requeued
    shards, a torch thread count other than 1, or fewer than two idle cores just before the run."""
    lines = []
    for run in runs:
        name = f"{run['workers']}-worker run"
        if len(run["shard_workers"]) < run["workers"]:
            lines.append(f"{name}: shards ran on {len(run['shard_workers'])} of {run['workers']} workers")
        if run["warmup"]["warm_workers"] < run["workers"]:
            lines.append(f"{name}: only {run['warmup']['warm_workers']} worker(s) warmed up")
        if run["shard_attempts"]:
            lines.append(f"{name}: shards ran more than once: {run['shard_attempts']}")
        if run["torch_threads_in_worker"] != "1":
            lines.append(f"{name}: the worker ran with {run['torch_threads_in_worker']} torch threads")
        idle = run["idle_cores_before"]
        if idle is not None and idle < 1.8:
            lines.append(f"{name}: {idle} of {os.cpu_count()} cores idle just before it (other processes compete "
                         "with the two workers)")
    return lines


def idle_cores(seconds: float = 2.0) -> float | None:
    """Cores left idle by every process over `seconds` (/proc/stat; None elsewhere)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1), 2)


def environment() -> dict[str, Any]:
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "nice": os.nice(0), "torch_threads_per_worker": "1 (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1)"}


def markdown_table(runs: list[dict[str, Any]], ups: dict[str, float]) -> str:
    one, two = runs
    lines = ["| stage | shards | 1 worker (s) | 2 workers (s) | shard-seconds 1 / 2 | speed-up | target |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        if stage not in ups:
            continue
        a, b = one["stages"][stage], two["stages"][stage]
        target = TARGETS.get(stage)
        verdict = f">= {target}x: {'met' if ups[stage] >= target else 'NOT met'}" if target else ""
        lines.append(f"| {stage} | {a['shards']} | {a['seconds']:.1f} | {b['seconds']:.1f} | "
                     f"{a['shard_seconds']:.1f} / {b['shard_seconds']:.1f} | {ups[stage]:.2f}x | {verdict} |")
    lines.append(f"| whole job (submit → succeeded) | | {one['job_s']:.1f} | {two['job_s']:.1f} | | "
                 f"{ups['job']:.2f}x | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- paper-scale estimate

CUB_CLASSES = 200
CUB_TRAIN_IMAGES = 5994  # CUB-200-2011's official train split (5794 test)
IPC = 5
GPU_COUNTS = (1, 2, 4, 8)
# gpu_check.sh --classes 10: one ipc index of 10 classes per distill step
STEP_IMAGES_GPU_CHECK = 10
GPU_CHECK = "docs/BENCHMARKS.md, 'GPU check (pretrain / distill / relabel at 224 px, ResNet-18, fp32 vs bf16)'"
COMMITTEE_STEP = ("docs/BENCHMARKS.md, 'GPU check: FADRM+ + FD² with a committee of four', distill_step table, row "
                  "'FADRM+ + FD² committee step (4 members, round robin), 100 classes, 224 px'")
ASSUMPTIONS = (
    f"CUB-200-2011: {CUB_CLASSES} classes, {CUB_TRAIN_IMAGES} train images (official split); the teacher trains on "
    "1 - val_fraction of them; IPC 5 at 224 px; one H200 per worker, bf16 autocast (the default), the H200 figures "
    "of torch 2.11.0+cu130.",
    "Stages run one after another (a distill block needs every teacher, a relabel range the merged set); within a "
    "stage the shards of one kind cost the same, so the stage takes ceil(shards / GPUs) shard times (relabel: the "
    "longest epoch range of fd2_core.shards.epoch_ranges).",
    "Left out (not measured on a GPU): evaluation students, the package and merge shards, dispatch, and each "
    "shard's start-up: every shard opens the run (fd2_core.shards.run_shard -> pipeline.open_run), which decodes "
    "the whole dataset (~11.8k CUB images at 224 px), and loads its teachers.",
    "The pretrain figures come from toy runs (1-2 epochs of a few hundred images, model build, first-call kernel "
    "selection, per-epoch validation and checkpoint included), so they over-state the time of 50 epochs per "
    "image: an upper bound.",
)


@dataclass(frozen=True)
class Measured:
    """One figure measured on the H200 and where it is written."""

    value: float
    unit: str
    source: str


def measured_figures() -> dict[str, Measured]:
    """The H200 figures (bf16 autocast): the GPU check table of docs/BENCHMARKS.md and
    bench/results/fadrm_run_h200.json (read here)."""
    figures = {
        "resnet18_pretrain": Measured(31.3, "img/s", f"{GPU_CHECK}, row bf16, 'pretrain img/s' = 31.3 "
                                      "(10 classes x 24 images, 2 epochs, batch 32, AdamW)"),
        "resnet18_distill": Measured(280.8, "img·it/s", f"{GPU_CHECK}, row bf16, 'distill img·it/s' = 280.8 "
                                     f"({STEP_IMAGES_GPU_CHECK} images per step)"),
        "resnet18_relabel": Measured(3390.0, "img/s", f"{GPU_CHECK}, row bf16, 'relabel img/s' = 3390 (batch 20)"),
        "committee_step": Measured(0.0834, "s/step", f"{COMMITTEE_STEP} = 83.4 ms (bf16)"),
    }
    run = json.loads(FADRM_RUN_JSON.read_text())
    # fadrm_run.py: 16 train images per class (its default), val_fraction 0.1
    train = run["classes"] * 16 * 0.9
    members = len(run["committee"])
    figures["committee_pretrain"] = Measured(
        members * train / run["pretrain_s"], "member·img/s",
        f"{FADRM_RUN_JSON.relative_to(REPO)}, 'pretrain_s' = {run['pretrain_s']:.1f} s for {members} members x "
        f"1 epoch x {train:.0f} images (batch 16)")
    return figures


def plan_counts(preset: str, gpus: int) -> tuple[Any, int, int, list[range]]:
    """(spec, teachers, class blocks, relabel epoch ranges) of CUB-200 at IPC 5 under `preset` with
    `gpus` workers, as `fd2_core.shards.plan_shards` splits them."""
    from fd2_core.shards import epoch_ranges
    from fd2_core.spec_resolution import resolve_spec

    spec = resolve_spec({"preset": preset, "ipc": IPC, "evaluate": False, "max_workers": gpus})
    blocks = math.ceil(CUB_CLASSES / (spec.distill_batch_classes or CUB_CLASSES))
    return spec, len(spec.members), blocks, epoch_ranges(spec.relabel_epochs, gpus)


def stage_work(preset: str, figures: dict[str, Measured]) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Seconds on one GPU of one unit of each stage as (low, high) — a teacher, a class block, a
    relabel epoch — and the lines saying how each was computed."""
    spec, teachers, blocks, _ = plan_counts(preset, 1)
    train = CUB_TRAIN_IMAGES * (1 - spec.val_fraction)
    block_classes = spec.distill_batch_classes or CUB_CLASSES
    epoch_images = CUB_CLASSES * IPC
    relabel = figures["resnet18_relabel"]
    notes = [f"{preset}: {teachers} teacher(s) ({', '.join(m.backbone for m in spec.members)}), "
             f"{spec.pretrain_epochs} pretrain epochs of {train:.0f} images; {blocks} class blocks of {block_classes} "
             f"(distill_batch_classes); relabel {spec.relabel_epochs} epochs of {epoch_images} images "
             f"(batch {spec.relabel_batch_size})"]
    if spec.recipe == "fadrm+":
        steps, step = sum(spec.fadrm_phase_steps), figures["committee_step"]
        block = IPC * steps * step.value
        distill = (block, block)
        notes.append(f"  distill, per block: {IPC} ipc indices x {steps} steps "
                     f"({'+'.join(map(str, spec.fadrm_phase_steps))}) x {step.value * 1000:.1f} ms = {block:.0f} s "
                     f"[{step.source}; measured at the block's {block_classes} classes; the 200 px phases taken at "
                     "the 224 px cost]")
        member = figures["committee_pretrain"]
        pretrain = spec.pretrain_epochs * train * teachers / member.value
        notes.append(f"  pretrain, per teacher: {spec.pretrain_epochs} x {train:.0f} images / ({member.value:.1f} / "
                     f"{teachers}) img/s = {pretrain:.0f} s [{member.source}; the members taken as equally costly]")
        relabel_rate = relabel.value / teachers
        notes.append(f"  relabel: {relabel.value:.0f} / {teachers} = {relabel_rate:.0f} img/s [{relabel.source}; "
                     "ASSUMED: each member costs one ResNet-18 forward, the committee's relabel was not measured]")
    else:
        steps, rate = spec.distill_iterations, figures["resnet18_distill"]
        step_s = STEP_IMAGES_GPU_CHECK / rate.value
        distill = (IPC * steps * step_s, block_classes * IPC * steps / rate.value)
        notes.append(f"  distill, per block: {IPC} ipc indices x {steps} steps of {block_classes} images; measured "
                     f"at {STEP_IMAGES_GPU_CHECK} images per step only ({step_s * 1000:.1f} ms/step): low = that "
                     f"step time at {block_classes} images = {distill[0]:.0f} s, high = that img·it/s at "
                     f"{block_classes} images = {distill[1]:.0f} s [{rate.source}]")
        member = figures["resnet18_pretrain"]
        pretrain = spec.pretrain_epochs * train / member.value
        notes.append(f"  pretrain: {spec.pretrain_epochs} x {train:.0f} images / {member.value} img/s = "
                     f"{pretrain:.0f} s [{member.source}; the published batch {spec.pretrain_batch_size} was not "
                     "measured]")
        relabel_rate = relabel.value
        notes.append(f"  relabel: {relabel_rate:.0f} img/s [{relabel.source}]")
    epoch = epoch_images / relabel_rate
    return {"pretrain": (pretrain, pretrain), "distill": distill, "relabel": (epoch, epoch)}, notes


def estimate(preset: str, figures: dict[str, Measured]) -> dict[str, Any]:
    """Per GPU count: the shards of each stage and the stage's wall time,
    the busiest GPU's share (ASSUMPTIONS)."""
    unit, notes = stage_work(preset, figures)
    rows: dict[int, dict[str, Any]] = {}
    for gpus in GPU_COUNTS:
        _, teachers, blocks, ranges = plan_counts(preset, gpus)
        units = {"pretrain": math.ceil(teachers / gpus), "distill": math.ceil(blocks / gpus),
                 "relabel": max(len(r) for r in ranges)}
        row: dict[str, Any] = {stage: (n * unit[stage][0], n * unit[stage][1]) for stage, n in units.items()}
        row["job"] = (sum(row[s][0] for s in units), sum(row[s][1] for s in units))
        row["shards"] = {"pretrain": teachers, "distill": blocks, "relabel": len(ranges)}
        rows[gpus] = row
    return {"preset": preset, "notes": notes, "rows": rows}


def hours(span: tuple[float, float]) -> str:
    low, high = span
    return f"{low / 3600:.2f} h" if f"{low / 3600:.2f}" == f"{high / 3600:.2f}" else (
        f"{low / 3600:.2f}–{high / 3600:.2f} h")


def ratio(base: tuple[float, float], row: tuple[float, float]) -> str:
    low, high = sorted((base[0] / row[0], base[1] / row[1]))
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}x"


def print_estimates() -> dict[str, Any]:
    """Print the paper-scale estimate (both CUB presets) and return it for the result file."""
    from fd2_core.shards import MIN_RELABEL_EPOCHS

    figures = measured_figures()
    print(f"\nPaper-scale estimate: CUB-200 at IPC {IPC}, 224 px, on {', '.join(map(str, GPU_COUNTS))} H200s.")
    print("\n".join(f"- {line}" for line in ASSUMPTIONS))
    result: dict[str, Any] = {"assumptions": list(ASSUMPTIONS), "figures": {k: asdict(v) for k, v in figures.items()},
                              "presets": {}}
    for preset in ("paper-cub", "paper-cub-fadrm"):
        est = estimate(preset, figures)
        print("\n" + "\n".join(est["notes"]) + "\n")
        print("| GPUs | shards: teachers / blocks / relabel ranges | pretrain | distill | relabel | job | speed-up |")
        print("|---|---|---|---|---|---|---|")
        base = est["rows"][1]["job"]
        for gpus, row in est["rows"].items():
            shards = " / ".join(str(n) for n in row["shards"].values())
            print(f"| {gpus} | {shards} | {hours(row['pretrain'])} | {hours(row['distill'])} | "
                  f"{hours(row['relabel'])} | {hours(row['job'])} | {ratio(base, row['job'])} |")
        result["presets"][preset] = {"notes": est["notes"], "rows": {
            str(g): {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
            for g, row in est["rows"].items()}}
    _, _, blocks, _ = plan_counts("paper-cub", 1)
    print(f"\nReading: distillation is split by class blocks only ({blocks} for CUB-200 at 100 classes per block), so "
          f"past {blocks} GPUs it does not get shorter; pretraining is split by teacher (1 for paper-cub: it never "
          f"gets shorter; 4 for paper-cub-fadrm); relabel ranges of at least {MIN_RELABEL_EPOCHS} epochs split "
          "further but are a small share.")
    return result



# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Config()
    parser.add_argument("--classes", type=int, default=None, help=f"classes (default {default.classes})")
    parser.add_argument("--block", type=int, default=None,
                        help=f"distill_batch_classes: classes per distill shard (default {default.block})")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"distill_iterations per ipc index (default {default.iterations})")
    parser.add_argument("--relabel-epochs", type=int, default=None,
                        help=f"relabel epochs, >= 50 (default {default.relabel_epochs})")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"result file (default {DEFAULT_JSON.relative_to(REPO)}; with --quick "
                        f"{QUICK_JSON.relative_to(REPO)})")
    parser.add_argument("--estimate-only", action="store_true", help="print the paper-scale estimate and stop")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (about 2-3 min)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else default
    args.json = args.json or (QUICK_JSON if args.quick else DEFAULT_JSON)
    overrides = {name: value for name, value in (("classes", args.classes), ("block", args.block),
                                                 ("iterations", args.iterations),
                                                 ("relabel_epochs", args.relabel_epochs)) if value is not None}
    config = Config(**{**asdict(base), **overrides})
    if not args.estimate_only:
        try:
            config.check()
        except ValueError as exc:
            parser.error(str(exc))
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    if args.estimate_only:
        print_estimates()
        return 0
    python = Path(sys.executable)
    command = shlex.join([str(python.relative_to(REPO)) if python.is_relative_to(REPO) else str(python), *sys.argv])
    print(f"spec: {json.dumps(config.spec())}; {config.classes} classes x {config.train_per_class} train images",
          flush=True)
    root = Path(tempfile.mkdtemp(prefix="fd2-shard-scaling-"))
    runs: list[dict[str, Any]] = []
    try:
        for workers in (1, 2):
            started = time.monotonic()
            runs.append(run_once(config, workers, root))
            stages = ", ".join(f"{s} {v['seconds']:.1f} s" for s, v in runs[-1]["stages"].items())
            print(f"{workers} worker(s): job {runs[-1]['job_s']:.1f} s ({stages}); run with start-up "
                  f"{time.monotonic() - started:.0f} s; shards ran on {len(runs[-1]['shard_workers'])} worker(s), "
                  f"{runs[-1]['warmup']['warm_workers']} warmed up by {len(runs[-1]['warmup']['jobs'])} job(s); "
                  f"torch threads in the worker: {runs[-1]['torch_threads_in_worker']}", flush=True)
    finally:
        if args.keep:
            print(f"homes and logs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    ups = speedups(*runs)
    print()
    if args.quick:
        print("(--quick: a smoke configuration, shards of 1-3 s: its speed-ups are not the measurement)")
    print(markdown_table(runs, ups))
    met = {stage: ups.get(stage, 0.0) >= target for stage, target in TARGETS.items()}
    print("\n" + "; ".join(f"{stage} speed-up {ups.get(stage, 0.0):.2f}x, target >= {target}x: "
                           f"{'met' if met[stage] else 'NOT met'}" for stage, target in TARGETS.items()))
    warnings = run_warnings(runs)
    for line in warnings:
        print(f"warning: {line}")
    estimates = print_estimates()
    result = {
        "format": "fd2.shard_scaling.v1", "command": command, "environment": environment(),
        "config": asdict(config), "spec": config.spec(), "runs": runs, "speedups": ups,
        "targets": {stage: {"target": target, "met": met[stage]} for stage, target in TARGETS.items()},
        "warnings": warnings,
        "paper_estimate": estimates,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
