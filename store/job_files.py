"""A job's files on disk: its work folder `<jobs_dir>/<job id>/` and its registered artifact files.

Removed when a client deletes the job and when the storage sweep expires its artifacts. Only paths
inside the operator's folders (`jobs_dir`, `artifacts_dir`) are ever removed, whatever an artifact
row says, so a row can never make the service delete anything else. Removal is quiet and idempotent:
a second call (a retried delete, a sweep after a crash) finds less or nothing to do. Folders no row
owns any more are the storage sweep's (`store.folders`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from fd2_config.settings import Settings
from store.datasets import remove_tree
from store.jobs import job_workdir

log = logging.getLogger(__name__)


def _operator_folders(settings: Settings) -> list[Path]:
    return [folder for folder in (settings.jobs_dir, settings.artifacts_dir) if folder is not None]


def _inside(path: Path, folders: Iterable[Path]) -> bool:
    return any(folder in path.parents for folder in folders)


def remove_job_files(settings: Settings, job_id: str, artifact_paths: Iterable[str] = ()) -> bool:
    """Remove the job's work folder and every registered artifact file that lies in the operator's
    folders; False when some could not go (a read-only disk), for the caller to say so."""
    folders = _operator_folders(settings)
    complete = True
    for text in artifact_paths:
        path = Path(text)
        if not _inside(path, folders):
            log.warning("job %s: artifact %s is outside the service's folders; left in place", job_id, path)
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # a folder or unreadable entry: the work folder removal below still runs
            log.warning("job %s: could not remove artifact %s: %s", job_id, path, exc)
            complete = False
    return remove_tree(job_workdir(settings, job_id)) and complete
