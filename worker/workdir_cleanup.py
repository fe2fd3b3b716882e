"""Free a job's disk space once it can never run again.

Checkpoints under `<workdir>/stages` exist only so an interrupted run can resume. A finished job never runs
again (a late duplicate message is skipped), so after success only `<workdir>/artifacts` is kept (the
registered files; checkpoints such as the teacher and soft labels were copied there), and a cancelled or
failed job's folder is removed whole. The worker log keeps the reason of a failure.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "stages"


def prune_checkpoints(workdir: Path) -> None:
    """Keep the artifacts of a succeeded job, drop its resumable state."""
    _remove(workdir / CHECKPOINTS_DIR)


def discard_workdir(workdir: Path) -> None:
    """Remove everything a cancelled or failed job left behind."""
    _remove(workdir)


def _remove(path: Path) -> None:
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("could not remove %s completely", path)
