"""Uploaded datasets: rows plus their extracted files under `<datasets_dir>/<dataset id>/`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.models import PUBLIC_ID, Artifact, Dataset, DatasetStatus, Job, is_public_id
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


def delete_dataset(session: Session, dataset: Dataset) -> None:
    """Delete the row (jobs that used it keep their results; their dataset_id becomes null).

    The caller removes the files with `remove_dataset_files` after committing, so a failed commit
    never leaves a row whose files are gone.
    """
    session.delete(dataset)
    session.flush()


def remove_dataset_files(settings: Settings, dataset_id: str) -> None:
    remove_tree(dataset_path(settings, dataset_id))


def remove_tree(folder: Path) -> None:
    """Remove a folder if present;
    quietly, since a half-created folder is exactly what is being cleaned."""
    shutil.rmtree(folder, ignore_errors=True)
