"""Uploads in flight per tenant, and the free disk they need, checked before a byte is stored.

A stored dataset counts against the tenant's quota only once it is extracted, so without a bound on
uploads in flight one tenant could fill the disk with many large uploads at once. The count is kept
per API process.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from api.errors import ApiError
from api.storage_errors import insufficient_storage

UPLOAD_RETRY_AFTER_S = 30


class UploadSlots:
    """`hold(tenant_id)` around an upload: 429 once the tenant has `per_tenant` uploads running."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, tenant_id: str) -> Iterator[None]:
        with self._lock:
            if self.per_tenant and self._running[tenant_id] >= self.per_tenant:
                raise ApiError(429, "too_many_uploads",
                               f"at most {self.per_tenant} uploads per tenant at once; wait for one to finish",
                               {"max_concurrent_uploads_per_tenant": self.per_tenant},
                               headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S)})
            self._running[tenant_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[tenant_id] -= 1
                if self._running[tenant_id] <= 0:
                    del self._running[tenant_id]


def check_free_disk(folder: Path, minimum: int) -> None:
    """503 while the folder's file system has less than `minimum` bytes free (a server state)."""
    if not minimum:
        return
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < minimum:
        raise insufficient_storage({"free_bytes": free})
