"""`fd2 serve`: the whole service on one machine as two child processes (API server and one worker).

Both children get the same `FD2_HOME` and so the same embedded database and broker. SIGINT/SIGTERM are
forwarded to both; the worker then stops its running job at a checkpoint and requeues it, so the next
`fd2 serve` resumes it. Children die with this process (Linux parent-death signal) even if it is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


def api_command(host: str, port: int) -> list[str]:
    """uvicorn serving `api.main:app` (named by string: the supervising process never loads the API)."""
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port)]


def worker_command(queues: Sequence[str], concurrency: int = 1) -> list[str]:
    """`fd2 worker` in a child process (same interpreter, so the same virtual environment)."""
    options = ["--queues", ",".join(queues), "--concurrency", str(concurrency)]
    return [sys.executable, "-m", "fd2_cli", "worker", *options]


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when `fd2 serve` dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_child(name: str, command: list[str], env: dict[str, str]) -> Child:
    """Start a child in its own process group, so a terminal's Ctrl-C reaches it once (through us)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=preexec)
    return Child(name, process)


def stop_children(children: Sequence[Child], grace_s: float = STOP_GRACE_S, out: TextIO = sys.stderr) -> None:
    """SIGTERM every running child, wait up to `grace_s`, then SIGKILL what is left."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            print(f"fd2 serve: {child.name} did not stop in {grace_s:.0f} s; killing it", file=out)
            child.process.kill()
            child.process.wait()


def supervise(children: Sequence[Child], out: TextIO = sys.stderr, poll_s: float = 0.5) -> int:
    """Wait until a signal arrives or a child exits; stop the others; 0 after a signal, 1 after a crash."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    previous: dict[int, Callable | int | None] = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        exited: Child | None = None
        while not received and exited is None:
            exited = next((child for child in children if child.process.poll() is not None), None)
            if exited is None:
                time.sleep(poll_s)
        if exited is not None:
            code = exited.process.returncode
            print(f"fd2 serve: {exited.name} exited with code {code}; stopping the others", file=out)
        else:
            print(f"fd2 serve: {signal.Signals(received[0]).name} received; stopping", file=out)
        stop_children(children, out=out)
        return 0 if exited is None else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def child_env(home: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FD2_HOME"] = home
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
