"""Everything that happens between `POST /v1/jobs` and a queued job: validation, idempotency, enqueueing.

A job that cannot run is refused here with 422 rather than failing an hour later on a worker: the spec is
resolved with the one schema, the dataset must be ready and large enough for the requested ipc, manifest
roots must be operator-allowed, callbacks must target allowed hosts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import CurrentTenant
from api.broker import JobBroker
from api.dataset_intake import carved_test_count, data_limits
from api.errors import ApiError, validation_details
from api.schemas import JobCreate, Manifest
from fd2_core.data.errors import DataError
from fd2_core.data.layout import scan_manifest_items
from fd2_core.spec import JobSpec, resolve_spec
from store.datasets import get_tenant_dataset
from store.jobs import (
    add_event,
    count_active_jobs,
    create_job,
    delete_job,
    find_by_idempotency_key,
    get_tenant_job,
    job_workdir,
)
from store.models import Dataset, Job, new_id
from store.settings import Settings, queue_for_device

logger = logging.getLogger("fd2.api")
MANIFEST_FILE = "manifest.json"


@dataclass
class Submission:
    job: Job
    created: bool


def request_hash(body: JobCreate) -> str:
    """Fingerprint of the request body, to tell a retry (same body) from a reused key (different body)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_job_spec(raw: dict[str, Any]) -> JobSpec:
    try:
        return resolve_spec(raw)
    except ValidationError as exc:
        details = validation_details(exc.errors(include_input=False), prefix=("body", "spec"))
        first = details[0]
        where = f"spec.{first['field']}" if first["field"] else "spec"
        raise ApiError(422, "invalid_spec", f"{where}: {first['msg']}", details) from None


def check_callback_url(settings: Settings, url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(422, "invalid_callback_url", "callback_url must be an absolute http(s) URL",
                       {"field": "callback_url"})
    if parts.hostname.lower() not in settings.callback_allow_hosts:
        raise ApiError(422, "callback_host_not_allowed",
                       f"callback host {parts.hostname!r} is not on the operator's allow-list",
                       {"field": "callback_url", "host": parts.hostname})


def check_ipc(spec: JobSpec, train_counts: dict[str, int]) -> None:
    """Each class needs at least `ipc` training images (ipc real images initialise the synthetic ones)."""
    if not train_counts:
        return
    smallest = min(train_counts, key=lambda name: train_counts[name])
    if spec.ipc > train_counts[smallest]:
        raise ApiError(
            422,
            "ipc_too_large",
            f"ipc={spec.ipc} is larger than the {train_counts[smallest]} training images of class {smallest!r}",
            {"field": "spec.ipc", "ipc": spec.ipc, "smallest_class": smallest,
             "smallest_class_train_images": train_counts[smallest]},
        )


def dataset_train_counts(dataset: Dataset, spec: JobSpec) -> dict[str, int]:
    """Training images per class as the job will see them (a carved test share follows the spec)."""
    counts: dict[str, int] = {}
    for name, split in dataset.per_class.items():
        if dataset.has_test_split:
            counts[name] = int(split.get("train", 0))
        else:
            total = int(split.get("train", 0)) + int(split.get("test", 0))
            counts[name] = total - carved_test_count(total, spec.test_fraction)
    return counts


def uploaded_dataset(session: Session, tenant: CurrentTenant, dataset_id: str, spec: JobSpec) -> Dataset:
    dataset = get_tenant_dataset(session, tenant.id, dataset_id)
    if dataset is None:
        raise ApiError(422, "unknown_dataset", f"dataset {dataset_id!r} not found", {"field": "dataset.id"})
    if dataset.status != "ready":
        raise ApiError(422, "dataset_not_ready", f"dataset {dataset_id!r} is {dataset.status}, not ready",
                       {"field": "dataset.id", "status": dataset.status})
    check_ipc(spec, dataset_train_counts(dataset, spec))
    return dataset


def allowed_manifest_root(settings: Settings, root_text: str) -> Path:
    root = Path(root_text).expanduser()
    if not root.is_absolute():
        raise ApiError(422, "data_root_not_allowed", "manifest root must be an absolute path",
                       {"field": "dataset.manifest.root"})
    resolved = root.resolve()
    for allowed in settings.allowed_data_roots:
        if resolved == allowed or allowed in resolved.parents:
            return resolved
    raise ApiError(422, "data_root_not_allowed", "manifest root is not under an operator-allowed data root",
                   {"field": "dataset.manifest.root"})


def checked_manifest(settings: Settings, manifest: Manifest, spec: JobSpec) -> tuple[Path, list[dict[str, Any]]]:
    """Resolve and check a manifest now (files exist, classes, ipc); returns the root and the rows."""
    root = allowed_manifest_root(settings, manifest.root)
    rows = [item.model_dump(exclude_none=True) for item in manifest.items]
    try:
        layout = scan_manifest_items(root, rows, test_fraction=spec.test_fraction, seed=spec.seed,
                                     limits=data_limits(settings))
    except DataError as exc:
        raise ApiError(422, exc.code, exc.message, {"field": "dataset.manifest"}) from None
    check_ipc(spec, {name: counts["train"] for name, counts in layout.per_class.items()})
    return root, rows


def write_manifest(settings: Settings, job_id: str, root: Path, rows: list[dict[str, Any]]) -> Path:
    """`<job workdir>/manifest.json` = {"root", "items"}: the worker reads rows relative to `root`."""
    path = job_workdir(settings, job_id) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"root": str(root), "items": rows}))
    partial.replace(path)
    return path


def _replay(existing: Job, fingerprint: str) -> Submission:
    if existing.request_hash != fingerprint:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key was already used with a different request body",
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
    fingerprint = request_hash(body)
    if idempotency_key is not None:
        existing = find_by_idempotency_key(session, tenant.id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint)

    spec = resolve_job_spec(body.spec)
    check_callback_url(settings, body.callback_url)
    ref = body.dataset
    if (ref.id is None) == (ref.manifest is None):
        raise ApiError(422, "validation_error", "dataset needs exactly one of 'id' or 'manifest'",
                       {"field": "dataset"})
    cap = settings.max_active_jobs_per_tenant
    if cap and count_active_jobs(session, tenant.id) >= cap:
        raise ApiError(429, "too_many_active_jobs", f"at most {cap} queued or running jobs per tenant")

    job_id = new_id("job")
    dataset_id: str | None = None
    manifest_path: Path | None = None
    if ref.id is not None:
        dataset_id = uploaded_dataset(session, tenant, ref.id, spec).id
    else:
        assert ref.manifest is not None
        root, rows = checked_manifest(settings, ref.manifest, spec)
        manifest_path = write_manifest(settings, job_id, root, rows)

    queue = queue_for_device(settings, spec.device)
    try:
        job = create_job(
            session, job_id=job_id, tenant_id=tenant.id, spec=spec.model_dump(mode="json"), queue=queue,
            dataset_id=dataset_id, manifest_path=str(manifest_path) if manifest_path else None,
            callback_url=body.callback_url, idempotency_key=idempotency_key, request_hash=fingerprint,
        )
        add_event(session, job.id, "queued", f"job queued on {queue}")
        session.commit()
    except IntegrityError:
        session.rollback()
        _remove_manifest(manifest_path)
        existing = find_by_idempotency_key(session, tenant.id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, fingerprint)

    try:
        broker.send_job(job.id, queue)
    except Exception as exc:
        logger.error("could not enqueue %s: %s", job.id, exc)
        session.rollback()
        delete_job(session, job.id)
        session.commit()
        _remove_manifest(manifest_path)
        raise ApiError(503, "broker_unavailable", "the job queue is unreachable; nothing was submitted") from None
    fresh = get_tenant_job(session, tenant.id, job.id)
    assert fresh is not None
    return Submission(fresh, created=True)


def _remove_manifest(path: Path | None) -> None:
    if path is None:
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
