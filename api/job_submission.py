"""Everything that happens between `POST /v1/jobs` and a queued job:
validation, idempotency, enqueueing.

A job that cannot run is refused here with 422 rather than failing an hour later on a worker: the
spec is resolved with the one schema (`api.spec_checks`), the dataset must be ready and fit the spec
and the operator's cost limits (a label budget becomes the encoding stored in the spec), manifest
roots must be operator-allowed (`api.manifest_jobs`), callbacks must target allowed hosts. The
tenant's cap of active jobs and the dataset's presence are checked again where the row is written
(`store.jobs.create_job_if_allowed`, under the tenant's lock): the checks here answer early, that
one holds against simultaneous submits and deletes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import CurrentTenant
from api.broker import JobBroker
from api.errors import ApiError, unavailable
from api.manifest_jobs import remove_manifest, scan_manifest, write_manifest
from api.schemas import JobCreate
from api.spec_checks import check_runnable, resolve_job_spec
from api.uri_jobs import scan_uri, scan_uri_manifest, write_objects
from fd2_config.callback_hosts import callback_host_allowed, callback_url_problem
from fd2_config.queues import queue_for_device
from fd2_config.settings import Settings
from fd2_core.admission import JobCounts, job_counts
from fd2_core.spec import JobSpec
from store.datasets import get_tenant_dataset
from store.jobs import (
    DatasetUnavailable,
    TooManyActiveJobs,
    add_event,
    count_active_jobs,
    create_job_if_allowed,
    delete_job,
    find_by_idempotency_key,
    get_tenant_job,
)
from store.models import Dataset, DatasetStatus, EventKind, Job, new_id

logger = logging.getLogger("fd2.api")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")
ACTIVE_JOBS_RETRY_AFTER_S = 30


@dataclass
class Submission:
    job: Job
    created: bool


def request_hash(body: JobCreate) -> str:
    """Fingerprint of the request body, to tell a retry (same body) from a reused key
    (different body). Serialising is safe: `api.body_limits` refused any body nested deeper than
    `MAX_JSON_DEPTH` before routing, far below the serialiser's own limit."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> None:
    if key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise ApiError(422, "validation_error", "Idempotency-Key must be 1-200 visible ASCII characters",
                       {"field": "Idempotency-Key"})


def check_callback_url(settings: Settings, url: str | None) -> None:
    if url is None:
        return
    problem = callback_url_problem(url)
    if problem is not None:
        raise ApiError(422, "invalid_callback_url", f"{problem}; give a plain absolute http(s) URL such as "
                       "https://hooks.example.com/fd2", {"field": "callback_url"})
    if not callback_host_allowed(url, settings.callback_allow_hosts):
        host = urlsplit(url).hostname
        raise ApiError(422, "callback_host_not_allowed",
                       f"callback host {host!r} is not on the operator's allow-list; use an allowed host "
                       "(FD2_CALLBACK_ALLOW_HOSTS) or leave callback_url out and poll the job",
                       {"field": "callback_url", "host": host})


def dataset_job_counts(dataset: Dataset, spec: JobSpec) -> JobCounts:
    """The images the job will see of a stored dataset: a carved test share follows the job's own
    fraction (`fd2_core.admission.job_counts`); a dataset stored before `test_split` existed counts
    as carved unless it had a test split of its own."""
    splits_given = bool((dataset.test_split or {}).get("splits_given", dataset.has_test_split))
    return job_counts(dataset.per_class, splits_given=splits_given, test_fraction=spec.test_fraction)


def dataset_train_counts(dataset: Dataset, spec: JobSpec) -> dict[str, int]:
    """Training images per class as the job will see them."""
    return dataset_job_counts(dataset, spec).train_per_class


def unknown_dataset(dataset_id: str) -> ApiError:
    return ApiError(422, "unknown_dataset", f"dataset {dataset_id!r} not found; upload one with POST /v1/datasets "
                    "or use an id from GET /v1/datasets", {"field": "dataset.id"})


def dataset_not_ready(dataset_id: str, status: str) -> ApiError:
    return ApiError(422, "dataset_not_ready", f"dataset {dataset_id!r} is {status}, not ready; use a "
                    "dataset whose status is ready", {"field": "dataset.id", "status": status})


def too_many_active_jobs(cap: int) -> ApiError:
    return ApiError(429, "too_many_active_jobs", f"at most {cap} queued or running jobs per tenant; wait for "
                    "one to end or cancel one, then submit again", {"max_active_jobs_per_tenant": cap},
                    headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER_S)})


def refused_submission(refusal: TooManyActiveJobs | DatasetUnavailable) -> ApiError:
    """The answer for a limit the store found when it was about to insert the job."""
    if isinstance(refusal, TooManyActiveJobs):
        return too_many_active_jobs(refusal.cap)
    if refusal.status is None:
        return unknown_dataset(refusal.dataset_id)
    return dataset_not_ready(refusal.dataset_id, refusal.status)


def uploaded_dataset(session: Session, settings: Settings, tenant: CurrentTenant, dataset_id: str,
                     spec: JobSpec) -> tuple[Dataset, JobSpec]:
    """The tenant's ready dataset and the spec to store for it (`check_runnable`), or 422."""
    dataset = get_tenant_dataset(session, tenant.id, dataset_id)
    if dataset is None:
        raise unknown_dataset(dataset_id)
    if dataset.status != DatasetStatus.READY:
        raise dataset_not_ready(dataset_id, dataset.status)
    return dataset, check_runnable(settings, spec, dataset_job_counts(dataset, spec))


def _replay(existing: Job, fingerprint: str) -> Submission:
    if existing.request_hash != fingerprint:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key was already used with a different request body; send a new key "
                       "for a new request, or the same body to replay the first one",
                       {"job_id": existing.id})
    return Submission(existing, created=False)


def submit_job(
    session: Session,
    settings: Settings,
    broker: JobBroker,
    tenant: CurrentTenant,
    body: JobCreate,
    idempotency_key: str | None,
) -> Submission:
    """Validate, store and enqueue a job (blocking). An idempotent replay returns the first job."""
    check_idempotency_key(idempotency_key)
    fingerprint = request_hash(body)
    if idempotency_key is not None:
        existing = find_by_idempotency_key(session, tenant.id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint)

    spec = resolve_job_spec(body.spec)
    check_callback_url(settings, body.callback_url)
    ref = body.dataset
    if sum(value is not None for value in (ref.id, ref.manifest, ref.uri)) != 1:
        raise ApiError(422, "validation_error", "dataset needs exactly one of 'id' (an uploaded dataset), "
                       "'manifest' (files under an allowed data root) or 'uri' (an s3:// prefix); give one of them",
                       {"field": "dataset"})
    cap = settings.max_active_jobs_per_tenant
    # Early, before any scan; the binding check is the store's, where the job is inserted.
    if cap and count_active_jobs(session, tenant.id) >= cap:
        raise too_many_active_jobs(cap)

    job_id = new_id("job")
    dataset_id: str | None = None
    manifest_path: Path | None = None
    dataset_uri: str | None = None
    if ref.id is not None:
        dataset, spec = uploaded_dataset(session, settings, tenant, ref.id, spec)
        dataset_id = dataset.id
    elif ref.uri is not None or (ref.manifest is not None and ref.manifest.of_objects):
        if ref.uri is not None:
            admitted = scan_uri(session, settings, tenant.id, ref.uri, spec.test_fraction, spec.seed)
        else:
            assert ref.manifest is not None
            admitted = scan_uri_manifest(session, settings, tenant.id, ref.manifest, spec.test_fraction, spec.seed)
        spec = check_runnable(settings, spec, JobCounts.of_splits(admitted.layout.per_class))
        manifest_path = write_objects(settings, job_id, admitted)
        dataset_uri = str(admitted.prefix)
    else:
        assert ref.manifest is not None
        root, rows, layout = scan_manifest(settings, ref.manifest, spec.test_fraction, spec.seed)
        spec = check_runnable(settings, spec, JobCounts.of_splits(layout.per_class))
        manifest_path = write_manifest(settings, job_id, root, rows)

    queue = queue_for_device(settings, spec.device)
    try:
        job = create_job_if_allowed(
            session, max_active_jobs=cap, job_id=job_id, tenant_id=tenant.id, spec=spec.model_dump(mode="json"),
            queue=queue, dataset_id=dataset_id, manifest_path=str(manifest_path) if manifest_path else None,
            dataset_uri=dataset_uri,
            callback_url=body.callback_url, idempotency_key=idempotency_key, request_hash=fingerprint,
        )
        add_event(session, job.id, EventKind.JOB_QUEUED, f"job queued on {queue}")
        session.commit()
    except (TooManyActiveJobs, DatasetUnavailable, IntegrityError) as exc:
        # A refusal, or the same Idempotency-Key committed by a simultaneous request:
        # that one's replay wins.
        session.rollback()
        remove_manifest(manifest_path)
        existing = find_by_idempotency_key(session, tenant.id, idempotency_key) if idempotency_key else None
        if existing is not None:
            return _replay(existing, fingerprint)
        if isinstance(exc, IntegrityError):
            raise
        raise refused_submission(exc) from None

    try:
        broker.send_job(job.id, queue)
    except Exception as exc:
        logger.error("could not enqueue %s: %s", job.id, exc)
        session.rollback()
        delete_job(session, job.id)
        session.commit()
        remove_manifest(manifest_path)
        raise unavailable("broker_unavailable",
                          "the job queue is unreachable; nothing was submitted, send the job again shortly") from None
    fresh = get_tenant_job(session, tenant.id, job.id)
    assert fresh is not None
    return Submission(fresh, created=True)
