"""One line instead of a traceback when the service's disk cannot take a write.

A full, read-only or unwritable home is the operator's to fix, like a bad argument: the service
commands (`serve`, `worker`, `keys`, `migrate`) exit 2 with one line that names the folder and the
cause. The database's own words for it (SQLite's "readonly database") are recognised too, since
SQLite reports a read-only folder that way rather than as an OSError.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# SQLite's messages for a database file it cannot write, and what each means.
SQLITE_CAUSES = {
    "readonly database": "read-only file system or database file",
    "unable to open database file": "cannot create or open the database file",
    "database or disk is full": "no space left on device",
}
FIX = "free space or make it writable (or choose another --home), then run the command again"


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _sqlite_folder(database_url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).expanduser().absolute().parent


def storage_problem(exc: BaseException, database_url: str | None) -> str | None:
    """The one line for `exc` when it says the disk cannot take a write; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        cause = f"{os.strerror(exc.errno or 0).lower()} ({errno.errorcode.get(exc.errno or 0, '?')})"
        where = f" {_folder_of(Path(os.fsdecode(exc.filename)))}" if exc.filename else ""
        return f"cannot write to{where}: {cause}; {FIX}"
    text = str(getattr(exc, "orig", "") or "").lower()
    cause = next((why for words, why in SQLITE_CAUSES.items() if words in text), None)
    if cause is None or database_url is None:
        return None
    folder = _sqlite_folder(database_url)
    if folder is None:
        return None
    return f"cannot write the database in {folder}: {cause}; {FIX}"
