"""Request and response bodies of the REST contract, also the OpenAPI schema (served at `/docs`).

A job's `spec` is kept as a plain mapping here and typed in OpenAPI as `JobSpec` (fd2_core.spec).
That is the one schema with every field's default, range and meaning.
`fd2_core.spec_resolution.resolve_spec` is what validates it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from store.models import DatasetStatus, JobStatus, ShardStatus

# allOf so that a field's own description can sit beside the reference.
JOB_SPEC_REF = {"allOf": [{"$ref": "#/components/schemas/JobSpec"}]}
SpecMapping = Annotated[dict[str, Any], WithJsonSchema(JOB_SPEC_REF)]
ClassName = Annotated[str, Field(min_length=1, max_length=200)]
ClassIndex = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
JobStage = Literal["pretrain", "distill", "relabel", "evaluate", "package"]


class ManifestItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, min_length=1, max_length=4096, description="Image path relative to the root.")
    uri: str | None = Field(None, min_length=1, max_length=1100,
                            description="`s3://bucket/key` of the image (a manifest of object URIs, no root).")
    label: ClassName | ClassIndex = Field(..., description="Class name (or integer class index).")
    split: Literal["train", "test", "val"] | None = Field(
        None, description="train, test or val (val counts as test); omitted everywhere = a test share is carved."
    )


class Manifest(BaseModel):
    """Either files under `root` (rows with `path`) or objects in the store (rows with `uri`, no
    `root`)."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, min_length=1, max_length=4096,
                             description="Folder under an operator-allowed data root (rows with `path`).")
    items: list[ManifestItem] = Field(..., min_length=1, description="One row per image.")

    @model_validator(mode="after")
    def _one_kind(self) -> Manifest:
        by_uri = [item.uri is not None for item in self.items]
        if any(item.uri is not None and item.path is not None for item in self.items):
            raise ValueError("a manifest row has either 'path' (a file under root) or 'uri' (an s3:// object), "
                             "not both")
        if any(by_uri) and not all(by_uri):
            raise ValueError("a manifest lists either files ('path' under 'root') or objects ('uri'), not both")
        if all(by_uri) and self.root is not None:
            raise ValueError("a manifest of object URIs has no 'root'; drop it")
        if not any(by_uri) and (self.root is None or any(item.path is None for item in self.items)):
            raise ValueError("a manifest of files needs 'root' and a 'path' on every row (or list objects with "
                             "'uri' instead)")
        return self

    @property
    def of_objects(self) -> bool:
        return self.items[0].uri is not None


class DatasetRef(BaseModel):
    """Exactly one of `id` (an uploaded dataset), `manifest` (data already on the workers' storage)
    or `uri` (data in an S3-compatible object store)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200, description="Id of a `ready` uploaded dataset.")
    manifest: Manifest | None = Field(None, description="Images listed under an allowed data root.")
    uri: str | None = Field(
        None, max_length=1100, description="`s3://bucket/prefix/` holding an ImageFolder (`train/<class>/…`, "
        "optional `test/` or `val/`) or flat `<class>/…` layout, under a prefix the operator granted the tenant.",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: DatasetRef
    spec: SpecMapping = Field(
        default_factory=dict,
        description="Partial spec: `preset` picks the base configuration and any other field overrides it. "
        "Unknown fields are rejected. The job answers with the fully resolved spec.",
    )
    callback_url: str | None = Field(
        None, max_length=2048, description="POSTed the job resource when the job ends (host must be allowed)."
    )


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    media_type: str
    url: str = Field(..., description="Download path (supports Range, ETag, Digest).")


class JobError(BaseModel):
    code: str
    message: str


class ShardOut(BaseModel):
    id: str = Field(
        ...,
        description="Stable shard id, e.g. `pretrain:m0`, `pretrain:scorer`, `distill:c00100`, `relabel:e0000-0200`.",
    )
    stage: JobStage
    status: ShardStatus = Field(
        ..., description="`dispatched`: waiting in the broker for a free worker.")
    worker: str | None = Field(None, description="The worker (`host:pid`) running it or that ran it last.")
    attempts: int
    progress: float = Field(..., description="Progress of this shard 0-1.")


class JobShards(BaseModel):
    """Counts by status and one item per shard, in run order."""

    total: int
    queued: int
    dispatched: int
    running: int
    done: int
    failed: int
    cancelled: int
    items: list[ShardOut]


class JobOut(BaseModel):
    """The job resource as built by `store.resources.job_resource` (its one
    definition), typed for OpenAPI."""

    id: str
    status: JobStatus
    stage: JobStage | None = None
    progress: float = Field(..., description="Overall progress 0-1.")
    stage_progress: float = Field(..., description="Progress of the current stage 0-1.")
    eta_seconds: float | None = None
    spec: SpecMapping = Field(..., description="The full resolved spec.")
    dataset_id: str | None = Field(None, description="The uploaded dataset; null for a manifest job and once "
                                   "the dataset was deleted.")
    dataset_source: Literal["upload", "manifest", "uri"] = Field(
        "upload", description="Where the data came from: an uploaded dataset, a manifest of files on the "
        "workers' storage, or an s3:// reference (so a null `dataset_id` of an `upload` job means its dataset was "
        "deleted).")
    dataset_uri: str | None = Field(None, description="The s3:// prefix of a job on data by reference.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Flat, set when the job succeeded: the accuracies and DD-Ranking figures (`teacher_accuracy`, "
        "`student_accuracy`, `random_baseline_accuracy`, `ior`, `ior_ci95`, `beats_random`, `verdict`, with "
        "`eval_hlr` also `hard_label_accuracy`, `full_data_accuracy`, `hlr`, `hlr_ci95`) and what the download "
        "weighs (report.json → `storage`): `distilled_images_bytes` (the encoded images inside distilled.tar.gz), "
        "`soft_labels_bytes` (the teacher file's size when `soft_labels_kind` is "
        "`online (teacher file)`, else `stored`), `soft_labels_file_bytes`, `teacher_bytes`, `real_data_bytes` "
        "with `real_data_kind` (`encoded files` or `decoded pixels (built-in data: S²·3·N)`), `compressed_bytes` "
        "= images + soft labels and `compression_ratio` = real_data_bytes / compressed_bytes.",
    )
    artifacts: list[ArtifactOut] = Field(
        default_factory=list,
        description="Files the job produced; after `artifacts_expired` they stay listed as a record, and their "
        "downloads answer 410.",
    )
    cancel_requested: bool = False
    artifacts_expired: bool = Field(
        False,
        description="True once the operator's retention period (FD2_ARTIFACT_RETENTION_DAYS) removed the "
        "artifact files of this finished job; its downloads answer 410 `artifacts_expired`.",
    )
    shards: JobShards | None = Field(
        None,
        description="The shards of a job spread over several workers (spec `max_workers` > 1), once it was "
        "split; null for a job one worker runs.",
    )


class DatasetOut(BaseModel):
    id: str
    name: str
    status: DatasetStatus
    num_classes: int
    classes: list[str]
    splits: dict[str, int]
    per_class: dict[str, dict[str, int]]
    errors: list[dict[str, Any]] = Field(default_factory=list, description="Skipped files with reasons.")
    warnings: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Findings that did not stop the upload, each {code, message, details}: e.g. file names "
        "decoded from a guessed code page, duplicates or test images that also occur in train.",
    )
    duplicates: dict[str, Any] = Field(
        default_factory=dict,
        description="Duplicate images (same decoded pixels) per split, and test images that also occur in train.",
    )
    test_split: dict[str, Any] = Field(
        default_factory=dict,
        description="Where the test split comes from: `source` is `archive` (the upload's own test/val folder), "
        "`carved` (taken from train at `fraction`) or `none`.",
    )
    size_bytes: int
    created_at: datetime


class EventOut(BaseModel):
    id: int
    created_at: datetime
    kind: str
    stage: str | None = None
    progress: float | None = None
    message: str
    data: dict[str, Any] | None = None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None = None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = Field(None, description="Pass as `after` to read the following events.")


class DeletionPending(BaseModel):
    """202 of a delete whose row is gone but whose files the disk would not let go (read-only)."""

    id: str
    deleted: Literal[True] = True
    files_removed: Literal[False] = False
    message: str
