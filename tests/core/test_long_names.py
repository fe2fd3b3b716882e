"""Names a file system refuses: every path component the service writes is at most 255 bytes of
UTF-8.

The one cutting rule (`fd2_core.data.names.fit_name` / `distinct_name`) serves the distilled
archive's folders and files (`fd2_core.artifacts`) and the folders and files extracted from an
upload (`ShortNames`); the soft-label replay still reads the ipc index from the `_<j>` ending. A
class named `B: benign` (a letter and a colon, common in medical data) is a relative name from the
upload to the packaged archive.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_spec

from fd2_core.artifacts import (
    image_ending,
    image_member,
    ipc_index_of,
    png_bytes,
    safe_folder_names,
    write_distilled_tar,
)
from fd2_core.data.archive import extract_archive
from fd2_core.data.fgsynth import generate
from fd2_core.data.layout import MAX_LABEL_CHARS, scan_manifest_items, scan_source
from fd2_core.data.names import MAX_NAME_BYTES, ShortNames, distinct_name, fit_name
from fd2_core.distilled import SoftLabelReplay, read_distilled
from fd2_core.pipeline import run
from fd2_core.spec_resolution import resolve_spec

BIRD = "鳥"  # 3 bytes of UTF-8
FRAKTUR = "𝔅"  # 4 bytes of UTF-8
LONGEST_LABEL = FRAKTUR * MAX_LABEL_CHARS  # the longest manifest label accepted: 800 bytes
LONGEST_FOLDER = BIRD * 85  # 255 bytes: the longest folder name a file system holds


def _size(name: str) -> int:
    return len(name.encode("utf-8"))


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


# ---------------------------------------------------------------- the cutting rule


@pytest.mark.parametrize("char", ["a", "é", BIRD, FRAKTUR])
def test_a_cut_never_splits_a_character_and_keeps_all_that_fits(char):
    name = char * 300
    for limit in range(0, 2 * MAX_NAME_BYTES):
        cut = fit_name(name, limit)
        assert name.startswith(cut) and _size(cut) <= limit
        # nothing that would still fit is dropped
        assert cut == name or limit < _size(cut) + _size(char)


def test_names_at_the_limit_stay_and_longer_ones_are_cut_to_it():
    assert fit_name(LONGEST_FOLDER) == LONGEST_FOLDER
    assert fit_name(LONGEST_FOLDER + "x") == LONGEST_FOLDER
    assert fit_name(BIRD * 86) == LONGEST_FOLDER
    # 252 bytes: a fourth byte of the 64th does not fit
    assert fit_name(FRAKTUR * 64) == FRAKTUR * 63
    mixed = "a" + BIRD * 85  # 256 bytes: the last bird would be split, so it goes whole
    assert fit_name(mixed) == "a" + BIRD * 84


def test_colliding_long_names_get_distinct_names_within_the_budget():
    taken: set[str] = set()
    names = [BIRD * 90 + tail for tail in ("A", "B", "C", "D")]
    out = []
    for name in names:
        fitted = distinct_name(name, taken, ending=".png")
        taken.add(fitted)
        out.append(fitted)
    assert len(set(out)) == 4
    assert all(_size(n) <= MAX_NAME_BYTES and n.endswith(".png") for n in out)
    assert out[0] == BIRD * 83 + ".png"  # 249 + 4 bytes
    assert out[1:] == [BIRD * 83 + f"~{n}.png" for n in (1, 2, 3)]  # 249 + 6 bytes


def test_a_short_name_is_left_as_it_is():
    assert distinct_name("wren", set(), ending=".png") == "wren.png"
    assert distinct_name("wren", {"wren"}) == "wren~1"


# ---------------------------------------------------------------- the distilled archive's names


def test_short_class_folders_are_named_as_before():
    classes = ["Café", "café", "a/b", "  .x. ", "", "x" * 120, "B: benign"]
    assert safe_folder_names(classes, image_ending(0)) == [
        "Café", "café_1", "a_b", "x", "class_4", "x" * 100, "B_ benign",
    ]


@pytest.mark.parametrize("ipc", [1, 10, 100])
def test_long_class_folders_and_files_fit_and_stay_distinct(ipc):
    classes = [LONGEST_LABEL, LONGEST_LABEL[:-1] + "A", LONGEST_FOLDER, BIRD * 84 + "鵜", "Ab" * 150, "AB" * 150]
    folders = safe_folder_names(classes, image_ending(ipc - 1))
    assert len({f.casefold() for f in folders}) == len(classes)
    for folder in folders:
        for j in range(ipc):
            member = image_member(folder, j)
            assert all(_size(part) <= MAX_NAME_BYTES for part in _components(member))
            assert ipc_index_of(member) == j


@pytest.mark.parametrize("folder", ["wren", "wren_3", "x_1_2", BIRD * 80 + "_7", "B_ benign", "a.b_c"])
def test_the_ipc_index_is_read_back_from_the_name(folder):
    for j in (0, 1, 9, 42, 99):
        assert ipc_index_of(image_member(folder, j)) == j


def _extract_with_tar(archive: Path, dest: Path) -> set[str]:
    """Unpack with the system's tar, which refuses a component over 255 bytes; the files it
    wrote."""
    assert shutil.which("tar"), "the system tar is needed to check what users unpack"
    dest.mkdir()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(dest)], check=True, capture_output=True)
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}


def _labels_and_manifest(root: Path) -> tuple[list[dict[str, str]], dict]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def test_distilled_archive_of_the_longest_labels_unpacks_with_tar(tmp_path):
    classes = [LONGEST_LABEL, LONGEST_LABEL[:-1] + "A", "B: benign", "wren"]
    k, ipc = len(classes), 3
    images = torch.randint(0, 256, (ipc * k, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels, ipc_index = torch.arange(k).repeat(ipc), torch.arange(ipc).repeat_interleave(k)
    archive = write_distilled_tar(tmp_path / "distilled.tar.gz", images, labels, ipc_index, classes,
                                  {"dataset": {"classes": classes}})
    files = _extract_with_tar(archive, tmp_path / "out")
    rows, manifest = _labels_and_manifest(tmp_path / "out")
    pngs = {f for f in files if f.endswith(".png")}
    assert len(pngs) == ipc * k and files == pngs | {"labels.csv", "manifest.json"}
    assert {r["file"] for r in rows} == pngs == set(manifest["files"])
    assert {r["class_name"] for r in rows} == set(classes)  # the original names, uncut
    assert "images/wren/wren_2.png" in pngs and "images/B_ benign/B_ benign_0.png" in pngs
    for row in rows:
        assert all(_size(part) <= MAX_NAME_BYTES for part in _components(row["file"]))
        i = int(row["class_index"]) + k * ipc_index_of(row["file"])
        assert (tmp_path / "out" / row["file"]).read_bytes() == png_bytes(images[i])
    read = read_distilled(tmp_path / "out")
    assert read.images.shape == images.shape


# ---------------------------------------------------------------- uploaded members


def _tar_upload(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extraction_cuts_names_a_file_system_refuses(tmp_path, make_image):
    png = make_image(tmp_path / "src.png").read_bytes()
    long_a, long_b = BIRD * 100 + "A", BIRD * 100 + "B"  # 301 bytes each, equal once cut
    members = {f"{long_a}/0.png": png, f"{long_a}/1.png": png, f"{long_b}/0.png": png,
               f"{LONGEST_FOLDER}/0.png": png,  # fits: keeps its name, though it comes last
               f"wren/{FRAKTUR * 70}.png": png, "wren/2.png": png}
    result = extract_archive(_tar_upload(tmp_path / "up.tgz", members), tmp_path / "out")
    root = result.root
    assert sorted(p.name for p in root.iterdir()) == sorted([LONGEST_FOLDER, BIRD * 84 + "~1", BIRD * 84 + "~2",
                                                            "wren"])
    assert sorted(p.name for p in (root / (BIRD * 84 + "~1")).iterdir()) == ["0.png", "1.png"]
    assert sorted(p.name for p in (root / "wren").iterdir()) == sorted(["2.png", FRAKTUR * 62 + ".png"])
    assert all(_size(p.name) <= MAX_NAME_BYTES for p in root.rglob("*"))
    assert result.skipped == [] and result.files == 6
    [warning] = [w for w in result.warnings if w.code == "names_shortened"]
    assert warning.details["count"] == 2 and warning.details["limit_bytes"] == MAX_NAME_BYTES
    assert warning.details["examples"] == [{"name": long_a, "shortened": BIRD * 84 + "~1"},
                                           {"name": long_b, "shortened": BIRD * 84 + "~2"}]
    assert scan_source(root, test_fraction=0.0).classes == sorted([LONGEST_FOLDER, BIRD * 84 + "~1",
                                                                    BIRD * 84 + "~2", "wren"])


def test_a_cut_file_name_is_not_reported():
    short = ShortNames([(("wren", "x" * 300 + ".png"), False), (("wren",), True)])
    assert short.on_disk(("wren", "x" * 300 + ".png")) == ("wren", "x" * 251 + ".png")
    assert short.warnings == []


def test_manifest_rows_with_a_colon_class_folder_are_relative(tmp_path, make_image):
    for name in ("B: benign/0.png", "B: benign/1.png", "M: malignant/0.png", "M: malignant/1.png"):
        make_image(tmp_path / name)
    rows = [{"path": p, "label": p.split("/")[0]}
            for p in ("B: benign/0.png", "B: benign/1.png", "M: malignant/0.png", "M: malignant/1.png")]
    rows += [{"path": "C:/x.png", "label": "x"}, {"path": "C:\\x.png", "label": "x"},
             {"path": "\\\\server\\share\\x.png", "label": "x"}, {"path": "//server/share/x.png", "label": "x"}]
    layout = scan_manifest_items(tmp_path, rows, test_fraction=0.0)
    assert layout.classes == ["B: benign", "M: malignant"] and len(layout.items) == 4
    refused = {e.path: e.reason for e in layout.errors}
    assert set(refused) == {"C:/x.png", "C:\\x.png", "\\\\server\\share\\x.png", "//server/share/x.png"}
    assert all(reason.startswith("absolute path refused") for reason in refused.values())


# ---------------------------------------------------------------- through the whole library


def test_longest_and_colon_class_names_survive_upload_job_and_package(tmp_path):
    """An upload whose class folders are the longest names a file system holds (two equal once the
    distilled archive's `_<j>.png` is counted), one longer (cut at extraction) and `B: benign`:
    scanned, run with the tiny spec, packaged, and unpacked by the system's tar with every file
    named in labels.csv and manifest.json; the soft-label replay reads the unpacked folder in the
    recorded order."""
    classes = [LONGEST_FOLDER, BIRD * 84 + "鵜", FRAKTUR * 75, "B: benign"]
    data = generate(num_classes=4, image_size=32, train_per_class=16, test_per_class=0, seed=0)
    members: dict[str, bytes] = {}  # flat `<class>/<image>`: `B: benign/…` is a member's first part
    for n, (image, label) in enumerate(zip(data.train_images, data.train_labels, strict=True)):
        members[f"{classes[int(label)]}/{n:03d}.png"] = png_bytes(torch.from_numpy(image).permute(2, 0, 1))
    extraction = extract_archive(_tar_upload(tmp_path / "upload.tgz", members), tmp_path / "dataset")
    assert [w.code for w in extraction.warnings] == ["names_shortened"] and extraction.skipped == []
    layout = scan_source(extraction.root, test_fraction=0.2, seed=0)
    expected = sorted([LONGEST_FOLDER, BIRD * 84 + "鵜", FRAKTUR * 63, "B: benign"])
    assert layout.classes == expected and layout.errors == []
    assert layout.per_class["B: benign"] == {"train": 13, "test": 3}  # a carved test share

    ipc = 2
    result = run(resolve_spec(tiny_spec(ipc=ipc, eval_random_baseline=False)), layout, tmp_path / "job")
    files = _extract_with_tar(result.artifacts["distilled.tar.gz"], tmp_path / "unpacked")
    rows, manifest = _labels_and_manifest(tmp_path / "unpacked")
    pngs = {f for f in files if f.endswith(".png")}
    assert len(pngs) == ipc * len(expected) and files == pngs | {"labels.csv", "manifest.json"}
    assert {r["file"] for r in rows} == pngs == set(manifest["files"])
    assert sorted({r["class_name"] for r in rows}) == expected == manifest["dataset"]["classes"]
    for name in files:
        assert all(_size(part) <= MAX_NAME_BYTES for part in _components(name))
        if name in manifest["files"]:
            digest = hashlib.sha256((tmp_path / "unpacked" / name).read_bytes()).hexdigest()
            assert digest == manifest["files"][name]

    replay = SoftLabelReplay(tmp_path / "unpacked", result.artifacts["soft_labels.safetensors"])
    read = read_distilled(tmp_path / "unpacked")
    k = len(expected)
    mean = torch.tensor(manifest["normalization"]["mean"]).view(3, 1, 1)
    std = torch.tensor(manifest["normalization"]["std"]).view(3, 1, 1)
    for row_index, row in enumerate(rows):
        j = int(re.fullmatch(r".*_(\d+)\.png", row["file"]).group(1))
        position = j * k + int(row["class_index"])
        assert replay.labels[position] == int(row["class_index"])
        expected_image = (read.images[row_index].float() / 255.0 - mean) / std
        assert torch.allclose(replay.images[position], expected_image)
    assert len(replay[0]) == 2
