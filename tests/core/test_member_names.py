"""Names in another encoding: zip and tar members and folders on disk come out as NFC text, with warnings.

Valid UTF-8 is UTF-8 whatever a zip's flag says; other names are decoded with one code page detected per
archive or folder tree (reported as `names_code_page`); what still cannot be decoded is kept percent-encoded
(reported as `names_undecodable`), from which the original bytes come back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from api_helpers import client, new_tenant, settings, upload  # noqa: F401  (client and settings are fixtures)
from fastapi.testclient import TestClient
from hostile_corpus import RawNameInfo, image_bytes, raw_tree, tar_in_encoding, tree, zip_raw_names
from pipeline_helpers import tiny_spec

from fd2_config.settings import Settings
from fd2_core.artifacts import write_distilled_tar
from fd2_core.data.archive import extract_archive
from fd2_core.data.dataset import load_dataset
from fd2_core.data.errors import DataError
from fd2_core.data.layout import scan_source, validate_images
from fd2_core.data.names import decode_names, escape_name, unescape_name

ROOT = Path(__file__).resolve().parents[2]
FRENCH = {"Café, crème": 3, "Mésange bleue": 3}
LEGACY = [
    (FRENCH, "cp1252"),
    ({"Grünfink": 3, "Straße": 3}, "cp437"),
    ({"Синица": 3, "Воробей": 3}, "cp866"),
    ({"日本の鳥": 3, "すずめ": 3}, "shift_jis"),
]


def _nfc(text: str) -> bool:
    return unicodedata.is_normalized("NFC", text)


def _extract(tmp_path: Path, data: bytes, name: str = "upload.zip"):
    archive = tmp_path / name
    archive.write_bytes(data)
    return extract_archive(archive, tmp_path / "out")


def _disk_names(folder: Path) -> set[bytes]:
    return {os.fsencode(entry.name) for entry in os.scandir(folder)}


def _codes(warnings) -> list[str]:
    return [w.code for w in warnings]


# ---------------------------------------------------------------- the decoding rule


def test_escaped_form_is_ascii_and_gives_the_bytes_back():
    raw = b"caf\xe9 100% \x01\xff/0.png"
    name = escape_name(raw)
    assert name == "caf%E9 100%25 %01%FF/0.png"
    assert name.isascii() and unescape_name(name) == raw


def test_utf8_names_need_no_guess_and_come_out_nfc():
    decoding = decode_names(["Café/0.png".encode(), unicodedata.normalize("NFD", "Café/1.png").encode()])
    assert set(decoding.names.values()) == {"Café/0.png", "Café/1.png"}
    assert all(_nfc(text) for text in decoding.names.values())
    assert decoding.encoding is None and decoding.warnings == []


@pytest.mark.parametrize(("classes", "encoding"), LEGACY, ids=[e for _, e in LEGACY])
def test_legacy_names_are_decoded_with_one_detected_code_page(classes, encoding):
    raws = list(raw_tree(classes, encoding))
    decoding = decode_names(raws)
    assert sorted({decoding.text(raw).split("/")[0] for raw in raws}) == sorted(classes)
    [warning] = decoding.warnings
    assert warning.code == "names_code_page" and warning.details["count"] == len(raws)
    assert codecs_equal(warning.details["encoding"], encoding)
    example = warning.details["examples"][0]
    assert unescape_name(example["bytes"]) == raws[0] and example["name"] == decoding.text(raws[0])


@pytest.mark.parametrize("encoding", ["cp1251", "cp866", "koi8_r"])
def test_many_legacy_names_are_detected_as_well_as_a_few(encoding):
    words = ["Синица", "Воробей", "Снегирь", "Дятел", "Сорока", "Щегол"]
    raws = [f"{words[i % len(words)]} {i}/{i}.png".encode(encoding) for i in range(3000)]
    decoding = decode_names(raws)
    assert decoding.encoding == encoding
    assert decoding.text(raws[7]) == "Воробей 7/7.png"


def codecs_equal(detected: str, written: str) -> bool:
    """The detected page reads the written one's names alike (cp932 is Shift_JIS as Windows writes it)."""
    return detected == written or (detected, written) == ("cp932", "shift_jis")


def test_undecodable_names_are_kept_percent_encoded_and_warned():
    decoding = decode_names([b"ok/0.png", b"wren\x01\xff/0.png"])
    assert decoding.text(b"wren\x01\xff/0.png") == "wren%01%FF/0.png"
    [warning] = decoding.warnings
    assert warning.code == "names_undecodable"
    assert warning.details["examples"] == ["wren%01%FF/0.png"]
    assert "unquote_to_bytes" in warning.message


# ---------------------------------------------------------------- zip members


def test_finder_zip_nfd_names_without_flag_come_out_nfc(tmp_path):
    members = raw_tree({"Café, crème": 2, "wren": 2}, "utf-8", "NFD")
    assert all(not RawNameInfo(raw).flag_bits & 0x800 for raw in members)
    result = _extract(tmp_path, zip_raw_names(members))
    assert _disk_names(result.root) == {"Café, crème".encode(), b"wren"}
    assert result.warnings == [] and result.skipped == []
    layout = scan_source(result.root)
    assert layout.classes == ["Café, crème", "wren"] and layout.warnings == []


@pytest.mark.parametrize(("classes", "encoding"), LEGACY, ids=[e for _, e in LEGACY])
def test_legacy_zip_names_become_class_names_with_a_warning(tmp_path, classes, encoding):
    result = _extract(tmp_path, zip_raw_names(raw_tree(classes, encoding)))
    assert _disk_names(result.root) == {name.encode() for name in classes}
    assert _codes(result.warnings) == ["names_code_page"]
    assert codecs_equal(result.warnings[0].details["encoding"], encoding)
    assert scan_source(result.root).classes == sorted(classes)


def test_nfc_and_nfd_spellings_merge_and_only_a_same_file_collides(tmp_path):
    members = {**raw_tree({"Café": 2, "wren": 2}, "utf-8", "NFC"), **raw_tree({"Café": 3}, "utf-8", "NFD")}
    result = _extract(tmp_path, zip_raw_names(members))
    assert sorted(e.path for e in result.skipped) == ["Café/0.png", "Café/1.png"]
    assert {e.reason for e in result.skipped} == {"duplicate archive member; the first one is kept"}
    assert result.files == 5
    layout = scan_source(result.root)
    assert layout.classes == ["Café", "wren"]
    assert sum(layout.per_class["Café"].values()) == 3
    # the first member of a colliding pair is the one kept
    assert (result.root / "Café" / "0.png").read_bytes() == tree({"Café": 1})["Café/0.png"]


def test_undecodable_zip_names_keep_their_bytes_in_the_escaped_form(tmp_path):
    members = {b"wren\x01\xff/" + f"{i}.png".encode(): image_bytes(color=(i, 9, 9)) for i in range(2)}
    members.update(raw_tree({"finch": 2}, "ascii"))
    result = _extract(tmp_path, zip_raw_names(members))
    assert _disk_names(result.root) == {b"wren%01%FF", b"finch"}
    assert _codes(result.warnings) == ["names_undecodable"]
    assert unescape_name("wren%01%FF") == b"wren\x01\xff"
    assert scan_source(result.root).classes == ["finch", "wren%01%FF"]


def test_info_zip_unicode_path_field_wins_when_its_checksum_matches(tmp_path):
    def member(stored: bytes, utf8: str, crc_of: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        info = RawNameInfo(stored)
        body = b"\x01" + struct.pack("<L", zlib.crc32(crc_of)) + utf8.encode()
        info.extra = struct.pack("<HH", 0x7075, len(body)) + body
        return info, image_bytes()

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in (member(b"??????/0.png", "Синица/0.png", b"??????/0.png"),
                           member(b"wren/0.png", "Воробей/0.png", b"something else")):
            archive.writestr(info, data)
    result = _extract(tmp_path, buffer.getvalue())
    assert _disk_names(result.root) == {"Синица".encode(), b"wren"}
    assert result.warnings == []


def test_escapes_are_still_refused_whatever_the_encoding(tmp_path):
    with pytest.raises(DataError) as info:
        _extract(tmp_path, zip_raw_names({b"..\\..\\caf\xe9.png": b"x", **raw_tree({"wren": 2}, "ascii")}))
    assert info.value.code == "path_escape"
    assert json.dumps(info.value.message, ensure_ascii=False).encode("utf-8")  # no surrogates in the message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.zip"]


# ---------------------------------------------------------------- tar members


def test_latin1_tar_names_are_decoded_with_a_warning(tmp_path):
    result = _extract(tmp_path, tar_in_encoding(FRENCH, "latin-1"), "upload.tgz")
    assert _disk_names(result.root) == {name.encode() for name in FRENCH}
    assert _codes(result.warnings) == ["names_code_page"]
    assert result.warnings[0].details["examples"][0]["bytes"].startswith("Caf%E9, cr%E8me/")


def test_tar_nfd_names_merge_with_nfc_ones(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for index, form in enumerate(("NFC", "NFD", "NFD")):
            data = image_bytes(color=(index, 40, 40))
            info = tarfile.TarInfo(unicodedata.normalize(form, f"Mésange/{index}.png"))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    result = _extract(tmp_path, buffer.getvalue(), "upload.tgz")
    assert _disk_names(result.root) == {b"M\xc3\xa9sange"}
    assert result.files == 3 and result.warnings == []


# ---------------------------------------------------------------- folders on disk


def _write_images(folder: bytes, count: int, shade: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        with open(os.path.join(folder, f"{index}.png".encode()), "wb") as out:
            out.write(image_bytes(color=(shade, 10 * index, 60)))


def test_folders_spelled_nfc_and_nfd_on_disk_are_one_class(tmp_path):
    root = os.fsencode(tmp_path)
    _write_images(os.path.join(root, "Café".encode()), 2, 10)
    _write_images(os.path.join(root, unicodedata.normalize("NFD", "Café").encode()), 2, 20)
    _write_images(os.path.join(root, b"wren"), 3, 30)
    layout = scan_source(tmp_path)
    assert layout.classes == ["Café", "wren"]
    assert sum(layout.per_class["Café"].values()) == 4
    assert layout.warnings == []


def test_invalid_utf8_folders_on_disk_are_decoded_for_the_whole_tree(tmp_path):
    root = os.fsencode(tmp_path)
    for shade, name in enumerate(FRENCH):
        _write_images(os.path.join(root, name.encode("cp1252")), 3, 40 * shade)
    with open(os.path.join(root, "Café, crème".encode("cp1252"), b"notes.txt"), "wb") as out:
        out.write(b"not an image")
    layout = scan_source(tmp_path)
    assert layout.classes == sorted(FRENCH)
    assert [(e.path, e.reason) for e in layout.errors] == [("Café, crème/notes.txt", "skipped: not an image file")]
    assert _codes(layout.warnings) == ["names_code_page"]
    assert layout.warnings[0].details["encoding"] == "cp1252"
    assert "file and folder names" in layout.warnings[0].message
    assert "rename the files and folders" in layout.warnings[0].message  # a folder is no archive to re-create
    summary = validate_images(layout).summary()
    assert json.dumps(summary, ensure_ascii=False).encode("utf-8")  # no surrogate escapes anywhere


def test_undecodable_folder_on_disk_is_shown_percent_encoded(tmp_path):
    root = os.fsencode(tmp_path)
    _write_images(os.path.join(root, b"wren\x01\xff"), 3, 10)
    _write_images(os.path.join(root, b"finch"), 3, 90)
    with open(os.path.join(root, b"finch", b"bad\x01\xff.txt"), "wb") as out:
        out.write(b"x")
    layout = scan_source(tmp_path)
    assert layout.classes == ["finch", "wren%01%FF"]
    assert [e.path for e in layout.errors] == ["finch/bad%01%FF.txt"]
    assert _codes(layout.warnings) == ["names_undecodable"]
    # the item paths still open the real files
    assert all(item.path.is_file() for item in layout.items)


def test_loaded_dataset_and_distilled_tar_carry_nfc_names(tmp_path):
    archive = tmp_path / "legacy.zip"
    archive.write_bytes(zip_raw_names({**raw_tree(FRENCH, "cp1252"),
                                       **raw_tree({"Grünfink": 3}, "utf-8", "NFD")}))
    data = load_dataset(archive, 8, test_fraction=0.0)
    assert data.classes == ["Café, crème", "Grünfink", "Mésange bleue"]
    assert [c for c in _codes(data.warnings) if c.startswith("names_")] == ["names_code_page"]  # + duplicates
    k = len(data.classes)
    out = write_distilled_tar(tmp_path / "distilled.tar.gz", torch.zeros(k, 3, 4, 4, dtype=torch.uint8),
                              torch.arange(k), torch.zeros(k, dtype=torch.long), data.classes, {})
    with tarfile.open(out) as tar:
        names = tar.getnames()
        rows = list(csv.reader(io.StringIO(tar.extractfile("labels.csv").read().decode("utf-8"))))
    assert all(_nfc(name) for name in names) and "images/Café, crème/Café, crème_0.png" in names
    assert [row[2] for row in rows[1:]] == data.classes


# ---------------------------------------------------------------- the service and the CLI


def test_dataset_resource_shows_nfc_names_and_the_warning(client: TestClient, settings: Settings) -> None:  # noqa: F811
    headers = new_tenant(settings)
    members = {**raw_tree(FRENCH, "cp1252"), **raw_tree({"Grünfink": 2}, "utf-8", "NFD")}
    response = upload(client, headers, zip_raw_names(members), filename="legacy.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["classes"] == ["Café, crème", "Grünfink", "Mésange bleue"]
    assert set(body["per_class"]) == set(body["classes"])
    [warning] = [w for w in body["warnings"] if w["code"].startswith("names_")]  # duplicates may warn too
    assert warning["code"] == "names_code_page" and warning["details"]["encoding"] == "cp1252"
    assert warning["details"]["count"] == 6
    assert {"bytes", "name"} <= set(warning["details"]["examples"][0])
    assert client.get(f"/v1/datasets/{body['id']}", headers=headers).json() == body


def test_cli_prints_the_dataset_warnings(tmp_path):
    root = os.fsencode(tmp_path / "data")
    for shade, name in enumerate(["Café, crème", "Mésange bleue", "Rouge-gorge", "wren"]):
        _write_images(os.path.join(root, name.encode("cp1252")), 8, 60 * shade)
    spec = tiny_spec(evaluate=False, eval_random_baseline=False)
    args = [arg for key, value in spec.items() if key not in ("preset", "ipc", "device")
            for arg in ("--set", f"{key}={value}")]
    res = subprocess.run([sys.executable, "-m", "fd2_core", "distill", "--data", str(tmp_path / "data"),
                          "--device", "cpu", "--out", str(tmp_path / "out"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "data warning: 2 file and folder names are not UTF-8; they were decoded as cp1252" in res.stderr
    assert any(line.startswith("WARNING: 2 file and folder names are not UTF-8") for line in res.stdout.splitlines())
    with tarfile.open(tmp_path / "out" / "artifacts" / "distilled.tar.gz") as tar:
        labels = tar.extractfile("labels.csv").read().decode("utf-8")
    assert "Café, crème" in labels and "Mésange bleue" in labels
