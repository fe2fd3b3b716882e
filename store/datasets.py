"""Uploaded datasets: rows plus their extracted files under `<datasets_dir>/<dataset id>/`.

Deleting a dataset and submitting a job on it are both checked under the tenant's lock
(`store.keys.lock_tenant`), so of a delete and a submit racing each other exactly one wins.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.keys import lock_tenant
from store.models import ACTIVE_JOB_STATUSES, PUBLIC_ID, Artifact, Dataset, DatasetStatus, Job, is_public_id
from store.pagination import Page, newest_first_page


def dataset_path(settings: Settings, dataset_id: str) -> Path:
    """The folder that holds everything of one dataset (removed whole on delete)."""
    if not PUBLIC_ID.match(dataset_id):
        raise ValueError(f"not a dataset id: {dataset_id!r}")
    assert settings.datasets_dir is not None
    return settings.datasets_dir / dataset_id


def create_dataset(
    session: Session,
    *,
    dataset_id: str,
    tenant_id: str,
    name: str,
    summary: dict[str, Any],
    path: Path,
    size_bytes: int,
    has_test_split: bool,
    status: str = DatasetStatus.READY,
) -> Dataset:
    """Insert a validated dataset; `summary` has num_classes, classes, splits, per_class, errors and
    optionally warnings, duplicates and test_split."""
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        status=status,
        num_classes=int(summary["num_classes"]),
        classes=list(summary["classes"]),
        splits=dict(summary["splits"]),
        per_class=dict(summary["per_class"]),
        errors=list(summary.get("errors", [])),
        warnings=list(summary.get("warnings", [])),
        duplicates=dict(summary.get("duplicates", {})),
        test_split=dict(summary.get("test_split", {})),
        has_test_split=has_test_split,
        path=str(path),
        size_bytes=size_bytes,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def get_tenant_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    if not is_public_id(dataset_id):
        return None
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


@dataclass(frozen=True)
class StorageUsage:
    """What the tenant storage quota counts:
    extracted datasets and the artifacts of kept, unexpired jobs."""

    dataset_bytes: int
    artifact_bytes: int

    @property
    def total(self) -> int:
        return self.dataset_bytes + self.artifact_bytes


def tenant_storage_usage(session: Session, tenant_id: str) -> StorageUsage:
    """Bytes the tenant keeps on the service's disks; deleting a dataset or a job (or artifact
    expiry) frees them."""
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id, Job.artifacts_expired_at.is_(None))
    )
    return StorageUsage(int(datasets or 0), int(artifacts or 0))


def list_datasets(session: Session, tenant_id: str, *, limit: int = 50, cursor: str | None = None) -> Page[Dataset]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return newest_first_page(session, query, Dataset.created_at, Dataset.id, limit=limit, cursor=cursor)


class DatasetInUse(Exception):
    """A queued or running job uses the dataset: it cannot be deleted until the job ends."""


def dataset_has_active_jobs(session: Session, dataset_id: str) -> bool:
    query = select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)
    return session.scalar(query) is not None


def delete_unused_dataset(session: Session, tenant_id: str, dataset_id: str) -> bool:
    """Delete the tenant's dataset row unless a queued or running job uses it (`DatasetInUse`);
    False when there is no such dataset. Jobs that used it keep their results (dataset_id null).

    Checked under the tenant's lock, as a submit checks the dataset
    (`store.jobs.create_job_if_allowed`): the delete sees the submitted job, or the submit sees
    the dataset gone. The caller removes the files with `remove_dataset_files` after committing,
    so a failed commit never leaves a row whose files are gone.
    """
    if not is_public_id(dataset_id):
        return False
    lock_tenant(session, tenant_id)
    dataset = get_tenant_dataset(session, tenant_id, dataset_id)
    if dataset is None:
        return False
    if dataset_has_active_jobs(session, dataset.id):
        raise DatasetInUse(dataset.id)
    session.delete(dataset)
    session.flush()
    return True


def remove_dataset_files(settings: Settings, dataset_id: str) -> bool:
    """False when the folder could not be removed (a read-only disk): no row owns it any more, so
    the storage sweep removes it once the disk allows."""
    return remove_tree(dataset_path(settings, dataset_id))


def remove_tree(folder: Path) -> bool:
    """Remove a folder if present; quietly, since a half-created folder is exactly what is being
    cleaned. Returns whether it is gone."""
    shutil.rmtree(folder, ignore_errors=True)
    return not os.path.lexists(folder)
