"""Every file and folder the service writes, who owns each, and what the storage sweep may remove.

- `<datasets_dir>/.incoming/<dataset id>.upload`: an upload's body (its staging file); owned by the
  request's lease.
- `<datasets_dir>/.incoming/<dataset id>.lease`: the request's lease; owned by the request.
- `<datasets_dir>/<dataset id>/`: a dataset being extracted, or stored; owned by its row, or by the
  lease while it is extracted.
- `<jobs_dir>/<job id>/`: a job's work folder and artifacts; owned by its row.

An upload takes its lease (an exclusive `flock` on the lease file) before it writes anything and
gives it back only once its row is committed or its files are removed, so the lease tells a live
request from one that died, at once: the kernel drops a dead process's locks. A crash (SIGKILL,
power loss) skips every clean-up, which is why the sweep, not the request, is the last owner of
these paths. Ages are a second rule, for file systems whose locks do not reach another host: a live
upload's staging file is never older than the body timeout (the timeout ends it), and a folder gets
the sweep's folder grace. Only names of the service's own shape are ever touched.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.models import Dataset, Job, is_public_id

UPLOADS_DIR = ".incoming"  # the dot keeps it apart from dataset ids
STAGING_SUFFIX = ".upload"
LEASE_SUFFIX = ".lease"
DATASET_PREFIX = "ds_"
JOB_PREFIX = "job_"
LOOKUP_BATCH = 500


def _uploads_dir(settings: Settings) -> Path:
    assert settings.datasets_dir is not None
    return settings.datasets_dir / UPLOADS_DIR


def staging_file(settings: Settings, dataset_id: str) -> Path:
    """Where an upload's body is streamed before extraction."""
    return _uploads_dir(settings) / f"{dataset_id}{STAGING_SUFFIX}"


def lease_file(settings: Settings, dataset_id: str) -> Path:
    return _uploads_dir(settings) / f"{dataset_id}{LEASE_SUFFIX}"


@contextmanager
def upload_lease(settings: Settings, dataset_id: str) -> Iterator[None]:
    """Hold the upload's lease for the block; the block must leave a committed row or nothing."""
    path = lease_file(settings, dataset_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        # before the lock goes: a sweep that locks it after this finds the row, or nothing
        try:
            discard_file(path)
        finally:
            os.close(descriptor)


def discard_file(path: Path) -> bool:
    """Remove a file if present; False when the disk refuses (read-only): the sweep removes it
    later, and the caller's own answer is not replaced by a clean-up's error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


@contextmanager
def lease_if_free(settings: Settings, dataset_id: str) -> Iterator[bool]:
    """False while a live request holds the upload's lease; else True, with the lease held by the
    caller (or no lease file at all) for the block."""
    try:
        descriptor = os.open(lease_file(settings, dataset_id), os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


@dataclass
class Leftover:
    """What one dataset or job id has on disk past its grace: files no row owns (staging and lease)
    and the folder its row would own."""

    owner: str
    files: list[Path] = field(default_factory=list)
    folder: Path | None = None

    @property
    def is_dataset(self) -> bool:
        return self.owner.startswith(DATASET_PREFIX)


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except OSError:  # gone meanwhile: nothing to remove
        return False


def _own_name(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and is_public_id(name)


def stale_paths(settings: Settings, now: datetime, upload_grace_s: float, folder_grace_s: float) -> list[Leftover]:
    """Upload files last written more than `upload_grace_s` before `now` and dataset and job folders
    last changed more than `folder_grace_s` before it, by owner id; leases and rows are not looked
    at here."""
    found: dict[str, Leftover] = {}
    uploads_cutoff = now.timestamp() - upload_grace_s
    folders_cutoff = now.timestamp() - folder_grace_s
    uploads = _uploads_dir(settings)
    for entry in sorted(uploads.iterdir()) if uploads.is_dir() else []:
        owner, _, suffix = entry.name.partition(".")
        if (f".{suffix}" in (STAGING_SUFFIX, LEASE_SUFFIX) and _own_name(owner, DATASET_PREFIX)
                and _modified_before(entry, uploads_cutoff)):
            found.setdefault(owner, Leftover(owner)).files.append(entry)
    for parent, prefix in ((settings.datasets_dir, DATASET_PREFIX), (settings.jobs_dir, JOB_PREFIX)):
        if parent is None or not parent.is_dir():
            continue
        for entry in sorted(parent.iterdir()):
            if _own_name(entry.name, prefix) and entry.is_dir() and _modified_before(entry, folders_cutoff):
                found.setdefault(entry.name, Leftover(entry.name)).folder = entry
    return [found[owner] for owner in sorted(found)]


def owners_with_rows(session: Session, owners: Iterable[str]) -> set[str]:
    """The dataset and job ids among `owners` that have a row."""
    names = sorted(set(owners))
    known: set[str] = set()
    for model, prefix in ((Dataset, DATASET_PREFIX), (Job, JOB_PREFIX)):
        ids = [name for name in names if name.startswith(prefix)]
        for start in range(0, len(ids), LOOKUP_BATCH):
            known.update(session.scalars(select(model.id).where(model.id.in_(ids[start:start + LOOKUP_BATCH]))))
    return known
