"""Load test of job polling: `GET /v1/jobs/{id}` against a real uvicorn process.

Seeds N jobs (default 10,000; a quarter finished with five artifacts each)
into a fresh database, starts `uvicorn api.main:app`, and keeps C concurrent
keep-alive connections (default 64) busy for D seconds with random job ids.
Prints requests per second and latency percentiles.

The load generator speaks HTTP/1.1 over raw asyncio streams: a full client library costs more CPU
per request than the server under test, and on a small machine both share the same cores.

    python bench/api_load.py                      # SQLite in a temporary home, 1 uvicorn worker
    python bench/api_load.py --workers 2
    python bench/api_load.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402

from fd2_config.settings import Settings  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from store.db import dispose_engines, migrate, session_scope  # noqa: E402
from store.keys import authenticate, create_tenant_key  # noqa: E402
from store.models import Artifact, Job, new_id, utcnow  # noqa: E402

ARTIFACT_NAMES = ("distilled.tar.gz", "soft_labels.safetensors", "teacher.safetensors", "report.json",
                  "preview.png")


def seed(settings: Settings, count: int) -> tuple[str, list[str]]:
    """Create a tenant key and `count` jobs; returns the key and the job ids."""
    migrate(settings)
    with session_scope(settings) as session:
        key = create_tenant_key(session, f"bench-{time.time_ns()}")
        tenant = authenticate(session, key)
        assert tenant is not None
        tenant_id = tenant.id
    spec = resolve_spec({"ipc": 10}).model_dump(mode="json")
    start = utcnow() - timedelta(hours=1)
    ids: list[str] = []
    batch = 2000
    for offset in range(0, count, batch):
        jobs, artifacts = [], []
        for index in range(offset, min(count, offset + batch)):
            job_id = new_id("job")
            ids.append(job_id)
            finished = index % 4 == 0
            jobs.append({
                "id": job_id, "tenant_id": tenant_id, "status": "succeeded" if finished else "queued",
                "stage": "package" if finished else None, "progress": 1.0 if finished else 0.0,
                "stage_progress": 1.0 if finished else 0.0, "spec": spec, "queue": "fd2.gpu",
                "metrics": {"teacher_accuracy": 0.8, "student_accuracy": 0.5} if finished else {},
                "cancel_requested": False, "attempts": 1 if finished else 0,
                "created_at": start + timedelta(milliseconds=index),
            })
            if finished:
                artifacts.extend({
                    "job_id": job_id, "name": name, "path": f"/nonexistent/{job_id}/{name}", "size": 1234,
                    "sha256": "0" * 64, "media_type": "application/octet-stream", "created_at": start,
                } for name in ARTIFACT_NAMES)
        with session_scope(settings) as session:
            session.execute(insert(Job), jobs)
            if artifacts:
                session.execute(insert(Artifact), artifacts)
    dispose_engines()
    return key, ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_server(server: subprocess.Popen | None) -> None:
    """Terminate the uvicorn process group started by `start_server` (no-op
    when it never started)."""
    if server is not None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def start_server(settings: Settings, port: int, workers: int) -> subprocess.Popen:
    # one key drives all clients: the per-key rate limit is switched off so
    # polling, not 429s, is measured
    env = {**os.environ, "FD2_HOME": str(settings.home), "FD2_DATABASE_URL": settings.database_url,
           "FD2_RATE_LIMIT_PER_MINUTE": "0", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("uvicorn did not start")


async def one_connection(port: int, key: str, ids: list[str], warm_until: float, stop_at: float,
                         latencies: list[float], statuses: Counter) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n".encode()
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            request = b"GET /v1/jobs/" + random.choice(ids).encode() + b" HTTP/1.1\r\nHost: bench\r\n" + auth + b"\r\n"
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if now >= warm_until:
                latencies.append(time.perf_counter() - now)
                statuses[int(status_line.split()[1])] += 1
    finally:
        writer.close()


async def hammer(port: int, key: str, ids: list[str], concurrency: int, duration: float,
                 warmup: float) -> tuple[list[float], Counter, float]:
    latencies: list[float] = []
    statuses: Counter = Counter()
    begin = time.perf_counter()
    warm_until = begin + warmup
    stop_at = warm_until + duration
    await asyncio.gather(*(one_connection(port, key, ids, warm_until, stop_at, latencies, statuses)
                           for _ in range(concurrency)))
    return latencies, statuses, duration


def process_table() -> dict[int, tuple[int, int, float]]:
    """`{pid: (ppid, process group, CPU seconds user + system)}` of every
    process, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state ppid pgrp ... utime(11) stime(12)
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / ticks)
    return table


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of every process in a process group."""
    return sum(cpu for _, group, cpu in process_table().values() if group == pgid)


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--database-url", default="", help="default: SQLite in the temporary home")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="fd2-bench-"))
    server = None
    try:
        settings = Settings(home=home, database_url=args.database_url)
        started = time.perf_counter()
        key, ids = seed(settings, args.jobs)
        backend = settings.database_url.split(":")[0]
        print(f"seeded {len(ids)} jobs in {time.perf_counter() - started:.1f} s ({backend})")
        port = free_port()
        server = start_server(settings, port, args.workers)
        cpu_before = group_cpu_seconds(server.pid)
        latencies, statuses, duration = asyncio.run(
            hammer(port, key, ids, args.concurrency, args.duration, args.warmup))
        server_cpu = group_cpu_seconds(server.pid) - cpu_before
        latencies.sort()
        print(f"uvicorn workers={args.workers} clients={args.concurrency} duration={duration:.0f} s "
              f"cpus={os.cpu_count()}")
        print(f"requests={len(latencies)} statuses={dict(statuses)}")
        print(f"throughput={len(latencies) / duration:.0f} req/s  "
              f"p50={percentile(latencies, 0.50) * 1000:.1f} ms  p99={percentile(latencies, 0.99) * 1000:.1f} ms  "
              f"mean={statistics.fmean(latencies) * 1000:.1f} ms")
        # Includes the warm-up requests, so it slightly overstates the cost per measured request.
        per_request = server_cpu / max(1, len(latencies)) * 1e6
        print(f"server cpu={server_cpu:.1f} s ({per_request:.0f} us per request; "
              f"load average now {os.getloadavg()[0]:.1f})")
    finally:
        stop_server(server)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
