"""Python SDK of the FD² distillation service: `Client(url, key)` and the typed errors it raises.

    from fd2_client import Client

    with Client("http://127.0.0.1:8000", key) as fd2:
        dataset = fd2.upload_dataset("data/birds", "birds")
        job = fd2.wait(fd2.submit(dataset, {"preset": "cpu-small", "ipc": 1}))
        fd2.download_all(job, "out/")

It imports no torch and nothing of the service; the `fd2-client` command (`fd2_client.cli`) is built on it.
"""

from fd2_client.client import Client
from fd2_client.errors import (
    ApiError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    Fd2Error,
    Forbidden,
    Gone,
    JobCancelled,
    JobError,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from fd2_client.resources import Artifact, Dataset, Event, Job, Progress
from fd2_client.retries import RetryPolicy
from fd2_client.version import __version__

__all__ = [
    "ApiError", "Artifact", "BadRequest", "ChecksumMismatch", "Client", "Conflict", "ConnectionFailed", "Dataset",
    "Event", "Fd2Error", "Forbidden", "Gone", "Job", "JobCancelled", "JobError", "JobFailed", "NotFound",
    "PayloadTooLarge", "Progress", "RangeNotSatisfiable", "RateLimited", "RetryPolicy", "ServerError",
    "ServiceUnavailable", "Unauthorized", "ValidationFailed", "WaitTimeout", "__version__",
]
