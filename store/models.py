"""Database tables of the service (SQLAlchemy 2.0 typed declarative).

Schema changes go through Alembic (`store/migrations`); these classes and the latest revision must
agree (a test compares them).
"""

from __future__ import annotations

import re
import secrets
import sys
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 lacks it; members then print and format as their value, as on 3.11

    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__


class DatasetStatus(StrEnum):
    """Where an uploaded dataset stands: scanned on upload, then usable by jobs or refused."""

    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


class JobStatus(StrEnum):
    """A job's life: `queued` → `running` → one final status (docs/API.md "Jobs").

    Every change of a job's status is written in `store/job_states.py`.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED_JOB_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class ShardStatus(StrEnum):
    """A unit of a job spread over several workers (spec `max_workers` > 1).

    `dispatched` means its `fd2.run_shard` message is in the broker.
    See docs/ARCHITECTURE.md "One job on many workers".
    """

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_SHARD_STATUSES = (ShardStatus.DISPATCHED, ShardStatus.RUNNING)
WAITING_SHARD_STATUSES = (ShardStatus.QUEUED, ShardStatus.DISPATCHED)
FINAL_SHARD_STATUSES = (ShardStatus.DONE, ShardStatus.FAILED, ShardStatus.CANCELLED)


class EventKind(StrEnum):
    """Kinds of job events the service itself writes (docs/API.md, docs/INTERFACES.md).

    A job's final event shares its spelling with the final status, so it has a name of its own.
    The pipeline's kinds (`progress`, `log`, `stage_start`, …) pass through as the pipeline wrote
    them.
    """

    JOB_QUEUED = "queued"
    STARTED = "started"
    LOG = "log"
    REQUEUED = "requeued"
    TAKEOVER = "takeover"
    CANCEL_REQUESTED = "cancel_requested"
    CALLBACK = "callback"
    JOB_SUCCEEDED = "succeeded"
    JOB_FAILED = "failed"
    JOB_CANCELLED = "cancelled"
    SHARDED = "sharded"
    SHARD_STARTED = "shard_started"
    SHARD_FINISHED = "shard_finished"
    SHARD_FAILED = "shard_failed"
    SHARD_CANCELLED = "shard_cancelled"
    SHARD_REQUEUED = "shard_requeued"
    SHARD_TAKEOVER = "shard_takeover"


FINAL_EVENT_KINDS = {
    JobStatus.SUCCEEDED: EventKind.JOB_SUCCEEDED,
    JobStatus.FAILED: EventKind.JOB_FAILED,
    JobStatus.CANCELLED: EventKind.JOB_CANCELLED,
}
SHARD_END_EVENT_KINDS = {
    ShardStatus.DONE: EventKind.SHARD_FINISHED,
    ShardStatus.FAILED: EventKind.SHARD_FAILED,
    ShardStatus.CANCELLED: EventKind.SHARD_CANCELLED,
}


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# 64-bit on servers; SQLite only auto-increments a column declared exactly INTEGER.
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


PUBLIC_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_id(prefix: str) -> str:
    """An unguessable public id (`ds_…`, `job_…`): 128 random bits, URL-safe."""
    return f"{prefix}_{secrets.token_hex(16)}"


def is_public_id(text: str) -> bool:
    """Whether `text` can be an id at all; anything else is unknown without asking the database
    (which may refuse odd characters such as NUL with an error instead of an empty answer)."""
    return isinstance(text, str) and PUBLIC_ID.fullmatch(text) is not None


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the Python side on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's key: only a display prefix and the SHA-256 of the whole key are stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class DataUriGrant(Base):
    """A bucket or prefix one tenant's jobs may read (`s3://bucket/prefix`); none means none
    (docs/SECURITY.md)."""

    __tablename__ = "data_uri_grants"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    uri: Mapped[str] = mapped_column(String(1100), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=DatasetStatus.VALIDATING)
    num_classes: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[list[Any]] = mapped_column(default=list)
    splits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    per_class: Mapped[dict[str, Any]] = mapped_column(default=dict)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    # Intake findings that did not stop the upload
    # (e.g. file names decoded from a guessed code page).
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    # Duplicate images per split and test images that also occur in train (decoded-pixel hashes).
    duplicates: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Where the test split comes from:
    # {"source": "archive" | "carved" | "none", "fraction": float | None}.
    test_split: Mapped[dict[str, Any]] = mapped_column(default=dict)
    has_test_split: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(Text, default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True, default=None
    )
    manifest_path: Mapped[str | None] = mapped_column(Text, default=None)
    # the s3:// prefix a job's data was admitted from; its objects (keys, sizes, ETags) are listed in
    # the job's `objects.json` at `manifest_path`
    dataset_uri: Mapped[str | None] = mapped_column(Text, default=None)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage_progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    queue: Mapped[str] = mapped_column(String(64), default="fd2.gpu")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    callback_url: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set by the storage sweep once the artifact files of a finished job are removed for age; the
    # artifact rows stay as a record (name, size, sha256) and downloads answer 410.
    artifacts_expired_at: Mapped[datetime | None] = mapped_column(default=None)
    # True once the job was split into shards (`job_shards`); `shards` is their summary as the job
    # resource shows it, rewritten with every change of a shard so that polling a job stays one
    # query.
    sharded: Mapped[bool] = mapped_column(Boolean, default=False)
    shards: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", order_by="Artifact.name", cascade="all, delete-orphan", passive_deletes=True,
    )

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES


class JobShard(Base):
    """One unit of a sharded job (`fd2_core.shards.plan_shards`),
    claimed by the worker that runs it.

    `weight` is its share of the job's progress (the shares of a job add up to 1); `depends_on` the
    shard ids that must be `done` before it may be dispatched.
    """

    __tablename__ = "job_shards"
    __table_args__ = (Index("ix_job_shards_status", "status"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))
    depends_on: Mapped[list[Any]] = mapped_column(default=list)
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16), default=ShardStatus.QUEUED)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float | None] = mapped_column(Float, default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")
