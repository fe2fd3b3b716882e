"""Large transfers against a real uvicorn process: upload memory and artifact download speed.

1. Upload: builds a dataset zip of about `--upload-mib` MiB on disk (a few small PNGs in
   `train/<class>/` plus one incompressible, stored `train/a/padding.bin` that intake skips and
   reports), POSTs it to `/v1/datasets` as a streamed multipart body, and samples the server's
   resident memory every 50 ms before, during and after (peak from the kernel's high-water mark
   too). The body is meant to stream to disk: growth should stay far below the upload size (target:
   under 64 MiB).
2. Download: registers an `--artifact-mib` MiB artifact of random bytes for a finished job, reads it
   once with `dd` (so the page cache is warm) and times a second `dd` read as the disk figure, then
   downloads it with a streaming client that discards the bytes, `--downloads` times (plus
   `--curl-runs` with curl when present), and checks one Range request (206, exact bytes).

The server runs `uvicorn api.main:app` (one process) with FD2_HOME in a temporary folder and
embedded SQLite. Everything is written under the system temporary folder and removed at the end.
MB/s means 10^6 bytes/s.

    python bench/api_transfer.py                                  # 1 GiB upload, 1 GiB artifact
    python bench/api_transfer.py --upload-mib 256 --artifact-mib 0  # upload only
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from bench.api_load import free_port, group_cpu_seconds, start_server, stop_server  # noqa: E402
from fd2_config.queues import GPU_QUEUE  # noqa: E402
from fd2_config.settings import Settings  # noqa: E402
from store.artifacts import register_artifact  # noqa: E402
from store.db import dispose_engines, migrate, session_scope  # noqa: E402
from store.job_states import finish_job, mark_running  # noqa: E402
from store.jobs import create_job  # noqa: E402
from store.keys import authenticate, create_tenant_key  # noqa: E402

MIB = 1024 * 1024
CHUNK = MIB
SAMPLE_S = 0.05
GROWTH_TARGET_MIB = 64
ARTIFACT_NAME = "soft_labels.safetensors"


# --- memory of the server process -----------------------------------------------------------------

def proc_status_kib(pid: int, key: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status in KiB (None when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        kib = proc_status_kib(pid, "VmRSS")
        return None if kib is None else kib * 1024
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def reset_peak(pid: int) -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of `pid`;
    False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` seconds into (monotonic time, bytes) pairs."""

    def __init__(self, pid: int, interval: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = rss_bytes(self.pid)
            if value is not None:
                self.samples.append((time.monotonic(), value))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def between(self, start: float, end: float) -> list[int]:
        return [value for moment, value in self.samples if start <= moment <= end]


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


# --- the upload -----------------------------------------------------------------------------------

def png_bytes(shade: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade % 256, (shade * 7) % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def build_dataset_zip(path: Path, padding_mib: int, classes: int = 2, per_class: int = 4) -> int:
    """A valid dataset zip: small PNGs under train/<class>/ and one stored, random
    `train/a/padding.bin`."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for index in range(classes):
            for image in range(per_class):
                archive.writestr(f"train/{chr(ord('a') + index)}/{image}.png", png_bytes(index * 40 + image))
        if padding_mib:
            with archive.open("train/a/padding.bin", "w", force_zip64=True) as member:
                for _ in range(padding_mib):
                    member.write(os.urandom(CHUNK))
    return path.stat().st_size


@dataclass
class StreamedBody:
    """A multipart/form-data body whose file part is read from disk in 1 MiB chunks,
    with a known length."""

    path: Path
    filename: str
    name: str
    boundary: str = field(default_factory=lambda: "fd2bench" + secrets.token_hex(12))
    finished_at: float | None = None

    def _head(self) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{self.name}\r\n"
                f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{self.filename}\"\r\nContent-Type: application/zip\r\n\r\n").encode()

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def length(self) -> int:
        return len(self._head()) + self.path.stat().st_size + len(self._tail())

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}", "Content-Length": str(self.length)}

    def __iter__(self) -> Iterator[bytes]:
        yield self._head()
        with open(self.path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk
        yield self._tail()
        self.finished_at = time.monotonic()


@dataclass
class UploadResult:
    status: int
    size: int
    baseline: int
    peak_send: int
    peak_process: int
    peak_hwm: int | None
    after: int
    send_s: float
    total_s: float
    send_cpu_s: float
    total_cpu_s: float
    dataset_status: str
    skipped: list[str]


def post_dataset(client: httpx.Client, base: str, key: str, body: StreamedBody,
                 chunks: Iterator[bytes] | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **body.headers}
    return client.post(f"{base}/v1/datasets", content=chunks or iter(body), headers=headers)


def upload_check(client: httpx.Client, base: str, key: str, pid: int, work: Path, upload_mib: int) -> UploadResult:
    # A small upload first, so the code paths' imports and caches are in place before the baseline.
    small = work / "warmup.zip"
    build_dataset_zip(small, 0)
    response = post_dataset(client, base, key, StreamedBody(small, "warmup.zip", "warmup"))
    small.unlink()
    if response.status_code != 201:
        raise RuntimeError(f"warm-up upload answered {response.status_code}: {response.text[:500]}")

    archive = work / "upload.zip"
    started = time.perf_counter()
    size = build_dataset_zip(archive, upload_mib)
    print(f"built {archive.name}: {mib(size)} MiB in {time.perf_counter() - started:.1f} s")
    body = StreamedBody(archive, "upload.zip", "transfer-bench")

    sampler = RssSampler(pid)
    sampler.start()
    time.sleep(1.0)
    hwm_reset = reset_peak(pid)
    cpu = [group_cpu_seconds(pid)]

    def chunks() -> Iterator[bytes]:
        yield from body
        cpu.append(group_cpu_seconds(pid))

    begin = time.monotonic()
    try:
        response = post_dataset(client, base, key, body, chunks())
    finally:
        done = time.monotonic()
        cpu.append(group_cpu_seconds(pid))
        hwm = proc_status_kib(pid, "VmHWM") if hwm_reset else None
        time.sleep(1.0)
        sampler.stop()
        archive.unlink(missing_ok=True)
    sent = body.finished_at or done
    baseline_samples = sampler.between(0.0, begin)
    send_samples = sampler.between(begin, sent) or [0]
    process_samples = sampler.between(sent, done) or [0]
    after_samples = sampler.between(done, float("inf")) or [0]
    payload = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    errors = payload.get("errors") or []
    skipped = [f"{e.get('path')}: {e.get('reason')}" if isinstance(e, dict) else str(e) for e in errors]
    return UploadResult(
        status=response.status_code, size=size, baseline=max(baseline_samples), peak_send=max(send_samples),
        peak_process=max(process_samples), peak_hwm=None if hwm is None else hwm * 1024, after=after_samples[-1],
        send_s=sent - begin, total_s=done - begin, send_cpu_s=cpu[1] - cpu[0], total_cpu_s=cpu[-1] - cpu[0],
        dataset_status=str(payload.get("status") or payload.get("error", {}).get("code")), skipped=skipped,
    )


def print_upload(result: UploadResult) -> None:
    peak = max(result.peak_send, result.peak_process, result.peak_hwm or 0)
    growth = peak - result.baseline
    verdict = "ok" if growth < GROWTH_TARGET_MIB * MIB else "OVER TARGET"
    print(f"\nupload of {mib(result.size)} MiB -> HTTP {result.status} (dataset status {result.dataset_status})")
    rows = [
        ("baseline RSS (MiB)", mib(result.baseline)),
        ("peak RSS while receiving (MiB)", mib(result.peak_send)),
        ("peak RSS while extracting/validating (MiB)", mib(result.peak_process)),
        ("peak RSS, kernel high-water mark (MiB)", "n/a" if result.peak_hwm is None else mib(result.peak_hwm)),
        ("RSS 1 s after the answer (MiB)", mib(result.after)),
        ("growth, peak - baseline (MiB)", f"{mib(growth)}  [{verdict}: target < {GROWTH_TARGET_MIB} MiB]"),
        ("body sent in (s)", f"{result.send_s:.2f}  ({result.size / 1e6 / max(result.send_s, 1e-9):.0f} MB/s, "
                             f"server cpu {result.send_cpu_s:.2f} s)"),
        ("answer after (s)", f"{result.total_s:.2f}  ({result.size / 1e6 / max(result.total_s, 1e-9):.0f} MB/s, "
                             f"server cpu {result.total_cpu_s:.2f} s)"),
    ]
    for label, value in rows:
        print(f"  {label:<44} {value}")
    for line in result.skipped[:5]:
        print(f"  reported: {line}")


# --- the download ---------------------------------------------------------------------------------

def write_random_file(path: Path, size_mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(CHUNK))


def seed(settings: Settings, artifact: Path | None) -> tuple[str, str | None]:
    """A tenant key and, when `artifact` is given, a succeeded job with it registered;
    returns (key, job id)."""
    migrate(settings)
    job_id = None
    with session_scope(settings) as session:
        key = create_tenant_key(session, f"bench-{time.time_ns()}")
        tenant = authenticate(session, key)
        assert tenant is not None
        if artifact is not None:
            job = create_job(session, tenant_id=tenant.id, spec={"ipc": 1}, queue=GPU_QUEUE)
            job_id = job.id
            mark_running(session, job_id, "bench")
            register_artifact(session, job_id, ARTIFACT_NAME, artifact)
            finish_job(session, job_id, "succeeded", metrics={})
    dispose_engines()
    return key, job_id


def dd_read(path: Path) -> float:
    """Seconds `dd` takes to read the file to /dev/null in 1 MiB blocks."""
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    return time.perf_counter() - started


def httpx_download(client: httpx.Client, url: str, key: str) -> tuple[int, int, float]:
    """(status, bytes, seconds) of a streamed GET whose body is discarded."""
    received = 0
    started = time.perf_counter()
    with client.stream("GET", url, headers={"Authorization": f"Bearer {key}"}) as response:
        for chunk in response.iter_raw(CHUNK):
            received += len(chunk)
    return response.status_code, received, time.perf_counter() - started


def curl_download(url: str, key: str) -> tuple[int, int, float]:
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-H", f"Authorization: Bearer {key}", "-w", "%{http_code} %{size_download}",
         url], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    status, size = done.stdout.split()
    return int(status), int(size), seconds


def range_check(client: httpx.Client, url: str, key: str, path: Path, size: int) -> str:
    start = size // 3
    end = min(size - 1, start + MIB - 1)
    response = client.get(url, headers={"Authorization": f"Bearer {key}", "Range": f"bytes={start}-{end}"})
    with open(path, "rb") as handle:
        handle.seek(start)
        expected = handle.read(end - start + 1)
    content_range = response.headers.get("content-range")
    good = (response.status_code == 206 and response.content == expected
            and content_range == f"bytes {start}-{end}/{size}")
    verdict = "ok" if good else "FAILED"
    return f"{verdict}: HTTP {response.status_code}, Content-Range {content_range}, {len(response.content)} bytes"


def download_check(client: httpx.Client, base: str, key: str, job_id: str, path: Path, pid: int,
                   downloads: int, curl_runs: int) -> None:
    size = path.stat().st_size
    url = f"{base}/v1/jobs/{job_id}/artifacts/{ARTIFACT_NAME}"
    # warms the page cache; the timed read below is served from memory, as the downloads are
    dd_read(path)
    disk_s = dd_read(path)
    print(f"\ndownload of a {mib(size)} MiB artifact (page cache warm: the file was read once before timing)")
    print(f"  {'reader':<24} {'status':>6} {'MiB':>8} {'seconds':>8} {'MB/s':>7} {'server cpu s':>13}")
    print(f"  {'dd bs=1M (disk)':<24} {'-':>6} {mib(size):>8} {disk_s:>8.2f} {size / 1e6 / disk_s:>7.0f} {'-':>13}")
    sampler = RssSampler(pid)
    sampler.start()
    time.sleep(0.3)
    baseline = max((value for _, value in sampler.samples), default=0)
    runs: list[tuple[str, object]] = [(f"httpx stream #{i + 1}", "httpx") for i in range(downloads)]
    if curl_runs and shutil.which("curl"):
        runs += [(f"curl -o /dev/null #{i + 1}", "curl") for i in range(curl_runs)]
    try:
        for label, kind in runs:
            cpu_before = group_cpu_seconds(pid)
            if kind == "httpx":
                status, received, seconds = httpx_download(client, url, key)
            else:
                status, received, seconds = curl_download(url, key)
            cpu = group_cpu_seconds(pid) - cpu_before
            flag = "" if received == size else "  (short!)"
            print(f"  {label:<24} {status:>6} {mib(received):>8} {seconds:>8.2f} {received / 1e6 / seconds:>7.0f} "
                  f"{cpu:>13.2f}{flag}")
    finally:
        sampler.stop()
    peak = max((value for _, value in sampler.samples), default=0)
    print(f"  server RSS: {mib(baseline)} MiB before, peak {mib(peak)} MiB while downloading")
    print(f"  range request: {range_check(client, url, key, path, size)}")


# --- main -----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-mib", type=int, default=1024, help="padding size of the upload (0 = skip)")
    parser.add_argument("--artifact-mib", type=int, default=1024, help="artifact size (0 = skip the downloads)")
    parser.add_argument("--downloads", type=int, default=3, help="streamed downloads with httpx")
    parser.add_argument("--curl-runs", type=int, default=1, help="extra downloads with curl, when installed")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fd2-transfer-"))
    home = work / "home"
    server = None
    try:
        settings = Settings(home=home, database_url="")
        settings.ensure_dirs()
        artifact = None
        if args.artifact_mib > 0:
            artifact = home / "artifacts" / "bench" / ARTIFACT_NAME
            started = time.perf_counter()
            write_random_file(artifact, args.artifact_mib)
            print(f"wrote the artifact ({args.artifact_mib} MiB) in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        key, job_id = seed(settings, artifact)
        print(f"seeded the database in {time.perf_counter() - started:.1f} s (artifact hashed on registration)")

        os.environ["FD2_MAX_UPLOAD_BYTES"] = str((args.upload_mib + 64) * MIB)
        port = free_port()
        server = start_server(settings, port, workers=1)
        base = f"http://127.0.0.1:{port}"
        print(f"uvicorn pid {server.pid} (1 process) on port {port}; cpus={os.cpu_count()} "
              f"load average {os.getloadavg()[0]:.2f}")
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            if args.upload_mib > 0:
                print_upload(upload_check(client, base, key, server.pid, work, args.upload_mib))
            if artifact is not None and job_id is not None:
                download_check(client, base, key, job_id, artifact, server.pid, args.downloads, args.curl_runs)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
