"""Turn an uploaded archive into a validated dataset folder, or fail leaving nothing behind.

Steps: the tenant's storage quota (datasets and job artifacts) is checked; the body is streamed to a
temporary file within the upload timeouts; then, off the event loop, safe extraction into the
dataset's own folder, layout scan and a decode check of every image, which also fingerprints its
pixels to count duplicates and test images that occur in train (dropped on request, see
`fd2_core.data.duplicates`); the archive itself is deleted once extracted, and the quota is checked
again with the extracted size. Any failure removes the folder and no row is written. The whole
intake holds the upload's lease (`store.folders`), so that what a crash leaves is the storage
sweep's to remove, and no pooled database connection between its short queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy.orm import Session
from starlette.requests import Request

from api.auth import CurrentTenant
from api.deps import short_transaction
from api.errors import ApiError
from api.storage_errors import storage_errors
from api.upload_slots import check_free_disk
from api.upload_timeouts import UploadTimeouts
from api.uploads import receive_upload
from fd2_config.settings import Settings
from fd2_core.data.archive import extract_archive
from fd2_core.data.duplicates import DuplicateReport, Fingerprint, duplicate_warnings, find_duplicates
from fd2_core.data.errors import DataError, FileError, UnusableDataError
from fd2_core.data.layout import DatasetLayout, relative_name, scan_source, validate_images
from fd2_core.data.limits import DataLimits
from store.datasets import StorageUsage, create_dataset, dataset_path, remove_tree, tenant_storage_usage
from store.folders import discard_file, staging_file, upload_lease
from store.models import Dataset, new_id

MAX_STORED_ERRORS = 1000
MAX_ERROR_TEXT_CHARS = 300  # an archive member's name may be 64 KiB long; the resource stays small
ARCHIVE_SUFFIXES = re.compile(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", re.IGNORECASE)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME_CHARS = 200
DROP_DUPLICATES_FIELD = "drop_duplicates"
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})
DUPLICATES_FIX = f"upload again with the form field {DROP_DUPLICATES_FIELD}=true to drop them"


@dataclass
class IntakeResult:
    root: Path
    summary: dict[str, Any]
    size_bytes: int
    has_test_split: bool


def data_limits(settings: Settings) -> DataLimits:
    return DataLimits(**settings.data_limit_values())


def clean_name(text: str) -> str:
    """A display name without control characters (some databases refuse NUL), cut to the column."""
    return " ".join(CONTROL_CHARACTERS.sub(" ", text).split())[:MAX_NAME_CHARS]


def default_dataset_name(filename: str) -> str:
    stem = ARCHIVE_SUFFIXES.sub("", Path(clean_name(filename or "")).name).strip()
    return stem[:MAX_NAME_CHARS] or "dataset"


def quota_exceeded(quota: int, usage: StorageUsage, adding: int | None = None) -> ApiError:
    message = f"the tenant's datasets and job artifacts would exceed the storage quota of {quota} bytes"
    details = {"max_tenant_storage_bytes": quota, "used_bytes": usage.total,
               "used_by_datasets_bytes": usage.dataset_bytes, "used_by_artifacts_bytes": usage.artifact_bytes}
    if adding is not None:
        details["dataset_bytes"] = adding
    return ApiError(413, "storage_quota_exceeded",
                    message + "; delete datasets or finished jobs (DELETE /v1/jobs/{id}) to make room", details)


def check_storage_quota(session: Session, settings: Settings, tenant: CurrentTenant, adding: int) -> None:
    """413 when the tenant's kept datasets and job artifacts plus `adding` bytes would pass
    `max_tenant_storage_bytes`."""
    quota = settings.max_tenant_storage_bytes
    if not quota:
        return
    usage = tenant_storage_usage(session, tenant.id)
    if usage.total + adding > quota or usage.total >= quota:
        raise quota_exceeded(quota, usage, adding or None)


def shorten(text: str, limit: int = MAX_ERROR_TEXT_CHARS) -> str:
    """`text` cut in the middle when too long, so both the folder and the file name stay
    readable."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def stored_summary(layout: DatasetLayout) -> dict[str, Any]:
    """The resource's counts as the loader sees them at the operator's test fraction, errors cut."""
    summary = layout.summary(max_errors=MAX_STORED_ERRORS)
    summary["errors"] = [{"path": shorten(e["path"]), "reason": shorten(e["reason"])} for e in summary["errors"]]
    return summary


def drop_duplicates_option(fields: dict[str, str]) -> bool:
    """The upload's `drop_duplicates` form field (default false); 422 naming the accepted values
    otherwise."""
    text = fields.get(DROP_DUPLICATES_FIELD, "").strip().lower()
    if text in _TRUE_WORDS or text in _FALSE_WORDS:
        return text in _TRUE_WORDS
    message = f"form field {DROP_DUPLICATES_FIELD} must be true or false"
    raise ApiError(422, "validation_error", message,
                   [{"loc": ["body", DROP_DUPLICATES_FIELD], "field": DROP_DUPLICATES_FIELD, "msg": message,
                     "type": "bool_parsing"}])


def find_upload_duplicates(layout: DatasetLayout, digests: dict[Path, str], drop: bool) -> DuplicateReport:
    """Duplicates of a validated layout in the split jobs will use: its own test split, or else the
    share a job with the default seed carves at `dataset_test_fraction` (the layout's own carve).
    Without a test split of its own, a drop keeps the first of each group over the whole upload,
    since every job may carve differently."""
    prints = [Fingerprint(relative_name(layout.root, item.path, layout.names), item.split, digests[item.path])
              for item in layout.items]
    return find_duplicates(prints, drop=drop, pooled=not layout.splits_given)


def rescan_after_drop(settings: Settings, root: Path, layout: DatasetLayout, scanned: list[Path],
                      dropped: dict[Path, str]) -> DatasetLayout:
    """The layout of `root` once `dropped` files are gone, carved as the loader will carve what is
    left (so the summary stays what a job sees); the files validation refused stay out, with every
    reason kept."""
    fresh = scan_source(root, test_fraction=settings.dataset_test_fraction, seed=0, limits=data_limits(settings))
    refused = set(scanned) - {item.path for item in layout.items}
    fresh.errors[:] = layout.errors
    fresh.errors.extend(FileError(relative_name(root, path, layout.names), reason) for path, reason in dropped.items())
    fresh.warnings[:] = layout.warnings
    return fresh.without({path: "" for path in refused}, record=False)


def drop_files(layout: DatasetLayout, report: DuplicateReport) -> tuple[dict[Path, str], int]:
    """Delete the files `report` drops; returns them with their reasons (for `errors`) and the bytes
    freed."""
    dropped = {layout.items[index].path: reason for index, reason in report.dropped.items()}
    freed = 0
    for path in dropped:
        freed += path.stat().st_size
        path.unlink()
    return dropped, freed


def ingest_archive(settings: Settings, archive: Path, dataset_id: str, drop_duplicates: bool = False,
                   shown_name: str | None = None) -> IntakeResult:
    """Extract and validate `archive` into the dataset's folder; raises DataError (folder removed).

    `drop_duplicates` deletes copies within a split and test images that occur in train before the
    dataset is stored; either way the summary's `duplicates` counts what the upload held.
    """
    folder = dataset_path(settings, dataset_id)
    limits = data_limits(settings)
    try:
        extraction = extract_archive(archive, folder / "data", limits, shown_name=shown_name)
        archive.unlink(missing_ok=True)
        digests: dict[Path, str] = {}
        try:
            # The one scanner, at the operator's fraction: the summary is what the loader will see
            # (the layout records whether its test split is the archive's own or carved, for jobs
            # that carve differently).
            layout = scan_source(extraction.root, test_fraction=settings.dataset_test_fraction, seed=0,
                                 limits=limits)
            scanned = [item.path for item in layout.items]
            layout = validate_images(layout, limits, verify=True, digests=digests)
            duplicates = find_upload_duplicates(layout, digests, drop_duplicates)
            dropped, freed = drop_files(layout, duplicates)
            size_bytes = extraction.bytes_written - freed
            if dropped:
                layout = rescan_after_drop(settings, extraction.root, layout, scanned, dropped)
        except UnusableDataError as exc:  # what extraction left out may be why nothing is usable
            raise exc.with_skipped(extraction.skipped) from None
        layout.errors[:0] = extraction.skipped
        # member names decoded from a guessed code page, ...
        layout.warnings[:0] = extraction.warnings
        summary = stored_summary(layout)
        summary["duplicates"] = duplicates.as_dict()
        summary["warnings"].extend(duplicate_warnings(duplicates, DUPLICATES_FIX))
        has_test_split = layout.test_source == "archive"
    except BaseException:
        remove_tree(folder)
        raise
    return IntakeResult(extraction.root, summary, size_bytes, has_test_split)


async def receive_dataset(request: Request, session: Session, settings: Settings, tenant: CurrentTenant) -> Dataset:
    """The whole upload: stream to disk, extract and validate off the loop, insert the ready row.

    `session` serves short transactions only: the body takes as long as the client makes it."""
    assert settings.datasets_dir is not None
    # A disk that fills up or is read-only mid-way answers 503 once the files are removed.
    with storage_errors(settings):
        check_free_disk(settings.datasets_dir, settings.min_free_disk_bytes)
        await short_transaction(session, check_storage_quota, settings, tenant, 0)
        with request.app.state.upload_slots.hold(tenant.id):
            return await _receive_and_store(request, session, settings, tenant)


async def _receive_and_store(request: Request, session: Session, settings: Settings,
                             tenant: CurrentTenant) -> Dataset:
    dataset_id = new_id("ds")
    incoming = staging_file(settings, dataset_id)
    with upload_lease(settings, dataset_id):
        try:
            upload = await receive_upload(request, incoming, settings.max_upload_bytes, UploadTimeouts.of(settings),
                                          text_fields=("name", DROP_DUPLICATES_FIELD))
            drop_duplicates = drop_duplicates_option(upload.fields)
            # Extraction and decoding are long and CPU-bound: their own limiter keeps uploads from
            # taking every thread that short requests need.
            shown = Path(clean_name(upload.filename or "")).name or "the uploaded file"
            result = await anyio.to_thread.run_sync(ingest_archive, settings, incoming, dataset_id,
                                                    drop_duplicates, shown, limiter=request.app.state.intake_limiter)
        except DataError as exc:
            raise ApiError(422, exc.code, exc.message, exc.details) from None
        finally:
            discard_file(incoming)
        name = clean_name(upload.fields.get("name") or "") or default_dataset_name(upload.filename)
        try:
            await short_transaction(session, check_storage_quota, settings, tenant, result.size_bytes)
            return await short_transaction(session, _insert_ready, tenant, dataset_id, name, result)
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
