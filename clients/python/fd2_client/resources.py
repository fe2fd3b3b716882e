"""The service's resources as the SDK returns them: plain dicts (the JSON of the REST contract), typed.

The types list the documented fields; the service may send more (a dict keeps them). `Progress` is the one
shape `wait` reports progress in, whether it came from an event or from the job resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
RUNNING_KINDS = frozenset({"stage_start", "stage_end", "progress"})  # events only a running job writes


class Artifact(TypedDict, total=False):
    name: str
    size: int  # bytes
    sha256: str  # hex
    media_type: str
    url: str


class JobErrorBody(TypedDict, total=False):
    code: str
    message: str


class Job(TypedDict, total=False):
    id: str
    status: str  # queued | running | succeeded | failed | cancelled
    stage: str | None  # pretrain | distill | relabel | evaluate | package
    progress: float  # the whole job, 0..1
    stage_progress: float  # the current stage, 0..1
    eta_seconds: float | None
    spec: dict[str, Any]
    dataset_id: str | None  # null for a manifest or uri job, and once the uploaded dataset was deleted
    dataset_source: str  # upload | manifest | uri
    dataset_uri: str | None  # the s3:// prefix of a job on data by reference
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobErrorBody | None
    metrics: dict[str, Any]
    artifacts: list[Artifact]
    artifacts_expired: bool  # the operator's retention removed the artifacts (downloads answer 410)
    # A job spread over several workers (spec max_workers > 1): counts by status and one item per shard
    # ({id, stage, status, worker, attempts, progress}); null for a job one worker runs.
    shards: dict[str, Any] | None


class Dataset(TypedDict, total=False):
    id: str
    name: str
    status: str  # validating | ready | invalid
    num_classes: int
    classes: list[str]
    splits: dict[str, int]
    per_class: dict[str, Any]
    errors: list[Any]
    warnings: list[Any]
    duplicates: dict[str, Any]
    created_at: str


class Event(TypedDict, total=False):
    id: int
    created_at: str
    kind: str  # stage_start | stage_end | progress | log | warning | succeeded | failed | cancelled | …
    stage: str | None
    progress: float | None
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Progress:
    """A job's progress at one moment. `progress`/`stage_progress` are fractions 0..1, `eta_seconds` the
    service's estimate of the job's remaining time in seconds; `event` is set when an event reported it."""

    job_id: str
    status: str
    stage: str | None
    progress: float
    stage_progress: float
    eta_seconds: float | None
    message: str | None = None
    event: Event | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def of_job(cls, job: Mapping[str, Any]) -> Progress:
        return cls(job["id"], job["status"], job.get("stage"), float(job.get("progress") or 0.0),
                   float(job.get("stage_progress") or 0.0), job.get("eta_seconds"))

    def after_event(self, event: Event) -> Progress:
        """This progress moved on by `event` (fields the event leaves out keep their value)."""
        kind = event.get("kind", "")
        data = event.get("data") or {}
        stage = event.get("stage") or self.stage
        stage_progress = data.get("stage_progress", self.stage_progress if stage == self.stage else 0.0)
        if kind == "stage_start":
            stage_progress = 0.0
        elif kind in ("stage_end", "succeeded") and "stage_progress" not in data:
            stage_progress = 1.0
        status = kind if kind in FINAL_STATUSES else ("running" if kind in RUNNING_KINDS else self.status)
        progress = event.get("progress")
        return Progress(self.job_id, status, stage, self.progress if progress is None else float(progress),
                        float(stage_progress or 0.0), data.get("eta_seconds", self.eta_seconds),
                        event.get("message"), event)


def id_of(resource: str | Mapping[str, Any]) -> str:
    """The id of a resource given as its id or as its dict."""
    if isinstance(resource, str):
        return resource
    return str(resource["id"])
