"""Dataset upload, listing and deletion through the API; failed uploads leave no row and no file."""

from __future__ import annotations

import io
import zipfile

import pytest
from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    dataset_dirs,
    image_tree,
    new_tenant,
    ready_dataset,
    running_client,
    settings,
    submit,
    tar_gz_bytes,
    upload,
    zip_bytes,
)
from fastapi.testclient import TestClient

from fd2_config.settings import Settings


def test_upload_train_folders_counts_every_class(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    files = image_tree({"wren": 4, "finch": 3}, split="train", top="birds")
    files.update(image_tree({"wren": 2, "finch": 1}, split="test", top="birds"))
    files["birds/README.txt"] = b"not an image"
    response = upload(client, headers, zip_bytes(files), filename="birds.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "ready" and body["name"] == "birds"
    assert body["classes"] == ["finch", "wren"] and body["num_classes"] == 2
    assert body["per_class"] == {"finch": {"train": 3, "test": 1}, "wren": {"train": 4, "test": 2}}
    assert body["splits"] == {"train": 7, "test": 3}
    assert any(e["path"].endswith("README.txt") for e in body["errors"])
    assert client.get(f"/v1/datasets/{body['id']}", headers=headers).json() == body
    assert body["id"] in dataset_dirs(settings)


def test_flat_tar_gz_upload_carves_a_test_split(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    archive = tar_gz_bytes(image_tree({"oak": 10, "elm": 5}, split=None))
    response = upload(client, headers, archive, filename="trees.tar.gz", name="my trees")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "my trees"
    for name, total in (("oak", 10), ("elm", 5)):
        counts = body["per_class"][name]
        assert counts["train"] + counts["test"] == total
        assert counts["test"] >= 1 and counts["train"] >= 1
    assert body["splits"]["train"] + body["splits"]["test"] == 15


def _bad_archives() -> dict[str, tuple[bytes, str]]:
    escape = io.BytesIO()
    with zipfile.ZipFile(escape, "w") as archive:
        archive.writestr("../outside.png", b"x")
    return {
        "corrupt": (b"PK\x03\x04 this is not really a zip archive" * 10, "bad_archive"),
        "no_images": (zip_bytes({"train/a/notes.txt": b"hello", "train/b/more.txt": b"hi"}), "no_images"),
        "one_class": (zip_bytes(image_tree({"only": 4})), "one_class"),
        "path_escape": (escape.getvalue(), "path_escape"),
    }


@pytest.mark.parametrize("case", sorted(_bad_archives()))
def test_bad_archives_are_refused_and_leave_nothing(client: TestClient, settings: Settings, case: str) -> None:  # noqa: F811
    headers = new_tenant(settings)
    before = dataset_dirs(settings)
    data, code = _bad_archives()[case]
    response = upload(client, headers, data)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert client.get("/v1/datasets", headers=headers).json() == {"items": [], "next_cursor": None}
    assert dataset_dirs(settings) == before


def test_oversized_upload_answers_413_and_leaves_nothing(settings: Settings) -> None:  # noqa: F811
    small = settings.model_copy(update={"max_upload_bytes": 2000})
    data = zip_bytes(image_tree({"a": 20, "b": 20}))
    assert len(data) > 2000
    with running_client(small) as limited:
        headers = new_tenant(small)
        before = dataset_dirs(small)
        response = upload(limited, headers, data)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "upload_too_large"
        # Also when the client does not announce the size up front (chunked body).
        boundary = "fd2boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        streamed = limited.post("/v1/datasets", content=iter([body[i:i + 512] for i in range(0, len(body), 512)]),
                                headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413
        assert limited.get("/v1/datasets", headers=headers).json()["items"] == []
        assert dataset_dirs(small) == before


def test_upload_needs_a_multipart_file_part(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    wrong_type = client.post("/v1/datasets", headers={**headers, "Content-Type": "application/json"}, content=b"{}")
    assert wrong_type.status_code == 415
    no_file = client.post("/v1/datasets", headers=headers, data={"name": "x"}, files={"other": ("a", b"b")})
    assert no_file.status_code == 422
    assert no_file.json()["error"]["details"][0]["field"] == "file"


def test_dataset_list_is_newest_first_with_cursor(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    ids = [ready_dataset(client, headers, {"a": 2, "b": 2})["id"] for _ in range(3)]
    first = client.get("/v1/datasets", headers=headers, params={"limit": 2}).json()
    assert [d["id"] for d in first["items"]] == ids[::-1][:2]
    second = client.get("/v1/datasets", headers=headers, params={"limit": 2, "cursor": first["next_cursor"]})
    assert [d["id"] for d in second.json()["items"]] == ids[:1]
    assert second.json()["next_cursor"] is None
    bad = client.get("/v1/datasets", headers=headers, params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"


def test_delete_waits_for_jobs_then_removes_files(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    dataset = ready_dataset(client, headers)
    job = submit(client, headers, dataset["id"]).json()
    refused = client.delete(f"/v1/datasets/{dataset['id']}", headers=headers)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).status_code == 202
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 404
    assert dataset["id"] not in dataset_dirs(settings)
    orphan = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
    assert orphan["dataset_id"] is None and orphan["dataset_source"] == "upload"  # its dataset was deleted
