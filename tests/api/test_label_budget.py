"""`label_budget_bytes` at submit: the API picks the encoding that fits the dataset's ipc·K images
and stores it in the job's spec, or answers 422 saying why none can."""

from __future__ import annotations

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    new_tenant,
    ready_dataset,
    settings,
    submit,
)
from fastapi.testclient import TestClient

from fd2_config.settings import Settings
from fd2_core.label_formats import LabelEncoding
from fd2_core.label_sizes import estimated_label_file_bytes
from fd2_core.spec_resolution import resolve_spec

CLASSES = {"wren": 6, "finch": 7, "tit": 8}


@pytest.fixture(scope="module")
def tenant(settings: Settings) -> dict[str, str]:  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def dataset(client: TestClient, tenant: dict[str, str]) -> dict:  # noqa: F811
    return ready_dataset(client, tenant, CLASSES)


def file_bytes(encoding: LabelEncoding, ipc: int = 2) -> int:
    epochs = resolve_spec({}).relabel_epochs
    return estimated_label_file_bytes(encoding, epochs, ipc * len(CLASSES), len(CLASSES), class_names=list(CLASSES))


def test_a_budget_stores_the_encoding_it_fits(client: TestClient, tenant, dataset) -> None:  # noqa: F811
    # with 3 classes the next after full fp16 (every top-k keeps them all)
    half = LabelEncoding("fp16", 0, 0.5)
    budget = file_bytes(half)
    assert file_bytes(LabelEncoding()) > budget
    # sent as 1234.0, JSON's one number type, like any integer field
    response = submit(client, tenant, dataset["id"], {"ipc": 2, "label_budget_bytes": float(budget)})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["label_budget_bytes"] == budget
    assert (spec["soft_label_values"], spec["topk"], spec["label_epoch_fraction"]) == ("fp16", 0, 0.5)
    # the resolved spec sent again is the same job, budget and encoding together
    again = submit(client, tenant, dataset["id"], spec)
    assert again.status_code == 202, again.text
    assert again.json()["spec"] == spec


def test_a_budget_nothing_fits_answers_422_with_the_smallest_size(
    client: TestClient, tenant, dataset  # noqa: F811
) -> None:
    smallest = file_bytes(LabelEncoding("int8", 0, 0.1))  # top5-int8-epochs0.1 at 3 classes
    response = submit(client, tenant, dataset["id"], {"ipc": 2, "label_budget_bytes": 100})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "label_budget_too_small"
    assert f"label_budget_bytes=100 is below the smallest soft-label file this job can have: {smallest} bytes" in (
        error["message"])
    assert error["details"] == {"field": "spec.label_budget_bytes", "label_budget_bytes": 100,
                                "smallest_bytes": smallest, "smallest_encoding": "int8-epochs0.1"}


def test_a_budget_with_an_encoding_field_answers_422_naming_both(
    client: TestClient, tenant, dataset  # noqa: F811
) -> None:
    response = submit(client, tenant, dataset["id"], {"label_budget_bytes": 10**6, "soft_label_values": "int8"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec" and error["details"][0]["field"] == "label_budget_bytes"
    assert "label_budget_bytes" in error["message"] and "soft_label_values" in error["message"]
