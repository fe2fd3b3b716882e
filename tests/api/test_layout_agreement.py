"""One scanner decides a dataset's layout: the upload summary, submit-time
checks and the loader agree.

Every accepted layout is uploaded through the API and loaded by the library from the same archive;
the per-class counts must be equal at the operator's test fraction, and submit-time training counts
must equal the loader's at a job's own fraction.
A job the loader cannot run is refused at submit.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    image_tree,
    new_tenant,
    png_bytes,
    settings,
    submit,
    zip_bytes,
)
from fastapi.testclient import TestClient

from api.job_submission import dataset_train_counts
from fd2_config.settings import Settings
from fd2_core.data.dataset import load_dataset
from fd2_core.spec_resolution import resolve_spec
from store.db import session_scope
from store.models import Dataset

CLASSES = {"wren": 7, "finch": 5, "tit": 4}


def _manifest_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _with_manifest(split: bool) -> dict[str, bytes]:
    files = image_tree(CLASSES, split=None, top="images")
    rows = []
    for index, path in enumerate(sorted(files)):
        row = {"path": path, "label": path.split("/")[1]}
        if split:
            row["split"] = "test" if index % 3 == 0 else "train"
        rows.append(row)
    files["manifest.csv" if split else "manifest.json"] = (
        _manifest_csv(rows) if split else json.dumps(rows).encode())
    return files


def _flat_val() -> dict[str, bytes]:
    """ImageNet-style: train/<class>/ beside a val/ of loose images (their
    labels live elsewhere)."""
    files = image_tree(CLASSES, split="train")
    files.update({f"val/ILSVRC_val_{i:05d}.png": png_bytes(200 + i) for i in range(6)})
    return files


def _test_and_val() -> dict[str, bytes]:
    """An empty-of-classes test/ does not hide a usable val/."""
    files = image_tree(CLASSES, split="train")
    files.update(image_tree({"wren": 2, "finch": 1}, split="val"))
    files["test/readme.png"] = png_bytes(99)
    return files


LAYOUTS = {
    "train_and_test_folders": lambda: {**image_tree(CLASSES, split="train"),
                                       **image_tree({"wren": 2, "finch": 2, "tit": 1}, split="test")},
    "train_and_val_folders": lambda: {**image_tree(CLASSES, split="train"),
                                      **image_tree({"wren": 2, "tit": 1}, split="val")},
    "train_and_flat_val": _flat_val,
    "empty_test_beside_val": _test_and_val,
    "train_only": lambda: image_tree(CLASSES, split="train"),
    "flat_classes": lambda: image_tree(CLASSES, split=None),
    "wrapped_flat_classes": lambda: image_tree(CLASSES, split=None, top="photos"),
    "wrapped_train_and_test": lambda: {**image_tree(CLASSES, split="train", top="ds"),
                                       **image_tree({"wren": 1, "finch": 1, "tit": 1}, split="test", top="ds")},
    "manifest_with_splits": lambda: _with_manifest(split=True),
    "manifest_without_splits": lambda: _with_manifest(split=False),
}
EXPECTED_SOURCE = {
    "train_and_test_folders": "archive", "train_and_val_folders": "archive", "train_and_flat_val": "carved",
    "empty_test_beside_val": "archive", "train_only": "carved", "flat_classes": "carved",
    "wrapped_flat_classes": "carved", "wrapped_train_and_test": "archive", "manifest_with_splits": "archive",
    "manifest_without_splits": "carved",
}


def _loader_counts(archive: Path, test_fraction: float, seed: int = 0) -> dict[str, dict[str, int]]:
    data = load_dataset(archive, 8, test_fraction=test_fraction, seed=seed)
    train, test = data.per_class_counts("train"), data.per_class_counts("test")
    return {name: {"train": train[name], "test": test[name]} for name in data.classes}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_upload_summary_equals_what_the_loader_sees(client: TestClient, settings: Settings, layout: str,  # noqa: F811
                                                    tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_bytes(LAYOUTS[layout]()))
    headers = new_tenant(settings)
    response = client.post("/v1/datasets", headers=headers,
                           files={"file": ("data.zip", archive.read_bytes(), "application/zip")})
    assert response.status_code == 201, response.text
    body = response.json()

    fraction = settings.dataset_test_fraction
    seen = _loader_counts(archive, fraction)
    assert body["per_class"] == seen
    assert body["splits"] == {split: sum(c[split] for c in seen.values()) for split in ("train", "test")}
    assert body["test_split"]["source"] == EXPECTED_SOURCE[layout]
    carved = body["test_split"]["source"] == "carved"
    assert body["test_split"]["splits_given"] is not carved
    assert body["test_split"]["fraction"] == (fraction if carved else None)

    # A job carving its own share: the submit-time counts are the loader's
    # at the job's fraction and seed.
    spec = resolve_spec({"ipc": 1, "test_fraction": 0.5, "seed": 3})
    with session_scope(settings) as session:
        dataset = session.get(Dataset, body["id"])
        assert dataset is not None
        at_job = dataset_train_counts(dataset, spec)
    assert at_job == {name: c["train"] for name, c in _loader_counts(archive, 0.5, seed=3).items()}
    assert submit(client, headers, body["id"], {"ipc": 1}).status_code == 202


def test_flat_val_folder_is_reported_and_not_used_as_a_test_split(
    client: TestClient, settings: Settings,  # noqa: F811
) -> None:
    response = client.post("/v1/datasets", headers=new_tenant(settings),
                           files={"file": ("data.zip", zip_bytes(_flat_val()), "application/zip")})
    assert response.status_code == 201, response.text
    reasons = {e["path"]: e["reason"] for e in response.json()["errors"]}
    assert "not used as the test split" in reasons["val/"]
    assert "not inside a class folder" in reasons["val/ILSVRC_val_00000.png"]
    assert response.json()["splits"]["test"] > 0


def test_job_the_loader_cannot_evaluate_is_refused_at_submit(client: TestClient, settings: Settings,  # noqa: F811
                                                             tmp_path: Path) -> None:
    """Splits given by a manifest, none of them test: no fraction carves
    one, so evaluation cannot run."""
    files = image_tree(CLASSES, split=None)
    rows = [{"path": path, "label": path.split("/")[0], "split": "train"} for path in sorted(files)]
    files["manifest.csv"] = _manifest_csv(rows)
    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_bytes(files))
    headers = new_tenant(settings)
    response = client.post("/v1/datasets", headers=headers,
                           files={"file": ("data.zip", archive.read_bytes(), "application/zip")})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["test_split"] == {"source": "none", "splits_given": True, "fraction": None}
    assert all(c["test"] == 0 for c in _loader_counts(archive, 0.5).values())
    refused = submit(client, headers, body["id"], {"ipc": 1, "test_fraction": 0.5})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_test_split"
    assert submit(client, headers, body["id"], {"ipc": 1, "evaluate": False}).status_code == 202
