"""Mixed load against the embedded service: many clients doing everything a client does, at once.

Starts `fd2 serve` (API + one worker, SQLite and the folder broker) in a temporary home, prepares one dataset
and one finished job per tenant, then runs C concurrent clients (default 64, one API key each, spread over
T tenants) for D seconds (default 60). Each client loops without pause over a weighted mix of requests:

    poll      GET  /v1/jobs/{id}                   a job of its tenant (the finished one or one it submitted)
    list      GET  /v1/jobs?limit=20 or /v1/datasets
    events    GET  /v1/jobs/{id}/events
    download  GET  /v1/jobs/{id}/artifacts/{name}  whole small files, or the first KiB by Range
    upload    POST /v1/datasets                    a small zip (4 classes x 8 images, 32 px, 75 KB)
    submit    POST /v1/jobs                        a tiny CPU job (the worker runs them during the load)

A 429 with `Retry-After` is counted apart (the client waits as told, at most 5 s) and is not an error; an
error is a transport failure, a 5xx, a 429 without `Retry-After`, or any other unexpected status. Prints
requests, statuses and latency percentiles per kind and overall, and the exit code is 1 when there was any
error. Everything is written under the system temporary folder and removed at the end.

    python bench/mixed_load.py                                # 64 clients, 4 tenants, 60 s
    python bench/mixed_load.py --clients 16 --duration 20 --json bench/results/mixed_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.api_load import free_port, percentile, process_table  # noqa: E402
from fd2_config.settings import Settings  # noqa: E402
from store.db import dispose_engines, migrate, session_scope  # noqa: E402
from store.keys import create_tenant_key  # noqa: E402

# A job that finishes in seconds on a CPU and still produces every artifact.
TINY_SPEC = {
    "preset": "cpu-small", "ipc": 1, "device": "cpu", "model_width": 16, "num_attention_maps": 4,
    "pretrain_epochs": 1, "pretrain_batch_size": 16, "val_fraction": 0.25, "distill_iterations": 3,
    "patch_candidates": 2, "relabel_epochs": 1, "relabel_batch_size": 4, "evaluate": False,
    "eval_random_baseline": False,
}
WEIGHTS = {"poll": 35, "list": 12, "events": 18, "download": 15, "upload": 8, "submit": 12}
EXPECTED = {"poll": {200}, "list": {200}, "events": {200}, "download": {200, 206}, "upload": {201},
            "submit": {202}}
SMALL_ARTIFACTS = ("report.json", "preview.png")
MAX_RETRY_AFTER_S = 5.0
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Tenant:
    name: str
    keys: list[str]
    dataset_id: str = ""
    job_id: str = ""
    artifacts: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """What the clients saw, per kind of request."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    errors: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    throttled: Counter = field(default_factory=Counter)  # 429 with Retry-After
    server_errors: Counter = field(default_factory=Counter)  # 5xx
    samples: list[str] = field(default_factory=list)  # the first few error descriptions

    def error(self, kind: str, what: str) -> None:
        self.errors[kind][what] += 1
        if len(self.samples) < 20:
            self.samples.append(f"{kind}: {what}")


# ---------------------------------------------------------------- the service


def start_service(home: Path, port: int, log_path: Path) -> subprocess.Popen:
    """`fd2 serve` in its own process group, output to `log_path`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FD2_")}
    env.update({"FD2_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    command = [sys.executable, "-m", "fd2_cli", "serve", "--home", str(home), "--port", str(port)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants.

    `fd2 serve` starts the API and the worker in sessions of their own, so a process group would miss them.
    """
    table = process_table()
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _, _) in table.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(table[member][2] for member in tree if member in table)


def stop_service(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def make_keys(home: Path, tenants: int, clients: int) -> list[Tenant]:
    """Tenants with one key per client (clients are dealt round-robin), created before the service starts."""
    settings = Settings(home=home)
    migrate(settings)
    result = [Tenant(f"load-{index}", []) for index in range(tenants)]
    with session_scope(settings) as session:
        for index in range(clients):
            tenant = result[index % tenants]
            tenant.keys.append(create_tenant_key(session, tenant.name))
    dispose_engines()
    return result


def small_zip(folder: Path) -> bytes:
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=4, image_size=32, train_per_class=6, test_per_class=2, seed=7)
    return fgsynth.write_zip(data, folder / "small.zip").read_bytes()


async def wait_ready(client: httpx.AsyncClient, service: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError("the service exited during start-up; see its log")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the service did not become ready")


async def prepare(client: httpx.AsyncClient, tenants: list[Tenant], archive: bytes, timeout_s: float) -> None:
    """One dataset and one finished job per tenant (the jobs run one after another on the worker)."""
    for tenant in tenants:
        headers = {"Authorization": f"Bearer {tenant.keys[0]}"}
        response = await client.post("/v1/datasets", headers=headers, files={"file": ("seed.zip", archive)})
        response.raise_for_status()
        tenant.dataset_id = response.json()["id"]
        body = {"dataset": {"id": tenant.dataset_id}, "spec": TINY_SPEC}
        response = await client.post("/v1/jobs", headers=headers, json=body)
        response.raise_for_status()
        tenant.job_id = response.json()["id"]
    deadline = time.monotonic() + timeout_s
    for tenant in tenants:
        headers = {"Authorization": f"Bearer {tenant.keys[0]}"}
        while True:
            job = (await client.get(f"/v1/jobs/{tenant.job_id}", headers=headers)).json()
            if job["status"] == "succeeded":
                tenant.artifacts = [artifact["name"] for artifact in job["artifacts"]]
                break
            if job["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"seed job {tenant.job_id} is {job['status']}: {job.get('error')}")
            await asyncio.sleep(1.0)


# ---------------------------------------------------------------- the clients


def build_request(kind: str, tenant: Tenant, own_jobs: list[str], archive: bytes, rng: random.Random
                  ) -> tuple[str, str, dict[str, Any]]:
    if kind == "poll":
        return "GET", f"/v1/jobs/{rng.choice([tenant.job_id, *own_jobs[-5:]])}", {}
    if kind == "list":
        return "GET", rng.choice(["/v1/jobs", "/v1/datasets"]), {"params": {"limit": 20}}
    if kind == "events":
        return "GET", f"/v1/jobs/{tenant.job_id}/events", {}
    if kind == "download":
        name = rng.choice(tenant.artifacts)
        whole = name in SMALL_ARTIFACTS and rng.random() < 0.5
        headers = {} if whole else {"Range": "bytes=0-1023"}
        return "GET", f"/v1/jobs/{tenant.job_id}/artifacts/{name}", {"headers": headers}
    if kind == "upload":
        return "POST", "/v1/datasets", {"files": {"file": ("small.zip", archive, "application/zip")},
                                        "data": {"name": "load"}}
    assert kind == "submit"
    return "POST", "/v1/jobs", {"json": {"dataset": {"id": tenant.dataset_id}, "spec": TINY_SPEC}}


async def one_client(client: httpx.AsyncClient, tenant: Tenant, key: str, archive: bytes, stop_at: float,
                     tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*WEIGHTS.items(), strict=True)
    auth = {"Authorization": f"Bearer {key}"}
    own_jobs: list[str] = []
    while time.perf_counter() < stop_at:
        kind = rng.choices(kinds, weights)[0]
        method, path, options = build_request(kind, tenant, own_jobs, archive, rng)
        options["headers"] = {**auth, **options.get("headers", {})}
        started = time.perf_counter()
        try:
            response = await client.request(method, path, **options)
        except httpx.HTTPError as exc:
            tally.error(kind, f"{type(exc).__name__}: {exc}"[:200])
            continue
        tally.latencies[kind].append(time.perf_counter() - started)
        status = response.status_code
        tally.statuses[kind][status] += 1
        if status == 429 and response.headers.get("retry-after", "").isdigit():
            tally.throttled[kind] += 1
            wait_s = min(MAX_RETRY_AFTER_S, float(response.headers["retry-after"]), stop_at - time.perf_counter())
            await asyncio.sleep(max(0.0, wait_s))
            continue
        if status >= 500:
            tally.server_errors[kind] += 1
        if status not in EXPECTED[kind]:
            tally.error(kind, f"HTTP {status}: {response.text[:150]}")
        elif kind == "submit":
            own_jobs.append(response.json()["id"])


async def run_load(base_url: str, tenants: list[Tenant], archive: bytes, duration_s: float, seed: int,
                   service: subprocess.Popen, prepare_timeout_s: float) -> tuple[Tally, float, float]:
    clients = sum(len(tenant.keys) for tenant in tenants)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        await wait_ready(client, service)
        started = time.perf_counter()
        await prepare(client, tenants, archive, prepare_timeout_s)
        print(f"prepared {len(tenants)} datasets and finished jobs in {time.perf_counter() - started:.0f} s",
              flush=True)
        tally = Tally()
        cpu_before = tree_cpu_seconds(service.pid)
        stop_at = time.perf_counter() + duration_s
        await asyncio.gather(*(
            one_client(client, tenant, key, archive, stop_at, tally, seed * 1000 + index)
            for index, (tenant, key) in enumerate((t, k) for t in tenants for k in t.keys)
        ))
        elapsed = duration_s + max(0.0, time.perf_counter() - stop_at)
        return tally, elapsed, tree_cpu_seconds(service.pid) - cpu_before


# ---------------------------------------------------------------- report


def summary(tally: Tally, elapsed: float) -> dict[str, Any]:
    rows = {}
    every: list[float] = []
    for kind in WEIGHTS:
        latencies = sorted(tally.latencies[kind])
        every.extend(latencies)
        rows[kind] = _row(latencies, tally.statuses[kind], sum(tally.errors[kind].values()),
                          tally.server_errors[kind], tally.throttled[kind], elapsed)
    total_statuses: Counter = Counter()
    for counts in tally.statuses.values():
        total_statuses.update(counts)
    rows["all"] = _row(sorted(every), total_statuses, sum(sum(c.values()) for c in tally.errors.values()),
                       sum(tally.server_errors.values()), sum(tally.throttled.values()), elapsed)
    return rows


def _row(latencies: list[float], statuses: Counter, errors: int, server_errors: int, throttled: int,
         elapsed: float) -> dict[str, Any]:
    ms = (lambda q: round(percentile(latencies, q) * 1000, 1)) if latencies else (lambda q: None)
    return {
        "requests": len(latencies), "per_s": round(len(latencies) / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors": errors, "5xx": server_errors,
        "429_retry_after": throttled, "p50_ms": ms(0.50), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
    }


def print_table(rows: dict[str, Any]) -> None:
    print("| kind | requests | req/s | statuses | errors | 5xx | 429 + Retry-After | p50 | p95 | p99 | max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        statuses = ", ".join(f"{count:,} × {status}" for status, count in row["statuses"].items())
        print(f"| {kind} | {row['requests']:,} | {row['per_s']} | {statuses} | {row['errors']} | {row['5xx']} | "
              f"{row['429_retry_after']} | {row['p50_ms']} ms | {row['p95_ms']} ms | {row['p99_ms']} ms | "
              f"{row['max_ms']} ms |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, one API key each")
    parser.add_argument("--tenants", type=int, default=4, help="tenants the clients are spread over")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepare-timeout", type=float, default=600.0, help="seconds for the seed jobs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.clients < 1 or not 1 <= args.tenants <= args.clients or args.duration <= 0:
        parser.error("need --clients >= --tenants >= 1 and --duration > 0")

    root = Path(tempfile.mkdtemp(prefix="fd2-mixed-"))
    service = None
    try:
        home = root / "home"
        tenants = make_keys(home, args.tenants, args.clients)
        archive = small_zip(root)
        port = free_port()
        log_path = root / "service.log"
        service = start_service(home, port, log_path)
        load_before = os.getloadavg()[0]
        tally, elapsed, server_cpu = asyncio.run(run_load(
            f"http://127.0.0.1:{port}", tenants, archive, args.duration, args.seed, service,
            args.prepare_timeout))
        rows = summary(tally, elapsed)
        stop_service(service)
        log_text = log_path.read_text(errors="replace")
        server_500s = log_text.count(" 500 Internal Server Error")
        print(f"clients={args.clients} tenants={args.tenants} duration={elapsed:.0f} s cpus={os.cpu_count()} "
              f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
              f"service cpu={server_cpu:.0f} s (API + worker)")
        print_table(rows)
        total = rows["all"]
        print(f"errors={total['errors']} 5xx={total['5xx']} 429-with-Retry-After={total['429_retry_after']} "
              f"(500s in the service log: {server_500s})")
        for sample in tally.samples:
            print("  error:", sample)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "clients": args.clients, "tenants": args.tenants, "duration_s": round(elapsed, 1),
                "cpus": os.cpu_count(), "load_average_before": load_before, "service_cpu_s": round(server_cpu, 1),
                "kinds": rows, "error_samples": tally.samples,
            }, indent=1) + "\n")
        return 1 if total["errors"] or total["5xx"] or server_500s else 0
    finally:
        stop_service(service)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
