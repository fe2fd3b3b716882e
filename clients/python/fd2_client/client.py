"""`Client`: the service's REST API as Python calls (datasets, jobs, events, artifacts).

Every call raises a typed error from `fd2_client.errors` (`NotFound`, `Conflict`,
`ValidationFailed`, `RateLimited`, `Unauthorized`, … all `ApiError`; `ConnectionFailed` when the
service stays unreachable after the retries). Resources come back as the JSON dicts of the REST
contract.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from fd2_client.downloads import ByteProgress, download_verified
from fd2_client.errors import JobCancelled, JobFailed, WaitTimeout
from fd2_client.events import JobWatcher, poll_events
from fd2_client.resources import FINAL_STATUSES, Dataset, Event, Job, Progress, id_of
from fd2_client.retries import OnRetry, RetryPolicy
from fd2_client.transport import DEFAULT_TIMEOUT_S, Transport
from fd2_client.uploads import CountingReader, media_type, upload_file

IDEMPOTENCY_HEADER = "Idempotency-Key"


class Client:
    """A connection to the service at `url` (e.g. `http://127.0.0.1:8000`) with the API key `key`.

    `url` is the service's root (a trailing `/v1` is dropped; no scheme, no host or a
    `user:password@` is a ValueError at once). `key` loses surrounding whitespace (a key read from a
    file ends in a newline); one a header cannot carry (inner whitespace, control or non-ASCII
    characters) is a ValueError at once, and no error text or repr ever shows the key. `timeout`
    (seconds) bounds each connect/read/write; `retry` says how often and how long to retry (see
    `fd2_client.retries`), and `on_retry(error, wait_s, attempt)` hears of each retry before its
    wait; `poll_interval` (seconds) paces `wait` where the service offers no event stream
    (`use_event_stream=False` always polls). Use it as a context manager, or call `close()`.
    """

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 poll_interval: float = 1.0, use_event_stream: bool = True, on_retry: OnRetry | None = None) -> None:
        self.transport = Transport(url, key, timeout=timeout, retry=retry, on_retry=on_retry)
        self.poll_interval = poll_interval
        self.use_event_stream = use_event_stream

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    # ---------------------------------------------------------------- datasets

    def upload_dataset(self, path_or_folder: str | Path, name: str | None = None,
                       on_progress: ByteProgress | None = None, drop_duplicates: bool = False) -> Dataset:
        """Upload a folder (zipped into a temporary file first) or a .zip/.tar/.tar.gz archive.

        `on_progress(bytes sent, bytes in all)` follows the upload; `name` defaults to the folder's
        name (the archive's file name for an archive); `drop_duplicates` drops repeated images and
        test images that occur in train. Answers the validated dataset. Raises `ValidationFailed`
        (unusable data, with the reasons in `details`), `PayloadTooLarge`, `RateLimited`,
        FileNotFoundError/ValueError for a bad local path. Not retried once the body was sent (an
        upload has no idempotency key).
        """
        source = Path(path_or_folder)
        fields = {"drop_duplicates": "true" if drop_duplicates else "false"}
        if name or source.is_dir():
            fields["name"] = name or source.resolve().name
        with upload_file(source) as archive, archive.open("rb") as handle:
            filename = f"{source.name}.zip" if source.is_dir() else source.name
            reader = CountingReader(handle, archive.stat().st_size, on_progress)
            files = {"file": (filename, reader, media_type(archive))}
            response = self.transport.request("POST", "/v1/datasets", idempotent=False, files=files, data=fields)
        return cast(Dataset, response.json())

    def get_dataset(self, dataset: str | Mapping[str, Any]) -> Dataset:
        """The dataset resource; `NotFound` for an unknown id."""
        return cast(Dataset, self.transport.request("GET", f"/v1/datasets/{_segment(id_of(dataset))}").json())

    def iter_datasets(self, page_size: int | None = None) -> Iterator[Dataset]:
        """Every dataset of the tenant, newest first, page after page (`page_size` items per
        request)."""
        return self._pages("/v1/datasets", {"limit": page_size})

    def delete_dataset(self, dataset: str | Mapping[str, Any]) -> None:
        """Delete a dataset and its files; `Conflict` while a queued or running job uses it."""
        self.transport.request("DELETE", f"/v1/datasets/{_segment(id_of(dataset))}")

    # ---------------------------------------------------------------- jobs

    def submit(self, dataset: str | Mapping[str, Any], spec: Mapping[str, Any] | None = None,
               idempotency_key: str | None = None, callback_url: str | None = None) -> Job:
        """Queue a distillation job on `dataset` (an id, a dataset resource, a `{"manifest": …}`
        reference, or an `s3://bucket/prefix/` the operator granted the tenant).

        `spec` is a partial spec (`preset` plus overrides). An `Idempotency-Key` is always sent (a
        new uuid4 unless given), so a submit retried after a lost answer gets the first job back,
        never a second one. Raises `ValidationFailed` for a spec or dataset that cannot run,
        `Conflict` for a key reused with another body, `NotFound` for an unknown dataset,
        `RateLimited` past the tenant's active-job cap.
        """
        body: dict[str, Any] = {"dataset": _dataset_ref(dataset), "spec": dict(spec or {})}
        if callback_url is not None:
            body["callback_url"] = callback_url
        headers = {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}
        response = self.transport.request("POST", "/v1/jobs", idempotent=True, json=body, headers=headers)
        return cast(Job, response.json())

    def get_job(self, job: str | Mapping[str, Any]) -> Job:
        """The job resource (status, stage, progress, ETA, metrics, artifacts); `NotFound` for an
        unknown id."""
        return cast(Job, self.transport.request("GET", _job_path(job)).json())

    def iter_jobs(self, status: str | None = None, page_size: int | None = None) -> Iterator[Job]:
        """Every job of the tenant (only those in `status` when given), newest first, page after
        page."""
        return self._pages("/v1/jobs", {"status": status, "limit": page_size})

    def cancel(self, job: str | Mapping[str, Any]) -> Job:
        """Ask a queued or running job to stop (it is `cancelled` within seconds); `Conflict` once
        finished."""
        return cast(Job, self.transport.request("POST", f"{_job_path(job)}/cancel", idempotent=True).json())

    def delete(self, job: str | Mapping[str, Any]) -> None:
        """Delete a finished job with its artifacts and work folder; `Conflict` while it is queued
        or running."""
        self.transport.request("DELETE", _job_path(job))

    def events(self, job: str | Mapping[str, Any], after: int | None = None) -> list[Event]:
        """The job's events so far (above event id `after`), oldest first."""
        return poll_events(self.transport, _segment(id_of(job)), after)

    def wait(self, job: str | Mapping[str, Any], on_progress: Callable[[Progress], None] | None = None,
             timeout: float | None = None) -> Job:
        """Follow the job until it ends and answer its final resource when it `succeeded`.

        `on_progress(Progress)` is called on every change (stage, fractions, ETA, events). Follows
        the event stream and polls where there is none. Raises `JobFailed` / `JobCancelled` (with
        the job and its `error`), `WaitTimeout` after `timeout` seconds with the job still active.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.get_job(job)
        watcher = JobWatcher(self.transport, current, poll_interval=self.poll_interval,
                             use_stream=self.use_event_stream, deadline=deadline, sleep=time.sleep)
        if on_progress is not None:
            on_progress(watcher.progress)
        try:
            while current["status"] not in FINAL_STATUSES:
                for update in watcher.updates():
                    if on_progress is not None:
                        on_progress(update)
                current = self.get_job(current)
                if current["status"] not in FINAL_STATUSES:
                    watcher.resume(current)
        except TimeoutError:
            raise WaitTimeout(self.get_job(current), timeout or 0.0) from None
        if current["status"] == "failed":
            raise JobFailed(current)
        if current["status"] == "cancelled":
            raise JobCancelled(current)
        return current

    # ---------------------------------------------------------------- artifacts

    def download(self, job: str | Mapping[str, Any], name: str, dest: str | Path,
                 on_progress: ByteProgress | None = None) -> Path:
        """Download artifact `name` of `job` to `dest` (a file path, or a folder to put `name` in).

        Resumes a `dest.part` left by an interrupted download (`Range`), verifies the SHA-256
        against the job resource's and renames the file into place atomically. `on_progress(bytes,
        bytes in all)`. Raises `ChecksumMismatch` (no file left), `NotFound` for an unknown job or
        artifact, `Gone` for artifacts removed after the operator's retention period.
        """
        resource = job if isinstance(job, Mapping) and "artifacts" in job else self.get_job(job)
        target = Path(dest)
        if target.is_dir():
            target = target / _file_name(name)
        known = {a["name"]: a for a in resource.get("artifacts") or []}.get(name, {})
        return download_verified(self.transport, f"{_job_path(resource)}/artifacts/{_segment(name)}", target,
                                 sha256=known.get("sha256"), size=known.get("size"), on_progress=on_progress)

    def download_all(self, job: str | Mapping[str, Any], folder: str | Path,
                     on_progress: Callable[[str, int, int | None], None] | None = None) -> dict[str, Path]:
        """Download every artifact of `job` into `folder` (created if missing), each verified as in
        `download`.

        `on_progress(name, bytes, bytes in all)`; answers `{name: path}`.
        """
        resource = self.get_job(job)
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        paths = {}
        for artifact in resource.get("artifacts") or []:
            name = artifact["name"]
            report = None if on_progress is None else _named(on_progress, name)
            paths[name] = self.download(resource, name, target / _file_name(name), on_progress=report)
        return paths

    # ---------------------------------------------------------------- shared

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[Any]:
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            page = self.transport.request("GET", path, params=query).json()
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]


def _dataset_ref(dataset: str | Mapping[str, Any]) -> dict[str, Any]:
    """`{"id": …}`, or a `{"manifest": …}` / `{"uri": …}` reference as given; an `s3://` string is a
    reference by uri."""
    if isinstance(dataset, Mapping) and "manifest" in dataset:
        return {"manifest": dataset["manifest"]}
    if isinstance(dataset, Mapping) and "uri" in dataset and "id" not in dataset:
        return {"uri": dataset["uri"]}
    if isinstance(dataset, str) and dataset.startswith("s3://"):
        return {"uri": dataset}
    return {"id": id_of(dataset)}


def _job_path(job: str | Mapping[str, Any]) -> str:
    return f"/v1/jobs/{_segment(id_of(job))}"


def _segment(text: str) -> str:
    return quote(text, safe="")


def _file_name(name: str) -> str:
    """An artifact name as a local file name; a name with a path in it is refused (ValueError)."""
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"artifact name {name!r} is not a plain file name")
    return name


def _named(on_progress: Callable[[str, int, int | None], None], name: str) -> ByteProgress:
    return lambda done, total: on_progress(name, done, total)
