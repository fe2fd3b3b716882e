"""A full or read-only disk is the server's state, not the client's fault: one 503 for all of it.

Every place the API writes a file (upload staging, extraction, a job's manifest) runs under
`storage_errors`, which turns the OSErrors of a disk that cannot take the write into 503
`insufficient_storage` + `Retry-After`, the answer the free-disk check gives before an upload: a
client retries later instead of being blamed (400) or seeing a 500. The caller's own clean-up runs
first (the exception passes through its `finally`), so nothing half-written stays. Permission
errors count only on the service's own folders: elsewhere (a manifest's data root) they are not
a storage state.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from api.errors import ApiError
from api.schemas import DeletionPending
from fd2_config.settings import Settings

STORAGE_RETRY_AFTER_S = 30
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM})


def insufficient_storage(details: Any = None) -> ApiError:
    """The one 503 for a disk that cannot take the service's writes (short of space, full,
    read-only)."""
    return ApiError(503, "insufficient_storage", "the service is short of disk space; try again later",
                    details, headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)})


def _service_folders(settings: Settings) -> list[Path]:
    return [folder for folder in (settings.home, settings.datasets_dir, settings.jobs_dir, settings.artifacts_dir)
            if folder is not None]


def _inside_service_folders(filename: object, settings: Settings | None) -> bool:
    if settings is None or not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(filename)).absolute()
    return any(path == folder or folder in path.parents for folder in _service_folders(settings))


def is_storage_error(exc: BaseException, settings: Settings | None = None) -> bool:
    """True for an OSError saying the disk cannot take a write: full, over quota, read-only, or
    not writable where the service's own folders are (`settings` given)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in FULL_OR_READ_ONLY:
        return True
    return exc.errno in NOT_PERMITTED and _inside_service_folders(exc.filename, settings)


def storage_refusal(exc: OSError) -> ApiError:
    """503 naming the cause (never a server path: error bodies carry none)."""
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    return insufficient_storage({"cause": name, "reason": os.strerror(exc.errno or errno.EIO)})


@contextmanager
def storage_errors(settings: Settings) -> Iterator[None]:
    """Turn storage OSErrors raised in the block into 503 `insufficient_storage`."""
    try:
        yield
    except OSError as exc:
        if is_storage_error(exc, settings):
            raise storage_refusal(exc) from None
        raise


def deletion_pending(resource_id: str, what: str) -> JSONResponse:
    """202 for a delete that is done for the client (gone from reads and listings, out of the quota)
    while its files wait for the storage sweep, since the disk refused to remove them now."""
    body = DeletionPending(id=resource_id, message=f"{what} deleted; its files could not be removed now (the "
                           "storage is read-only or unavailable) and are removed by the storage sweep later")
    return JSONResponse(body.model_dump(), status_code=202)


DELETE_PENDING_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {"model": DeletionPending, "description": "Deleted; its files are removed later by the storage sweep"},
}


async def storage_error_response(request: Request, exc: Exception) -> JSONResponse:
    """Backstop for a write no `storage_errors` block covers: storage OSErrors answer 503, others
    stay unexpected (500)."""
    from api.errors import error_response, unexpected_error

    assert isinstance(exc, OSError)
    if not is_storage_error(exc, getattr(request.app.state, "settings", None)):
        return await unexpected_error(request, exc)
    refusal = storage_refusal(exc)
    return error_response(refusal.status_code, refusal.code, refusal.message, refusal.details, refusal.headers)
