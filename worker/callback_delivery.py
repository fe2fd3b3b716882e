"""Deliver a finished job's callback in the background, with retries and backoff.

Runs on a daemon thread of the worker process so a slow or failing receiver never keeps a GPU idle; the
outcome is recorded as a `callback` event on the job. Callbacks still pending when the worker process exits
are not retried (the job resource remains available by polling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fd2_config.settings import Settings
from store.db import session_scope
from store.jobs import add_event, get_job
from store.models import EventKind
from store.resources import job_resource_json
from worker.callbacks import CallbackFailed, CallbackRejected, backoff_delays, post_job_resource

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
    """POST the job resource to the job's `callback_url`, retrying transient failures; True when delivered."""
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
        with session_scope(settings) as session:
            add_event(session, job_id, EventKind.CALLBACK, outcome, data={"delivered": delivered, "url": url})
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
