"""Data refusals say why and what to do: a fix in every message, the top skip reasons in `details`."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from fd2_core.data.dataset import load_dataset
from fd2_core.data.errors import DEFAULT_FIXES, DataError, FileError, skip_reason_kind, summarize_skipped
from fd2_core.data.layout import scan_source


def test_every_error_code_has_a_default_fix_and_a_message_never_repeats_it():
    from fd2_core.data.errors import DATA_ERROR_CODES

    assert set(DEFAULT_FIXES) == DATA_ERROR_CODES
    error = DataError("too_large", "the archive unpacks to more than 10 bytes")
    assert error.message == f"the archive unpacks to more than 10 bytes; {DEFAULT_FIXES['too_large']}"
    assert DataError("too_large", error.message).message == error.message
    assert DataError("bad_manifest", "rows need a label", fix="").message == "rows need a label"
    assert DataError("not_found", "x not found", fix="check it").as_dict() == {"code": "not_found",
                                                                           "message": "x not found; check it"}


def test_skip_reasons_are_counted_by_cause_not_by_file_detail():
    assert skip_reason_kind("cannot decode image: truncated at byte 17") == "cannot decode image"
    assert skip_reason_kind("skipped: not an image file") == "not an image file"
    assert skip_reason_kind("class 'wren' has no training images") == "class has no training images"
    assert skip_reason_kind("too many pixels (decompression bomb)") == "too many pixels"
    errors = [FileError(f"a/{i}.png", f"cannot decode image: error {i}") for i in range(4)]
    errors += [FileError("notes.txt", "skipped: not an image file"), FileError("b.txt", "skipped: not an image file")]
    errors += [FileError("x", "symbolic link not followed"), FileError("y", "nested archive not extracted"),
               FileError("z" * 500, "special file refused")]
    summary = summarize_skipped(errors)
    assert summary["skipped_files"] == 9
    assert summary["top_reasons"] == [
        {"reason": "cannot decode image", "count": 4, "example": "a/0.png"},
        {"reason": "not an image file", "count": 2, "example": "notes.txt"},
        {"reason": "symbolic link not followed", "count": 1, "example": "x"},
    ]
    long = summarize_skipped([FileError("z" * 500, "special file refused")])["top_reasons"][0]["example"]
    assert len(long) <= 200 and "…" in long


def test_images_outside_class_folders_say_so_with_counts_and_an_example(tmp_path, make_image):
    for index in range(5):
        make_image(tmp_path / f"IMG_{index:04d}.jpg", color=(index * 40, 10, 10))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        scan_source(tmp_path)
    error = info.value
    assert error.code == "no_images"
    assert error.details == {"skipped_files": 6, "top_reasons": [
        {"reason": "not inside a class folder of the dataset root", "count": 6, "example": "IMG_0000.jpg"}]}
    assert "6 not inside a class folder of the dataset root (e.g. 'IMG_0000.jpg')" in error.message
    assert "one folder per class: <class>/<image>" in error.message and "\n" not in error.message


def test_one_class_lists_the_class_and_the_skipped_files(tmp_path, make_image):
    for index in range(3):
        make_image(tmp_path / "wren" / f"{index}.png", color=(index * 60, 0, 0))
    (tmp_path / "wren" / "index.html").write_text("<html>")
    with pytest.raises(DataError) as info:
        scan_source(tmp_path)
    assert info.value.code == "one_class"
    assert info.value.details["classes"] == ["wren"]
    assert info.value.details["top_reasons"] == [{"reason": "not an image file", "count": 1,
                                                  "example": "wren/index.html"}]
    assert "at least two classes" in info.value.message


def test_a_manifest_without_usable_rows_says_how_to_fix_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps([{"path": "gone.png", "label": "a"}]))
    with pytest.raises(DataError) as info:
        scan_source(tmp_path)
    assert info.value.code == "no_images"
    assert info.value.details["top_reasons"] == [{"reason": "file not found", "count": 1, "example": "gone.png"}]
    assert "relative to the manifest's folder" in info.value.message


def test_what_archive_extraction_left_out_is_part_of_the_reasons(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("a/0.png", b"x")
    outer = tmp_path / "photos.zip"
    with zipfile.ZipFile(outer, "w") as archive:
        archive.writestr("birds/part1.zip", inner.getvalue())
        archive.writestr("birds/part2.zip", inner.getvalue())
    with pytest.raises(DataError) as info:
        load_dataset(outer, 32)
    assert info.value.code == "no_images"
    reasons = {r["reason"]: r for r in info.value.details["top_reasons"]}
    assert reasons["nested archive not extracted"]["count"] == 2
    assert "2 nested archive not extracted (e.g. 'birds/part1.zip')" in info.value.message
