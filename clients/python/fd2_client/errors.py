"""Every failure the SDK raises, typed so a caller can branch on the class instead of parsing text.

The service answers errors as `{"error": {"code", "message", "details"}}`; `error_from_response`
turns such an answer into the `ApiError` subclass of its status, keeping `code` (stable snake_case),
`message` (for a person), `details` and `status`. A finished job that did not succeed raises
`JobFailed` or `JobCancelled` with the job's own error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from fd2_client.credentials import ApiKey


class Fd2Error(Exception):
    """Base of everything this SDK raises."""


class ApiError(Fd2Error):
    """The service refused a request: `status` (HTTP), `code`, `message`, `details` from its error
    body.

    `retry_after` is the `Retry-After` header in seconds, when the service sent one.
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class BadRequest(ApiError):
    """400: the request could not be read."""


class Unauthorized(ApiError):
    """401: missing, unknown or revoked API key."""


class Forbidden(ApiError):
    """403: the key may not do this."""


class NotFound(ApiError):
    """404: unknown id, or another tenant's (the service does not tell them apart)."""


class Conflict(ApiError):
    """409: the resource's state forbids it (job finished or still running, dataset in use,
    idempotency key reused with another body)."""


class Gone(ApiError):
    """410: the resource existed but is no more (a job's artifacts removed after the operator's
    retention)."""


class PayloadTooLarge(ApiError):
    """413: the upload is larger than the service accepts."""


class RangeNotSatisfiable(ApiError):
    """416: a download asked for bytes past the end of the file."""


class ValidationFailed(ApiError):
    """422: the request or the data cannot run; `details` names the fields and the problems."""


class RateLimited(ApiError):
    """429: too many requests (or jobs, or uploads) for now; `retry_after` says how long to wait."""


class ServerError(ApiError):
    """5xx: the service failed to answer."""


class ServiceUnavailable(ServerError):
    """503: a dependency of the service (database, broker) is down for now; `retry_after` says when
    to retry."""


class ConnectionFailed(Fd2Error):
    """The service could not be reached (refused, reset, timed out), also after the retries."""


class ChecksumMismatch(Fd2Error):
    """A download's SHA-256 differs from the one the service registered; nothing was kept."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 {actual} does not match the expected {expected}; the download was "
                         "discarded, download it again")
        self.name = name
        self.expected = expected
        self.actual = actual


class WaitTimeout(Fd2Error, TimeoutError):
    """`wait` gave up after its timeout while the job was still queued or running; `job` is its last
    state."""

    def __init__(self, job: Mapping[str, Any], timeout: float) -> None:
        super().__init__(f"job {job.get('id')} is still {job.get('status')} after {timeout:g} s")
        self.job = dict(job)
        self.timeout = timeout


class JobError(Fd2Error):
    """A job ended without success; `job` is the final job resource, `code`/`message` its
    `error`."""

    def __init__(self, job: Mapping[str, Any]) -> None:
        error = job.get("error") or {}
        self.job = dict(job)
        self.code: str | None = error.get("code")
        self.message: str = error.get("message") or f"job {job.get('status')}"
        super().__init__(f"job {job.get('id')} {job.get('status')}: {self.message}")


class JobFailed(JobError):
    """The job ended `failed`."""


class JobCancelled(JobError):
    """The job ended `cancelled`."""


ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    416: RangeNotSatisfiable,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (only the delta-seconds form; an HTTP date counts as absent)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def error_from_response(response: httpx.Response, key: ApiKey | None = None) -> ApiError:
    """The typed error of a 4xx/5xx answer; a body that is not the service's error shape still gives
    one.

    `key` is masked wherever the answer quotes it back (a proxy echoing the header), so no error
    carries it."""
    status = response.status_code
    code, message, details = _http_code(status), response.reason_phrase or f"HTTP {status}", None
    try:
        body = json.loads(response.read() or b"null")
    except (ValueError, httpx.HTTPError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        details = error.get("details")
    if key is not None:
        code, message, details = key.redact(code), key.redact(message), key.redact_json(details)
    kind = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, code, message, details, retry_after_seconds(response))


def _http_code(status: int) -> str:
    """`not_found` for 404 and so on: the code of an error answer that came without the service's
    body."""
    phrase = httpx.codes.get_reason_phrase(status)
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_") if phrase else f"http_{status}"
