"""A real S3-API server for tests: moto's standalone server as a child process on a free local port.

One per test session (`s3_session`), started like the private Redis and PostgreSQL servers: nothing
in the tests patches the client; every call crosses a socket to a real HTTP server that speaks the
S3 protocol. `s3_unavailable()` says why it cannot start here (the tests skip with that reason).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service_harness import free_port

START_TIMEOUT_S = 60.0
# moto accepts any credentials; real ones never reach the tests
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_unavailable() -> str | None:
    """None when a moto server can be started, else why not."""
    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        return "moto_server is not installed (pip install 'moto[server]', a dev dependency)"
    return None


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """What a service process needs to reach this server through the standard chain."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[S3Server]:
    """A moto server on a free port for the block; its log in `log_dir`."""
    import httpx

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    binary = str(Path(sys.executable).parent / "moto_server")
    with (log_dir / "moto.log").open("ab") as log:
        process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **CREDENTIALS})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port}: see {log_dir / 'moto.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500:
                    break
            time.sleep(0.1)
        yield S3Server(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
