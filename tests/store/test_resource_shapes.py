"""One definition of each REST resource shape (`store.resources`); the API's pydantic models only document it.

A key added to or dropped from either side fails here, before a client or a callback receiver sees the two
disagree.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel

from api.schemas import ArtifactOut, DatasetOut, EventOut, JobOut
from fd2_config.settings import Settings
from store.jobs import ArtifactRecord, JobRecord
from store.models import Dataset, JobEvent
from store.resources import dataset_resource, event_resource, job_resource

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def job_record() -> JobRecord:
    return JobRecord(
        id="job_1", status="succeeded", stage="package", progress=1.0, stage_progress=1.0, eta_seconds=None,
        spec={"ipc": 1}, dataset_id="ds_1", created_at=NOW, started_at=NOW, finished_at=NOW, error=None,
        metrics={"student_accuracy": 0.5}, cancel_requested=False,
        artifacts=[ArtifactRecord("report.json", 2, "0" * 64, "application/json")],
    )


def assert_same_keys(resource: dict, model: type[BaseModel]) -> None:
    assert set(resource) == set(model.model_fields), model.__name__
    model.model_validate(resource)


def test_the_job_resource_and_its_model_have_the_same_fields(tmp_path):
    resource = job_resource(job_record(), Settings(home=tmp_path))
    assert_same_keys(resource, JobOut)
    [artifact] = resource["artifacts"]
    assert_same_keys(artifact, ArtifactOut)
    assert resource["artifacts_expired"] is False


def test_a_job_whose_artifacts_expired_says_so_and_keeps_their_record(tmp_path):
    record = job_record()
    record.artifacts_expired_at = NOW
    resource = job_resource(record, Settings(home=tmp_path))
    assert_same_keys(resource, JobOut)
    assert resource["artifacts_expired"] is True and [a["name"] for a in resource["artifacts"]] == ["report.json"]


def test_dataset_and_event_resources_and_their_models_have_the_same_fields():
    dataset = Dataset(
        id="ds_1", name="birds", status="ready", num_classes=2, classes=["a", "b"], splits={"train": 4},
        per_class={"a": {"train": 2}, "b": {"train": 2}}, errors=[], warnings=[], duplicates={}, test_split={},
        size_bytes=10, created_at=NOW,
    )
    assert_same_keys(dataset_resource(dataset), DatasetOut)
    event = JobEvent(id=1, created_at=NOW, kind="stage_start", stage="distill", progress=0.1, message="m", data={})
    assert_same_keys(event_resource(event), EventOut)
