"""Fixtures of the client tests: a real embedded service (uvicorn + a Celery worker), a key and tiny data.

Imported by tests/client/test_client_sdk.py and tests/client/test_client_cli.py; each module starts its own service.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_helpers import tiny_spec
from service_harness import TEST_STALE_HEARTBEAT_S, ServiceStack, service_env, write_fgsynth_folder

# Finishes in seconds on a CPU: 4 classes, 32 px, one image per class, no student evaluation.
FAST_SPEC = tiny_spec(device="cpu", evaluate=False, eval_random_baseline=False)
# Long enough per ipc index that a test can cancel it mid-run.
SLOW_SPEC = tiny_spec(device="cpu", ipc=3, distill_iterations=400, evaluate=False, eval_random_baseline=False)
JOB_TIMEOUT_S = 300


@dataclass
class RunningService:
    stack: ServiceStack
    key: str

    @property
    def url(self) -> str:
        return self.stack.base_url

    def new_key(self, tenant: str) -> str:
        return self.stack.create_key(tenant)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("client-service")
    env = service_env({"FD2_HOME": str(root / "home"), "FD2_STALE_HEARTBEAT_S": str(TEST_STALE_HEARTBEAT_S)})
    stack = ServiceStack("embedded", env, root / "logs")
    try:
        stack.start()
        yield RunningService(stack, stack.create_key("client-tests"))
    except BaseException:
        print(stack.log_tail())
        raise
    finally:
        print(stack.log_tail())
        stack.stop()


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree (train/ and test/, 4 classes of 32 px images) from the built-in generator."""
    return write_fgsynth_folder(tmp_path_factory.mktemp("fgsynth") / "birds", classes=4, train=16, test=6)
