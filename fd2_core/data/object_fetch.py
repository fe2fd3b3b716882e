"""Fetching a job's admitted objects onto a worker: a bounded pool of streaming downloads through a
local cache, laid out as the files the layout scanner saw at admission.

The cache (`ObjectCache`) keys an object by (endpoint, bucket, key, ETag): a changed object is
another entry, never a stale hit. An entry is written to a temporary name beside it and renamed
when complete, so a SIGKILL leaves at most a temporary file, which never counts as cached and is
removed by a later fetch once it is stale. Its size is capped (least recently used entries go first) and it never
takes the disk below the operator's free-space floor: it evicts first, and refuses
(`insufficient_storage`) when eviction cannot make room. Downloads verify the admitted ETag (the
store answers 412 for another version) and size; a transient failure is retried with backoff
(tenacity, beside boto3's own request retries).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from .object_store import ObjectStore, StoredObject, StoreError
from .object_uris import ObjectUri

PARTIAL_SUFFIX = ".partial"
PARTIAL_STALE_S = 600.0
TRANSIENT_CODES = frozenset({"store_unreachable", "store_error"})
DOWNLOAD_ATTEMPTS = 4


class FetchStopped(Exception):
    """`should_stop()` answered true; the objects fetched so far stay cached."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StoreError):
        return exc.code in TRANSIENT_CODES
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    bytes_done: int
    bytes_total: int
    cached: int

    def message(self) -> str:
        return (f"fetching {self.done:,} / {self.total:,} objects, {self.bytes_done / 1e6:,.1f} of "
                f"{self.bytes_total / 1e6:,.1f} MB ({self.cached:,} from the cache)").replace(",", " ")


class ObjectCache:
    """Objects on local disk under `folder`, at most `max_bytes` in all, never leaving less than
    `min_free_bytes` free on its disk."""

    def __init__(self, folder: Path, max_bytes: int, min_free_bytes: int = 0) -> None:
        self.folder, self.max_bytes, self.min_free_bytes = Path(folder), max_bytes, min_free_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self._reserved = 0  # bytes of downloads in flight, counted against the caps until they land
        self._pinned: dict[Path, int] = {}  # entries being downloaded or linked: never evicted meanwhile

    def path_of(self, endpoint: str, uri: ObjectUri, etag: str) -> Path:
        digest = hashlib.sha256(f"{endpoint}\0{uri.bucket}\0{uri.key}\0{etag}".encode()).hexdigest()
        return self.folder / digest[:2] / digest

    def lookup(self, path: Path) -> bool:
        """Whether the entry is cached; a hit becomes the most recently used."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every complete entry, oldest first; partial files of a killed
        fetch (untouched for `PARTIAL_STALE_S`; a live download writes to its own continuously) are
        removed on the way."""
        found = []
        now = time.time()
        for path in self.folder.glob("*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.name.endswith(PARTIAL_SUFFIX):
                if now - stat.st_mtime > PARTIAL_STALE_S:
                    path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def _fits(self, size: int) -> bool:
        """Evict least recently used entries until `size` more bytes fit both caps, counting the
        downloads in flight; whether they now fit. Called holding the lock."""
        entries = self.entries()
        used = sum(s for _, s, _ in entries) + self._reserved
        entries = [entry for entry in entries if entry[2] not in self._pinned]
        free = shutil.disk_usage(self.folder).free - self._reserved
        while entries and (used + size > self.max_bytes or free - size < self.min_free_bytes):
            _, old_size, old = entries.pop(0)
            old.unlink(missing_ok=True)
            used, free = used - old_size, free + old_size
        return used + size <= self.max_bytes and free - size >= self.min_free_bytes

    def make_room(self, size: int, hold: bool = False) -> None:
        """Make `size` more bytes fit (evicting the least recently used), waiting for downloads in
        flight to land when only they stand in the way; with `hold`, count them as in flight until
        `release(size)`. StoreError `insufficient_storage` when they cannot fit even so."""
        with self._lock:
            while not self._fits(size):
                if not self._reserved:
                    raise StoreError("insufficient_storage", f"the object cache cannot hold {size} more bytes "
                                     f"within its cap ({self.max_bytes} bytes) and the disk's free-space floor; the "
                                     "operator raises the cap or frees disk space")
                self._lock.wait()
            if hold:
                self._reserved += size

    def release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size
            self._lock.notify_all()

    @contextlib.contextmanager
    def using(self, entry: Path, size: int) -> Iterator[bool]:
        """Whether `entry` is cached (a hit becomes the most recently used); when it is not, room for
        its `size` bytes is held until the block ends. The entry is pinned for the block, so another
        download's eviction cannot remove it before it is linked."""
        with self._lock:
            self._pinned[entry] = self._pinned.get(entry, 0) + 1
        held = False
        try:
            hit = self.lookup(entry)
            if not hit:
                self.make_room(size, hold=True)
                held = True
            yield hit
        finally:
            with self._lock:
                self._pinned[entry] -= 1
                if not self._pinned[entry]:
                    del self._pinned[entry]
            if held:
                self.release(size)


def _place(entry: Path, target: Path) -> None:
    """`target` becomes the cached `entry`: a hard link, or a copy across file systems. A target left
    by an interrupted fetch is replaced, or kept when it already is the entry."""
    if target.exists():
        if os.path.samefile(entry, target):
            return
        target.unlink()
    try:
        os.link(entry, target)
    except OSError:  # another file system, or no hard links
        shutil.copyfile(entry, target)


def fetch_objects(
    store: ObjectStore,
    bucket: str,
    objects: list[StoredObject],
    cache: ObjectCache,
    destination: Path,
    relative_paths: list[str],
    *,
    workers: int = 8,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Progress:
    """Every object of `objects` (as admitted: key, size, ETag; in `bucket` unless it names its own) at
    `destination / relative_paths[i]`,
    through the cache, with at most `workers` downloads at once; returns the final progress.

    Raises StoreError (`object_changed` with the key when an object is not the admitted version,
    `insufficient_storage`, the store's refusals) and FetchStopped within one object's download of
    `should_stop()` turning true.
    """
    endpoint = store.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    total_bytes = sum(o.size for o in objects)
    lock = threading.Lock()
    state = {"done": 0, "bytes": 0, "cached": 0}

    def report() -> Progress:
        return Progress(state["done"], len(objects), state["bytes"], total_bytes, state["cached"])

    @retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(DOWNLOAD_ATTEMPTS),
           wait=wait_exponential(multiplier=0.5, max=8), reraise=True)
    def download(item: StoredObject, entry: Path) -> None:
        partial = entry.with_name(entry.name + f".{threading.get_ident()}{PARTIAL_SUFFIX}")
        try:
            with partial.open("wb") as out:
                written = store.download(ObjectUri(item.bucket or bucket, item.key), item.etag, out)
            if written != item.size:
                raise StoreError("object_changed", f"s3://{item.bucket or bucket}/{item.key} has {written} bytes, "
                                 f"not the {item.size} admitted; submit the job again", {"key": item.key})
            partial.chmod(0o444)  # entries are shared by jobs through hard links: read-only
            partial.replace(entry)
        finally:
            partial.unlink(missing_ok=True)

    def one(index: int) -> None:
        if should_stop is not None and should_stop():
            raise FetchStopped()
        item = objects[index]
        entry = cache.path_of(endpoint, ObjectUri(item.bucket or bucket, item.key), item.etag)
        target = destination / relative_paths[index]
        target.parent.mkdir(parents=True, exist_ok=True)
        with cache.using(entry, item.size) as hit:
            if not hit:
                entry.parent.mkdir(parents=True, exist_ok=True)
                download(item, entry)
            _place(entry, target)
        with lock:
            state["done"] += 1
            state["bytes"] += item.size
            state["cached"] += int(hit)
            progress = report()
        if on_progress is not None:
            on_progress(progress)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fd2-fetch") as pool:
        futures = [pool.submit(one, i) for i in range(len(objects))]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in finished if f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            raise failed.exception()  # type: ignore[misc]
    return report()
