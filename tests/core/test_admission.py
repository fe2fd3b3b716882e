"""One admission rule, three translations: the API's 422, the worker's refusal and the pipeline's
DataError give the same code and message for the same data and spec; one cost model gives the budget
and the progress weights; the rule's module stays torch-free."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from api_helpers import BACKENDS, database_url, image_tree, make_settings, new_tenant, running_client, zip_bytes
from fastapi.testclient import TestClient

from api.errors import ApiError
from api.spec_checks import check_runnable
from fd2_config.settings import Settings
from fd2_core.admission import JobCounts, admission_problems, job_counts
from fd2_core.cost import DatasetSize, decoded_dataset_bytes, estimate_cost, stage_image_passes
from fd2_core.data.dataset import ImageDataset, load_dataset
from fd2_core.data.errors import DataError
from fd2_core.data.layout import carved_test_count
from fd2_core.pipeline import check_dataset, stage_weights
from fd2_core.spec_resolution import resolve_spec
from store.db import session_scope
from store.models import Dataset
from worker.source_check import JobSource, SourceRejected, prepare_source

ROOT = Path(__file__).resolve().parents[2]
# Flat classes, so each job carves its own test share: finch keeps 2
# training images at any test_fraction.
CLASSES = {"wren": 6, "finch": 3}
# The operator's budget of these tests: the plain spec fits, the CASES below each break one limit.
MAX_JOB_COST = 100_000.0
MAX_DATASET_MEMORY_BYTES = 60_000

# name: (dataset, spec, expected code); the pipeline has no operator
# budget, so it sees only the data rules.
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "ipc_above_the_smallest_class": ("flat", {"ipc": 3}, "ipc_too_large"),
    "ipc_above_it_at_the_jobs_own_fraction": ("flat", {"ipc": 2, "test_fraction": 0.5}, "ipc_too_large"),
    "evaluation_without_test_images": ("train_only", {"ipc": 1}, "no_test_split"),
    "cost_above_the_limit": ("flat", {"ipc": 1, "distill_iterations": 100_000}, "cost_too_high"),
    "decoded_size_above_the_limit": ("flat", {"ipc": 1, "image_size": 64}, "dataset_too_large"),
}
BUDGET_CODES = {"cost_too_high", "dataset_too_large"}


def _train_only_manifest() -> dict[str, bytes]:
    """Splits given by a manifest, none of them test: no fraction carves a test split."""
    files = image_tree(CLASSES, split=None)
    rows = "".join(f"{path},{path.split('/')[0]},train\n" for path in sorted(files))
    files["manifest.csv"] = ("path,label,split\n" + rows).encode()
    return files


@pytest.fixture(scope="module", params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp(f"fd2-admission-{request.param}")
    with database_url(request.param, home) as url:
        yield make_settings(home, url, max_job_cost=MAX_JOB_COST, max_dataset_memory_bytes=MAX_DATASET_MEMORY_BYTES)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def uploads(client: TestClient, settings: Settings) -> dict[str, Any]:
    headers = new_tenant(settings)
    ids = {}
    for name, files in (("flat", image_tree(CLASSES, split=None)), ("train_only", _train_only_manifest())):
        response = client.post("/v1/datasets", headers=headers,
                               files={"file": ("data.zip", zip_bytes(files), "application/zip")})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    return {"headers": headers, "ids": ids}


def _submit(client: TestClient, uploads: dict[str, Any], dataset: str, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", headers=uploads["headers"],
                       json={"dataset": {"id": uploads["ids"][dataset]}, "spec": spec})


def _worker_refusal(settings: Settings, dataset_id: str, spec_raw: dict[str, Any]) -> SourceRejected | None:
    with session_scope(settings) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        source = JobSource("dataset", row.path, dataset_id)
    try:
        prepare_source(settings, "job_admission", source, resolve_spec(spec_raw))
    except SourceRejected as exc:
        return exc
    return None


def _pipeline_refusal(settings: Settings, dataset_id: str, spec_raw: dict[str, Any]) -> DataError | None:
    spec = resolve_spec(spec_raw)
    with session_scope(settings) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        folder = row.path
    data = load_dataset(folder, spec.image_size, seed=spec.seed, test_fraction=spec.test_fraction)
    try:
        check_dataset(spec, data)
    except DataError as exc:
        return exc
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_api_the_worker_and_the_pipeline_refuse_alike(client: TestClient, settings: Settings,
                                                           uploads: dict[str, Any], case: str) -> None:
    dataset, spec, code = CASES[case]
    dataset_id = uploads["ids"][dataset]

    answer = _submit(client, uploads, dataset, spec)
    assert answer.status_code == 422, answer.text
    api = answer.json()["error"]
    assert api["code"] == code

    worker = _worker_refusal(settings, dataset_id, spec)
    assert worker is not None and worker.code == code
    assert worker.message == api["message"]

    pipeline = _pipeline_refusal(settings, dataset_id, spec)
    if code in BUDGET_CODES:
        assert pipeline is None  # the library runs without an operator budget
        return
    assert pipeline is not None and pipeline.code == code
    assert pipeline.message == api["message"]
    # One field, named as each caller's input names it: `spec.ipc` in a
    # request body, `ipc` in a spec.
    field = pipeline.details["field"]
    assert api["details"] == {**pipeline.details, "field": f"spec.{field}"}


@pytest.mark.parametrize("dataset", ["flat", "train_only"])
def test_a_runnable_spec_passes_all_three(client: TestClient, settings: Settings, uploads: dict[str, Any],
                                          dataset: str) -> None:
    spec = {"ipc": 2, "evaluate": dataset == "flat"}
    assert _submit(client, uploads, dataset, spec).status_code == 202
    assert _worker_refusal(settings, uploads["ids"][dataset], spec) is None
    assert _pipeline_refusal(settings, uploads["ids"][dataset], spec) is None


def test_the_messages_name_cause_and_fix(client: TestClient, uploads: dict[str, Any]) -> None:
    fixes = {"ipc_too_large": "lower ipc to at most ", "no_test_split": "set evaluate=false",
             "cost_too_high": "lower ipc, iterations, epochs or image_size",
             "dataset_too_large": "lower image_size or use fewer images"}
    for dataset, spec, code in CASES.values():
        message = _submit(client, uploads, dataset, spec).json()["error"]["message"]
        assert fixes[code] in message, message


def _one_class_data() -> ImageDataset:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    return ImageDataset(images, torch.zeros(4, dtype=torch.long), images[:1], torch.zeros(1, dtype=torch.long),
                        ["only"], (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))


def test_one_class_is_refused_by_the_api_and_the_pipeline_alike(settings: Settings) -> None:
    """An upload of one class is refused by the scanner already; the rule
    itself still holds on both sides."""
    spec = resolve_spec({"ipc": 1})
    with pytest.raises(ApiError) as api:
        check_runnable(settings, spec, JobCounts({"only": 4}, 1))
    with pytest.raises(DataError) as pipeline:
        check_dataset(spec, _one_class_data())
    assert api.value.code == pipeline.value.code == "one_class"
    assert api.value.message == pipeline.value.message and "at least two classes" in api.value.message
    assert api.value.details == pipeline.value.details == {"classes": ["only"]}


def test_problems_come_in_the_order_to_fix_them() -> None:
    budget = SimpleNamespace(max_job_cost=1.0, max_dataset_memory_bytes=1)
    spec = resolve_spec({"ipc": 3})
    found = admission_problems(spec, JobCounts({"wren": 5, "finch": 2}, 0), budget)
    assert [p.code for p in found] == ["ipc_too_large", "no_test_split", "cost_too_high", "dataset_too_large"]
    assert [p.field for p in found] == ["ipc", "evaluate", None, None]
    assert admission_problems(resolve_spec({"ipc": 2}), JobCounts({"wren": 5, "finch": 2}, 2)) == []


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.33, 0.5])
def test_stored_counts_are_carved_by_the_loaders_rule_unless_splits_were_given(fraction: float) -> None:
    stored = {"wren": {"train": 5, "test": 1}, "finch": {"train": 2, "test": 1}, "tit": {"train": 1, "test": 0}}
    carved = job_counts(stored, splits_given=False, test_fraction=fraction)
    assert carved.train_per_class == {name: n["train"] + n["test"] - carved_test_count(n["train"] + n["test"],
                                                                                       fraction)
                                      for name, n in stored.items()}
    assert carved.test_images == sum(carved_test_count(n["train"] + n["test"], fraction) for n in stored.values())
    given = job_counts(stored, splits_given=True, test_fraction=fraction)
    assert given == JobCounts({"wren": 5, "finch": 2, "tit": 1}, 2)


@pytest.mark.parametrize("raw", [{}, {"eval_hlr": True}, {"method": "random"}, {"evaluate": False},
                                 {"method": "sre2l++", "image_size": 64}])
def test_the_progress_weights_are_the_cost_models_stage_passes(raw: dict[str, Any]) -> None:
    spec = resolve_spec({"ipc": 2, "relabel_epochs": 3, "pretrain_epochs": 2, **raw})
    data = load_dataset("fgsynth:classes=3,size=16,train=6,test=4,seed=0", spec.image_size)
    size = DatasetSize(3, 18, 12)
    weights = stage_weights(spec, data)
    assert weights == stage_image_passes(spec, size)
    assert list(weights) == ["pretrain", "distill", "relabel", "evaluate", "package"]
    assert weights["package"] > 0
    assert sum(weights.values()) * estimate_cost(spec, size).pixel_factor == estimate_cost(spec, size).cost
    assert decoded_dataset_bytes(spec, size) == 30 * spec.image_size**2 * 3


def test_evaluation_weight_counts_the_test_images() -> None:
    spec = resolve_spec({"ipc": 1})
    few, many = stage_image_passes(spec, DatasetSize(3, 18, 3)), stage_image_passes(spec, DatasetSize(3, 18, 30))
    students = 1 + int(spec.eval_random_baseline) + int(spec.eval_hlr)
    assert many["evaluate"] - few["evaluate"] == 27 * students
    assert {k: v for k, v in many.items() if k != "evaluate"} == {k: v for k, v in few.items() if k != "evaluate"}


def test_the_cost_follows_the_soft_label_encoding() -> None:
    """A tenth of the epochs recorded costs a tenth of the relabel's teacher passes; online labels cost
    none at relabel and one teacher pass per step of each soft-label student instead."""
    size = DatasetSize(4, 40, 8)
    base = {"ipc": 2, "relabel_epochs": 30, "eval_random_baseline": True}
    full = stage_image_passes(resolve_spec(base), size)
    tenth = stage_image_passes(resolve_spec({**base, "label_epoch_fraction": 0.1}), size)
    online = stage_image_passes(resolve_spec({**base, "soft_label_values": "online"}), size)
    walk = 30 * 2 * 4  # relabel_epochs · n_syn
    assert full["relabel"] == walk and tenth["relabel"] == walk / 10 and online["relabel"] == 0
    assert full["evaluate"] - tenth["evaluate"] == walk - walk / 10  # the random subset's relabel
    assert online["evaluate"] - full["evaluate"] == 2 * walk - walk  # two students forward it; no relabel


def test_admission_imports_no_torch() -> None:
    code = ("import sys, fd2_core.admission, api.spec_checks, worker.source_check; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
