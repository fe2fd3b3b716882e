"""4xx answers name the cause and the fix: the expected form field, the skip reasons of unusable data."""

from __future__ import annotations

from api_helpers import (  # noqa: F401  (client and settings are fixtures)
    client,
    dataset_dirs,
    image_tree,
    new_tenant,
    png_bytes,
    ready_dataset,
    settings,
    submit,
    upload,
    zip_bytes,
)
from fastapi.testclient import TestClient

from fd2_config.settings import Settings


def _nothing_kept(client: TestClient, settings: Settings, headers: dict[str, str], before: list[str]) -> None:  # noqa: F811
    assert client.get("/v1/datasets", headers=headers).json()["items"] == []
    assert dataset_dirs(settings) == before


def test_an_archive_in_another_form_field_is_refused_naming_both_fields(client: TestClient,  # noqa: F811
                                                                        settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    before = dataset_dirs(settings)
    archive = zip_bytes(image_tree({"wren": 20, "finch": 20}))
    assert len(archive) > 4096  # larger than a text field may be: the answer must not be "too long"
    response = client.post("/v1/datasets", headers=headers, files={"files": ("birds.zip", archive, "application/zip")})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"][0]["field"] == "file" and error["details"][0]["received_field"] == "files"
    assert "'files'" in error["message"] and "'file'" in error["message"]
    _nothing_kept(client, settings, headers, before)


def test_a_too_long_text_field_says_what_the_form_takes(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    before = dataset_dirs(settings)
    archive = zip_bytes(image_tree({"wren": 2, "finch": 2}))
    for field, hint in (("files", "'file'"), ("name", "shorten it")):
        response = client.post("/v1/datasets", headers=headers, data={field: "x" * 5000},
                               files={"file": ("d.zip", archive, "application/zip")})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        detail = error["details"][0]
        assert (detail["field"], detail["type"], detail["max_bytes"]) == (field, "string_too_long", 4096)
        assert hint in error["message"]
    _nothing_kept(client, settings, headers, before)


def test_a_body_that_is_not_multipart_names_what_arrived(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = {**new_tenant(settings), "Content-Type": "application/json"}
    response = client.post("/v1/datasets", headers=headers, content=b"{}")
    assert response.status_code == 415
    assert response.json()["error"]["details"] == {"received": "application/json", "expected": "multipart/form-data"}


def test_images_outside_class_folders_answer_the_skip_reasons(client: TestClient,  # noqa: F811
                                                              settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    before = dataset_dirs(settings)
    phone_export = {f"IMG_{i:04d}.png": png_bytes(i * 20) for i in range(5)}
    response = upload(client, headers, zip_bytes(phone_export))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "no_images"
    assert error["details"]["skipped_files"] == 5
    assert error["details"]["top_reasons"] == [
        {"reason": "not inside a class folder of the dataset root", "count": 5, "example": "IMG_0000.png"}]
    assert "<class>/<image>" in error["message"]
    _nothing_kept(client, settings, headers, before)


def test_files_left_out_by_extraction_count_among_the_reasons(client: TestClient,  # noqa: F811
                                                              settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    nested = zip_bytes(image_tree({"wren": 2, "finch": 2}))
    response = upload(client, headers, zip_bytes({"part1.zip": nested, "part2.zip": nested, "notes.txt": b"x"}))
    assert response.status_code == 422, response.text
    reasons = {r["reason"]: r for r in response.json()["error"]["details"]["top_reasons"]}
    assert reasons["nested archive not extracted"]["count"] == 2


def test_one_class_answers_the_class_found(client: TestClient, settings: Settings) -> None:  # noqa: F811
    response = upload(client, new_tenant(settings), zip_bytes(image_tree({"only": 3})))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "one_class" and error["details"]["classes"] == ["only"]
    assert "at least two classes" in error["message"]


def test_unknown_ids_paths_and_spec_fields_say_where_to_look(client: TestClient,  # noqa: F811
                                                             settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    missing = client.get("/v1/datasets/ds_unknown", headers=headers).json()["error"]
    assert missing["code"] == "not_found" and "GET /v1/datasets" in missing["message"]
    nowhere = client.get("/v1/nowhere", headers=headers)
    assert nowhere.status_code == 404 and "/docs" in nowhere.json()["error"]["message"]

    dataset = ready_dataset(client, headers, {"wren": 3, "finch": 3})
    typo = submit(client, headers, dataset["id"], {"ipcc": 1})
    assert typo.status_code == 422
    error = typo.json()["error"]
    assert error["code"] == "invalid_spec" and error["details"][0]["field"] == "ipcc"
    assert "did you mean 'ipc'" in error["message"]
    too_many = submit(client, headers, dataset["id"], {"ipc": 9}).json()["error"]
    assert too_many["code"] == "ipc_too_large" and too_many["details"]["field"] == "spec.ipc"
    assert f"at most {too_many['details']['smallest_class_train_images']}" in too_many["message"]
