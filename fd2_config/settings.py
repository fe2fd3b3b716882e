"""The service's one settings object, read from `FD2_*` environment variables.

Everything has an embedded default (a SQLite file, a broker made of folders, data under one home
folder), so a single machine runs the whole service with no servers; Redis, PostgreSQL and remote
workers are a matter of setting URLs. Reading the settings creates nothing: the API and the worker
call `ensure_dirs()` when they start.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fd2_config.queues import GPU_QUEUE

EMBEDDED_BROKER_URL = "filesystem://localhost/"
GIB = 1024**3


def _split_list(value: Any) -> Any:
    """A JSON list or a comma-separated string: operators write both in environment files."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by the API, the worker and the CLI (environment prefix `FD2_`)."""

    model_config = SettingsConfigDict(env_prefix="FD2_", extra="ignore")

    home: Path = Field(Path("./.fd2"), description="Folder holding the embedded database, broker and data.")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite file `<home>/fd2.db`.")
    broker_url: str = Field("", description="Celery broker URL; empty = the embedded folder broker under home.")
    broker_visibility_timeout_s: int = Field(
        12 * 3600, ge=60, description="Redis: seconds before an unacknowledged job message is redelivered."
    )
    artifacts_dir: Path | None = Field(None, description="Long-lived artifact storage; default `<home>/artifacts`.")
    datasets_dir: Path | None = Field(None, description="Extracted uploaded datasets; default `<home>/datasets`.")
    jobs_dir: Path | None = Field(None, description="Per-job working folders; default `<home>/jobs`.")
    object_cache_dir: Path | None = Field(
        None, description="Objects fetched from the object store for jobs on s3:// data; default `<home>/object-cache`."
    )
    object_cache_max_bytes: int = Field(
        50 * GIB, ge=1, description="Largest size of the object cache; least recently used objects are evicted."
    )
    s3_endpoint_url: str = Field(
        "", description="S3-compatible endpoint for datasets by reference; empty = the standard AWS chain "
        "(`AWS_ENDPOINT_URL`, else AWS's own). Credentials always come from that chain.",
    )
    fetch_concurrency: int = Field(8, ge=1, le=128, description="Object downloads one worker runs at once.")

    max_upload_bytes: int = Field(2 * GIB, ge=1, description="Largest accepted dataset upload (413 past it).")
    max_json_body_bytes: int = Field(
        64 * 1024**2, ge=1024, description="Largest JSON request body (a job with a long manifest); 413 past it."
    )
    max_extracted_bytes: int = Field(8 * GIB, ge=1, description="Largest total size of an extracted archive.")
    max_archive_members: int = Field(500_000, ge=1, description="Most files an uploaded archive may hold.")
    max_compression_ratio: float = Field(
        200.0, gt=1.0, description="Most extracted bytes per archive byte (zip bombs), judged past the grace size."
    )
    compression_ratio_grace_bytes: int = Field(
        64 * 1024**2, ge=0, description="Extracted bytes below which the compression ratio is not judged."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Most pixels (width x height, read from the header) of one image."
    )
    max_classes: int = Field(5_000, ge=2, description="Most classes a dataset may have.")
    max_manifest_rows: int = Field(500_000, ge=1, description="Most rows of a manifest (uploaded or in a job).")
    max_manifest_bytes: int = Field(256 * 1024**2, ge=1, description="Largest manifest file inside an upload.")
    max_concurrent_uploads_per_tenant: int = Field(
        2, ge=0, description="Uploads one tenant may stream at once per API process (0 = unlimited); 429 past it."
    )
    upload_body_timeout_s: float = Field(
        3600.0, gt=0.0,
        description="Seconds an upload's whole body may take to arrive; past it the upload answers 408 "
        "`upload_timeout`, its slot is free and nothing stays on disk. Also the storage sweep's grace for "
        "upload staging files (a live upload's is never older).",
    )
    upload_stall_timeout_s: float = Field(
        60.0, gt=0.0,
        description="Seconds an upload may send no body bytes at all; past it the upload answers 408 "
        "`upload_timeout`, as for the body timeout.",
    )
    min_free_disk_bytes: int = Field(
        1 * GIB, ge=0, description="Uploads are refused (503) while the datasets folder has less free space."
    )
    max_tenant_storage_bytes: int = Field(
        100 * GIB, ge=0,
        description="Bytes a tenant may keep: extracted datasets plus the artifacts of its jobs that are neither "
        "deleted nor expired (0 = unlimited); an upload past it answers 413.",
    )
    artifact_retention_days: float | None = Field(
        None, gt=0.0,
        description="Days after a job finished when the workers' storage sweep removes its artifact files and work "
        "folder (the job stays, with `artifacts_expired: true`; downloads answer 410); unset = kept until deleted.",
    )
    storage_sweep_interval_s: float = Field(
        3600.0, gt=0.0,
        description="Seconds between a worker's storage sweeps (artifact retention; files and folders no row or "
        "live upload owns: staging files, half-extracted datasets, job folders).",
    )
    max_job_cost: float = Field(
        1e12, gt=0.0, description="Largest estimated job cost in 32-px image passes (fd2_core.cost); 422 past it."
    )
    max_dataset_memory_bytes: int = Field(
        64 * GIB, ge=1, description="Largest decoded dataset (images x side² x 3 bytes) a job may load."
    )
    dataset_test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Held-out test share carved per class when an upload has no test split."
    )
    max_concurrent_intakes: int = Field(
        2, ge=1, description="Uploads extracted and validated at once per API process (others wait)."
    )
    allowed_data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders that manifest jobs may read from (empty = manifests refused)."
    )
    callback_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts a job's callback_url may point to: `host`, `host:port` or `.domain` (empty = none).",
    )
    default_queue: str = Field(GPU_QUEUE, description="Queue for jobs whose spec device is `auto`.")
    public_base_url: str = Field("", description="Prefix for artifact URLs in responses (empty = path only).")

    page_size_default: int = Field(50, ge=1, description="Items per page when a list call names no limit.")
    page_size_max: int = Field(200, ge=1, description="Largest accepted `limit` of a list call.")
    max_active_jobs_per_tenant: int = Field(
        1000, ge=0, description="Queued + running jobs a tenant may have at once (0 = unlimited); 429 past it."
    )
    max_shards_per_tenant: int = Field(
        0, ge=0, description="Shards of sharded jobs (spec max_workers > 1) one tenant may have running or waiting "
        "in the broker at once, across its jobs (0 = no cap); the rest wait for a free slot.",
    )
    rate_limit_per_minute: float = Field(
        1200.0, ge=0.0, description="Requests per minute one API key may make, per API process (0 = off); 429."
    )
    rate_limit_burst: int = Field(
        300, ge=1, description="Requests one API key may make at once before the per-minute rate applies."
    )
    auth_cache_ttl_s: float = Field(
        3.0, ge=0.0, description="Seconds an authenticated key is trusted without a database look-up."
    )
    readiness_timeout_s: float = Field(2.0, gt=0.0, description="Budget of each /readyz dependency check.")
    event_stream_poll_s: float = Field(
        1.0, gt=0.0, description="Seconds between database reads of an open job event stream (text/event-stream)."
    )
    event_stream_ping_s: float = Field(
        15.0, gt=0.0, description="Seconds between heartbeat comments on an idle event stream (keeps proxies open)."
    )
    stale_heartbeat_s: float = Field(
        300.0, gt=0.0, description="A running job whose worker was silent this long counts as abandoned."
    )
    job_soft_time_limit_s: float = Field(
        3 * 24 * 3600.0, gt=0.0,
        description="Seconds a job may run before the worker asks it to stop (it saves what is finished).",
    )
    job_time_limit_s: float | None = Field(
        None, gt=0.0, description="Seconds after which the job's process is killed; default: the soft limit + 10 min.",
    )
    database_retry_s: float = Field(
        300.0, ge=0.0,
        description="Seconds a worker keeps retrying a job's database writes through an outage (restart, failover).",
    )

    @field_validator("allowed_data_roots", "callback_allow_hosts", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("artifact_retention_days", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`FD2_ARTIFACT_RETENTION_DAYS=` (empty, as environment files write "off") keeps artifacts
        forever."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        # Absolute paths, so a worker started from another directory still finds the same files.
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'fd2.db'}"
        if not self.broker_url:
            self.broker_url = EMBEDDED_BROKER_URL
        self.artifacts_dir = (self.artifacts_dir or self.home / "artifacts").expanduser().resolve()
        self.datasets_dir = (self.datasets_dir or self.home / "datasets").expanduser().resolve()
        self.jobs_dir = (self.jobs_dir or self.home / "jobs").expanduser().resolve()
        self.object_cache_dir = (self.object_cache_dir or self.home / "object-cache").expanduser().resolve()
        self.allowed_data_roots = [Path(p).expanduser().resolve() for p in self.allowed_data_roots]
        self.callback_allow_hosts = [h.lower() for h in self.callback_allow_hosts]
        return self

    def data_limit_values(self) -> dict[str, Any]:
        """Keyword arguments of `fd2_core.data.limits.DataLimits`, so the API and the worker apply
        the same bounds."""
        return {
            "max_files": self.max_archive_members,
            "max_total_uncompressed_bytes": self.max_extracted_bytes,
            "max_compression_ratio": self.max_compression_ratio,
            "ratio_grace_bytes": self.compression_ratio_grace_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_classes": self.max_classes,
            "max_manifest_rows": self.max_manifest_rows,
            "max_manifest_bytes": self.max_manifest_bytes,
        }

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        """Where the embedded broker keeps its message files."""
        return self.home / "broker"

    def ensure_dirs(self) -> None:
        """Create the folders the service writes to (idempotent)."""
        for folder in (self.home, self.artifacts_dir, self.datasets_dir, self.jobs_dir):
            assert folder is not None
            folder.mkdir(parents=True, exist_ok=True)
        if self.uses_embedded_broker:
            for sub in ("queue", "control", "claimed"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests change the environment and call
    `get_settings.cache_clear()`."""
    return Settings()
