"""A job's files on disk: its work folder `<jobs_dir>/<job id>/` and its registered artifact files.

Removed when a client deletes the job and when the storage sweep expires its artifacts. Only paths inside the
operator's folders (`jobs_dir`, `artifacts_dir`) are ever removed, whatever an artifact row says, so a row can
never make the service delete anything else. Removal is quiet and idempotent: a second call (a retried
delete, a sweep after a crash) finds less or nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from fd2_config.settings import Settings
from store.datasets import remove_tree
from store.jobs import job_workdir
from store.models import Job, is_public_id

log = logging.getLogger(__name__)

JOB_FOLDER_PREFIX = "job_"
LOOKUP_BATCH = 500


def _operator_folders(settings: Settings) -> list[Path]:
    return [folder for folder in (settings.jobs_dir, settings.artifacts_dir) if folder is not None]


def _inside(path: Path, folders: Iterable[Path]) -> bool:
    return any(folder in path.parents for folder in folders)


def remove_job_files(settings: Settings, job_id: str, artifact_paths: Iterable[str] = ()) -> None:
    """Remove the job's work folder and every registered artifact file that lies in the operator's folders."""
    folders = _operator_folders(settings)
    for text in artifact_paths:
        path = Path(text)
        if not _inside(path, folders):
            log.warning("job %s: artifact %s is outside the service's folders; left in place", job_id, path)
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a folder or unreadable entry: the work folder removal below still runs
            log.warning("job %s: could not remove artifact %s: %s", job_id, path, exc)
    remove_tree(job_workdir(settings, job_id))


def leftover_job_folders(session: Session, settings: Settings, older_than: datetime) -> list[Path]:
    """Job folders whose job row no longer exists, last changed before `older_than`.

    What a crash between deleting a job's rows and removing its files leaves behind. The age bound keeps a
    submission that is writing its manifest before its row commits (`api.manifest_jobs`) out of reach.
    """
    if settings.jobs_dir is None or not settings.jobs_dir.is_dir():
        return []
    cutoff = older_than.timestamp()
    candidates: dict[str, Path] = {}
    for entry in settings.jobs_dir.iterdir():
        name = entry.name
        if not (name.startswith(JOB_FOLDER_PREFIX) and is_public_id(name)) or not entry.is_dir():
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                candidates[name] = entry
        except OSError:
            continue
    names = sorted(candidates)
    known: set[str] = set()
    for start in range(0, len(names), LOOKUP_BATCH):
        batch = names[start:start + LOOKUP_BATCH]
        known.update(session.scalars(select(Job.id).where(Job.id.in_(batch))))
    return [candidates[name] for name in names if name not in known]

