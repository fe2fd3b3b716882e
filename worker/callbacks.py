"""POST a finished job's resource to the client's `callback_url`, in the background, with retries.

Only hosts on the operator's allow-list are contacted: the worker sits inside the operator's
network, so an arbitrary URL would let any tenant probe it. `post_job_resource` makes one attempt
and says whether another may help. `start_callback` delivers on a daemon thread of the worker
process, so a slow or failing receiver never keeps a GPU idle. It retries with backoff and records
the outcome as a `callback` event on the job. Callbacks still pending when the worker process exits
are not retried (the job resource remains available by polling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from fd2_config.callback_hosts import callback_host_allowed
from fd2_config.settings import Settings
from store.db import session_scope
from store.jobs import add_event, get_job
from store.models import EventKind
from store.resources import job_resource_json
from worker.outages import transact


class CallbackRejected(Exception):
    """The URL may never be called (bad scheme, host not allowed); retrying would not help."""


class CallbackFailed(Exception):
    """The target did not accept the POST this time (network error, 5xx, 429); worth retrying."""


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """True when the URL's host is listed:
    `host`, `host:port`, or `.domain` for any subdomain of it.

    The very rule the API applied at submission,
    checked again here before the worker connects anywhere.
    """
    return callback_host_allowed(url, allowed_hosts)


def post_job_resource(
    url: str, resource: dict[str, Any], allowed_hosts: Iterable[str], *, timeout_s: float = 10.0
) -> int:
    """POST `resource` as JSON to `url` once; return the HTTP status of an accepted delivery."""
    if not host_allowed(url, allowed_hosts):
        raise CallbackRejected(f"callback host of {url!r} is not on the allow-list")
    headers = {"User-Agent": "fd2-service", "X-FD2-Event": "job.finished"}
    try:
        response = httpx.post(url, json=resource, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise CallbackFailed(f"callback to {url!r} failed: {type(exc).__name__}") from exc
    if response.status_code >= 500 or response.status_code == 429:
        raise CallbackFailed(f"callback to {url!r} answered {response.status_code}")
    if response.status_code >= 400:
        raise CallbackRejected(f"callback to {url!r} answered {response.status_code}")
    return response.status_code


def backoff_delays(attempts: int, base_s: float = 1.0, cap_s: float = 60.0) -> list[float]:
    """Waits before each retry: base, 2·base, 4·base, … capped (`attempts - 1` of them)."""
    return [min(cap_s, base_s * 2**index) for index in range(max(0, attempts - 1))]


log = logging.getLogger(__name__)

CALLBACK_ATTEMPTS = 6


def deliver_callback(
    job_id: str,
    settings: Settings,
    *,
    attempts: int = CALLBACK_ATTEMPTS,
    base_delay_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST the job resource to the job's `callback_url`, retrying transient failures;
    True when delivered."""
    with session_scope(settings) as session:
        job = get_job(session, job_id)
        if job is None or not job.callback_url:
            return False
        url, resource = job.callback_url, job_resource_json(session, settings, job_id)
    delays = backoff_delays(attempts, base_delay_s)
    outcome, delivered = f"callback to {url} not delivered", False
    for attempt in range(1, attempts + 1):
        try:
            status = post_job_resource(url, resource, settings.callback_allow_hosts)
        except CallbackRejected as exc:
            outcome = str(exc)
            break
        except CallbackFailed as exc:
            outcome = f"{exc} (attempt {attempt}/{attempts})"
            if attempt < attempts:
                sleep(delays[attempt - 1])
            continue
        outcome, delivered = f"callback delivered to {url} (HTTP {status}, attempt {attempt})", True
        break
    log.info("job %s: %s", job_id, outcome)
    try:
        transact(settings, add_event, job_id, EventKind.CALLBACK, outcome, data={"delivered": delivered, "url": url},
                 retry=False)
    except Exception:
        log.warning("could not record the callback outcome of job %s", job_id, exc_info=True)
    return delivered


def start_callback(job_id: str, settings: Settings) -> threading.Thread:
    """Deliver the callback on a daemon thread and return it (tests join it)."""
    thread = threading.Thread(
        target=_deliver_logged, args=(job_id, settings), name=f"fd2-callback-{job_id}", daemon=True
    )
    thread.start()
    return thread


def _deliver_logged(job_id: str, settings: Settings) -> None:
    try:
        deliver_callback(job_id, settings)
    except Exception:
        log.exception("callback delivery of job %s crashed", job_id)
