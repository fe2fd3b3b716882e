"""Uploads count duplicate images and test images that occur in train, warn of them, and drop them on request;
the numbers are the ones a job's loader finds in the stored files. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    dataset_dirs,
    new_tenant,
    settings,
    zip_bytes,
)
from fastapi.testclient import TestClient
from PIL import Image

from fd2_config.settings import Settings
from fd2_core.data.dataset import load_dataset


def image(shade: int, fmt: str = "PNG", **options: Any) -> bytes:
    """A 6x5 picture per shade (no two shades share pixels), in any lossless format."""
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (shade, 255 - shade, (shade * 7) % 256)).save(buffer, fmt, **options)
    return buffer.getvalue()


def leaky_split_archive() -> bytes:
    """train/{ant,bee} 4 images each, test/{ant,bee} 2 each, plus: a byte copy in train, the same pixels as
    lossless WebP in test, and a test image whose pixels are a train image's (saved with other compression)."""
    files = {f"train/{name}/{i}.png": image(10 * c + i) for c, name in enumerate(("ant", "bee")) for i in range(4)}
    files.update({f"test/{name}/{i}.png": image(100 + 10 * c + i) for c, name in enumerate(("ant", "bee"))
                  for i in range(2)})
    files["train/ant/copy.png"] = files["train/ant/0.png"]
    files["test/bee/again.webp"] = image(110, "WEBP", lossless=True)
    files["test/ant/leak.png"] = image(12, compress_level=0)
    return zip_bytes(files)


def post(client: TestClient, headers: dict[str, str], data: bytes, **fields: str) -> Any:  # noqa: F811
    return client.post("/v1/datasets", headers=headers, files={"file": ("d.zip", data, "application/zip")},
                       data=fields or None)


FOUND = {
    "train": {"duplicate_images": 1, "groups": 1},
    "test": {"duplicate_images": 1, "groups": 1},
    "test_in_train": 1,
    "examples": [["train/bee/2.png", "test/ant/leak.png"], ["test/bee/0.png", "test/bee/again.webp"],
                 ["train/ant/0.png", "train/ant/copy.png"]],
}


def test_upload_reports_duplicates_and_leaks_as_a_job_will_find_them(client: TestClient,  # noqa: F811
                                                                      settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    response = post(client, headers, leaky_split_archive())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["duplicates"] == {**FOUND, "dropped": 0}
    assert body["splits"] == {"train": 9, "test": 6} and body["errors"] == []
    warnings = {w["code"]: w for w in body["warnings"]}
    assert set(warnings) >= {"test_in_train", "duplicates"}
    assert "drop_duplicates=true" in warnings["test_in_train"]["message"]
    assert warnings["test_in_train"]["details"]["test_in_train"] == 1
    assert warnings["duplicates"]["details"]["train"] == FOUND["train"]
    assert client.get(f"/v1/datasets/{body['id']}", headers=headers).json() == body
    # The loader of a job reads the stored files and finds the same numbers.
    stored = settings.datasets_dir / body["id"] / "data"
    assert load_dataset(stored, 8).duplicates == {**FOUND, "dropped": 0}


def test_drop_duplicates_deletes_them_and_lists_them(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    kept = post(client, headers, leaky_split_archive()).json()
    response = post(client, headers, leaky_split_archive(), drop_duplicates="true")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["duplicates"] == {**FOUND, "dropped": 3}
    assert not any(w["code"] in ("test_in_train", "duplicates") for w in body["warnings"])
    dropped = {e["path"]: e["reason"] for e in body["errors"]}
    assert set(dropped) == {"train/ant/copy.png", "test/bee/again.webp", "test/ant/leak.png"}
    assert "train/bee/2.png in train" in dropped["test/ant/leak.png"]
    assert body["splits"] == {"train": 8, "test": 4}
    assert body["per_class"] == {"ant": {"train": 4, "test": 2}, "bee": {"train": 4, "test": 2}}
    assert body["size_bytes"] < kept["size_bytes"]
    stored = settings.datasets_dir / body["id"] / "data"
    assert not any((stored / path).exists() for path in dropped)
    left = load_dataset(stored, 8).duplicates
    assert left["test_in_train"] == 0 and left["train"]["duplicate_images"] == left["test"]["duplicate_images"] == 0


def test_without_a_test_folder_the_default_carve_is_counted_and_a_drop_is_upload_wide(
        client: TestClient, settings: Settings) -> None:  # noqa: F811
    # Flat classes, 5 copies of one picture in `owl`: the default carve (0.2, seed 0) holds out `owl/0.png`.
    files = {f"owl/{i}.png": image(40) for i in range(5)}
    files.update({f"bee/{i}.png": image(60 + i) for i in range(5)})
    headers = new_tenant(settings)
    body = post(client, headers, zip_bytes(files)).json()
    assert body["per_class"]["owl"] == {"train": 4, "test": 1}
    assert body["duplicates"]["train"] == {"duplicate_images": 3, "groups": 1}
    assert body["duplicates"]["test_in_train"] == 1
    assert body["duplicates"]["examples"][0] == ["owl/1.png", "owl/0.png"]
    # The drop keeps the first by path over the whole upload, although the default carve made it a test image.
    dropped = post(client, headers, zip_bytes(files), drop_duplicates="yes").json()
    assert dropped["duplicates"]["dropped"] == 4
    assert {e["path"] for e in dropped["errors"]} == {f"owl/{i}.png" for i in range(1, 5)}
    assert dropped["per_class"]["owl"] == {"train": 1, "test": 0}


def test_a_drop_option_that_is_no_boolean_is_refused_and_leaves_nothing(client: TestClient,  # noqa: F811
                                                                         settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    before = dataset_dirs(settings)
    response = post(client, headers, leaky_split_archive(), drop_duplicates="sometimes")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error" and "true or false" in error["message"]
    assert error["details"][0]["field"] == "drop_duplicates"
    assert client.get("/v1/datasets", headers=headers).json()["items"] == []
    assert dataset_dirs(settings) == before
    assert not any(Path(settings.datasets_dir, ".incoming").glob("*"))
