"""Turn an uploaded archive into a validated dataset folder, or fail leaving nothing behind.

Steps: the tenant's storage quota is checked; the body is streamed to a temporary file; then, off the event
loop, safe extraction into the dataset's own folder, layout scan and a decode check of every image; the archive
itself is deleted once extracted, and the quota is checked again with the extracted size. Any failure removes
the folder and no row is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.auth import CurrentTenant
from api.errors import ApiError
from api.upload_slots import check_free_disk
from api.uploads import receive_upload
from fd2_core.data.archive import extract_archive
from fd2_core.data.errors import DataError, UnusableDataError
from fd2_core.data.layout import DatasetLayout, scan_source, validate_images
from fd2_core.data.limits import DataLimits
from store.datasets import create_dataset, dataset_path, remove_tree, tenant_storage_bytes
from store.models import Dataset, new_id
from store.settings import Settings

MAX_STORED_ERRORS = 1000
MAX_ERROR_TEXT_CHARS = 300  # an archive member's name may be 64 KiB long; the resource stays small
INCOMING_DIR = ".incoming"  # uploads in flight; the dot keeps it apart from dataset ids
ARCHIVE_SUFFIXES = re.compile(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", re.IGNORECASE)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME_CHARS = 200


@dataclass
class IntakeResult:
    root: Path
    summary: dict[str, Any]
    size_bytes: int
    has_test_split: bool


def data_limits(settings: Settings) -> DataLimits:
    return DataLimits(**settings.data_limit_values())


def clean_name(text: str) -> str:
    """A display name without control characters (some databases refuse NUL), trimmed to the column size."""
    return " ".join(CONTROL_CHARACTERS.sub(" ", text).split())[:MAX_NAME_CHARS]


def default_dataset_name(filename: str) -> str:
    stem = ARCHIVE_SUFFIXES.sub("", Path(clean_name(filename or "")).name).strip()
    return stem[:MAX_NAME_CHARS] or "dataset"


def quota_exceeded(quota: int, used: int, adding: int | None = None) -> ApiError:
    message = f"the tenant's datasets would exceed the storage quota of {quota} bytes"
    details = {"max_tenant_storage_bytes": quota, "used_bytes": used}
    if adding is not None:
        details["dataset_bytes"] = adding
    return ApiError(413, "storage_quota_exceeded", message + "; delete datasets to make room", details)


def check_storage_quota(session: Session, settings: Settings, tenant: CurrentTenant, adding: int) -> None:
    """413 when the tenant's kept datasets plus `adding` bytes would pass `max_tenant_storage_bytes`."""
    quota = settings.max_tenant_storage_bytes
    if not quota:
        return
    used = tenant_storage_bytes(session, tenant.id)
    if used + adding > quota or used >= quota:
        raise quota_exceeded(quota, used, adding or None)


def shorten(text: str, limit: int = MAX_ERROR_TEXT_CHARS) -> str:
    """`text` cut in the middle when too long, so both the folder and the file name stay readable."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def stored_summary(layout: DatasetLayout) -> dict[str, Any]:
    """The resource's counts as the loader sees them at the operator's test fraction, errors shortened."""
    summary = layout.summary(max_errors=MAX_STORED_ERRORS)
    summary["errors"] = [{"path": shorten(e["path"]), "reason": shorten(e["reason"])} for e in summary["errors"]]
    return summary


def ingest_archive(settings: Settings, archive: Path, dataset_id: str) -> IntakeResult:
    """Extract and validate `archive` into the dataset's folder; raises DataError (folder removed)."""
    folder = dataset_path(settings, dataset_id)
    limits = data_limits(settings)
    try:
        extraction = extract_archive(archive, folder / "data", limits)
        archive.unlink(missing_ok=True)
        try:
            # The one scanner, at the operator's fraction: the summary is what the loader will see (the layout
            # records whether its test split is the archive's own or carved, for jobs that carve differently).
            layout = scan_source(extraction.root, test_fraction=settings.dataset_test_fraction, seed=0,
                                 limits=limits)
            layout = validate_images(layout, limits, verify=True)
        except UnusableDataError as exc:  # what extraction left out may be why nothing is usable
            raise exc.with_skipped(extraction.skipped) from None
        layout.errors[:0] = extraction.skipped
        layout.warnings[:0] = extraction.warnings  # member names decoded from a guessed code page, ...
        summary = stored_summary(layout)
        has_test_split = layout.test_source == "archive"
    except BaseException:
        remove_tree(folder)
        raise
    return IntakeResult(extraction.root, summary, extraction.bytes_written, has_test_split)


async def receive_dataset(request: Request, session: Session, settings: Settings, tenant: CurrentTenant) -> Dataset:
    """The whole upload: stream to disk, extract and validate off the loop, then insert the ready row."""
    assert settings.datasets_dir is not None
    check_free_disk(settings.datasets_dir, settings.min_free_disk_bytes)
    await run_in_threadpool(check_storage_quota, session, settings, tenant, 0)
    with request.app.state.upload_slots.hold(tenant.id):
        return await _receive_and_store(request, session, settings, tenant)


async def _receive_and_store(request: Request, session: Session, settings: Settings,
                             tenant: CurrentTenant) -> Dataset:
    assert settings.datasets_dir is not None
    dataset_id = new_id("ds")
    incoming = settings.datasets_dir / INCOMING_DIR / f"{dataset_id}.upload"
    try:
        upload = await receive_upload(request, incoming, settings.max_upload_bytes, text_fields=("name",))
        # Extraction and decoding are long and CPU-bound: their own limiter keeps uploads from taking every
        # thread that short requests need.
        result = await anyio.to_thread.run_sync(ingest_archive, settings, incoming, dataset_id,
                                                limiter=request.app.state.intake_limiter)
    except DataError as exc:
        raise ApiError(422, exc.code, exc.message, exc.details) from None
    finally:
        incoming.unlink(missing_ok=True)
    name = clean_name(upload.fields.get("name") or "") or default_dataset_name(upload.filename)
    try:
        await run_in_threadpool(check_storage_quota, session, settings, tenant, result.size_bytes)
        return await run_in_threadpool(_insert_ready, session, tenant, dataset_id, name, result)
    except BaseException:
        remove_tree(dataset_path(settings, dataset_id))
        raise


def _insert_ready(session: Session, tenant: CurrentTenant, dataset_id: str, name: str, result: IntakeResult) -> Dataset:
    dataset = create_dataset(
        session, dataset_id=dataset_id, tenant_id=tenant.id, name=name, summary=result.summary, path=result.root,
        size_bytes=result.size_bytes, has_test_split=result.has_test_split,
    )
    session.commit()
    return dataset
