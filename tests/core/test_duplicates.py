"""Duplicates and train/test leakage by decoded pixels, and image formats decided by content, not extension."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from pipeline_helpers import tiny_spec

from fd2_core.cli import duplicate_lines
from fd2_core.data.dataset import load_dataset
from fd2_core.data.duplicates import Fingerprint, duplicate_warnings, find_duplicates
from fd2_core.data.images import decode_image, decode_with_digest, image_digest, is_image_name, pixel_digest
from fd2_core.data.layout import scan_source, validate_images

ROOT = Path(__file__).resolve().parents[2]
NO_DUPLICATES = {"duplicate_images": 0, "groups": 0}


def noise(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    """A photo-like RGB image: no two seeds share pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(img: Image.Image, path: Path, fmt: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **options)
    return path


def same_pixels_other_bytes(img: Image.Image, folder: Path) -> list[Path]:
    """The same pixels as PNG (two compression levels, one with a text chunk), lossless WebP and BMP."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved")
    return [
        save(img, folder / "fast.png", compress_level=1),
        save(img, folder / "small.png", compress_level=9, pnginfo=info),
        save(img, folder / "lossless.webp", lossless=True),
        save(img, folder / "plain.bmp"),
    ]


# ---------------------------------------------------------------- fingerprints


def test_digest_follows_the_pixels_not_the_bytes(tmp_path: Path) -> None:
    img = noise(1)
    paths = same_pixels_other_bytes(img, tmp_path)
    assert len({p.read_bytes() for p in paths}) == len(paths)
    digests = {image_digest(p) for p in paths}
    assert digests == {pixel_digest(np.asarray(img))}
    changed = img.copy()
    changed.putpixel((3, 4), (0, 0, 0) if img.getpixel((3, 4)) != (0, 0, 0) else (1, 1, 1))
    assert image_digest(save(changed, tmp_path / "changed.png")) not in digests
    # The shape is part of the fingerprint: equal bytes laid out differently are other pictures.
    flat = np.arange(36, dtype=np.uint8)
    assert pixel_digest(flat.reshape(2, 6, 3)) != pixel_digest(flat.reshape(6, 2, 3))


def test_digest_is_taken_at_the_files_own_resolution(tmp_path: Path) -> None:
    # A large JPEG would be decoded at a reduced scale for an 8-px array; its fingerprint must not be.
    path = save(noise(2, (256, 192)), tmp_path / "big.jpg", quality=90)
    arr, digest = decode_with_digest(path, 8)
    assert arr.shape == (8, 8, 3)
    assert digest == pixel_digest(np.asarray(Image.open(path).convert("RGB"))) == image_digest(path)
    # Two pictures that differ only below the training resolution are not duplicates.
    base = noise(3, (64, 64))
    other = base.copy()
    other.putpixel((10, 10), (0, 0, 0) if base.getpixel((10, 10)) != (0, 0, 0) else (9, 9, 9))
    for name, img in (("a", base), ("b", other)):
        save(img, tmp_path / "data" / "train" / "ant" / f"{name}.png")
        save(noise(ord(name), (64, 64)), tmp_path / "data" / "train" / "bee" / f"{name}.png")
    assert load_dataset(tmp_path / "data", 8).duplicates["train"] == NO_DUPLICATES


# ---------------------------------------------------------------- formats by content


@pytest.mark.parametrize("name", ["a.jfif", "b.jpe", "c.JIF", "d.JPG", "e.Jpeg", "f.pjpeg"])
def test_jpeg_content_is_read_whatever_its_jpeg_extension(tmp_path: Path, name: str) -> None:
    path = save(Image.new("RGB", (10, 10), (200, 40, 10)), tmp_path / name, "JPEG")
    assert is_image_name(path)
    assert np.abs(decode_image(path, 4).astype(int) - [200, 40, 10]).max() <= 3


def test_a_jpg_holding_png_bytes_is_read_as_png(tmp_path: Path) -> None:
    img = noise(4)
    path = save(img, tmp_path / "photo.jpg", "PNG")
    assert path.read_bytes().startswith(b"\x89PNG")
    # Lossless: exactly the PNG's pixels, which a JPEG decode could not give.
    assert image_digest(path) == pixel_digest(np.asarray(img))


def test_the_scan_opens_image_like_names_only(tmp_path: Path) -> None:
    for c, name in enumerate(("ant", "bee")):
        for i in range(3):
            save(noise(10 * c + i), tmp_path / name / f"{i}.png")
    save(noise(20), tmp_path / "ant" / "x.JFIF", "JPEG")
    save(noise(21), tmp_path / "bee" / "labels.txt", "PNG")  # image bytes, but not an image name: not opened
    save(noise(22), tmp_path / "bee" / "anim.gif")  # opened, and refused by its content
    data = load_dataset(tmp_path, 8, test_fraction=0.0)
    assert len(data.train_images) == 7
    reasons = {e.path: e.reason for e in data.errors}
    assert reasons["bee/labels.txt"] == "skipped: not an image file"
    assert "not a JPEG, PNG, WebP or BMP" in reasons["bee/anim.gif"]


# ---------------------------------------------------------------- counting and dropping rules


def test_counts_per_split_and_test_in_train() -> None:
    prints = [  # given out of name order: the first by name is kept, not the first given
        Fingerprint("train/c.png", "train", "d2"), Fingerprint("train/b.png", "train", "d1"),
        Fingerprint("train/a.png", "train", "d1"), Fingerprint("test/t4.png", "test", "d4"),
        Fingerprint("test/t3.png", "test", "d3"), Fingerprint("test/t2.png", "test", "d3"),
        Fingerprint("test/t1.png", "test", "d2"), Fingerprint("test/t0.png", "test", "d1"),
    ]
    found = find_duplicates(prints)
    assert found.as_dict() == {
        "train": {"duplicate_images": 1, "groups": 1},
        "test": {"duplicate_images": 1, "groups": 1},
        "test_in_train": 2,
        "examples": [["train/a.png", "test/t0.png"], ["train/c.png", "test/t1.png"],
                     ["test/t2.png", "test/t3.png"], ["train/a.png", "train/b.png"]],
        "dropped": 0,
    }
    assert found.dropped == {}
    codes = [w["code"] for w in duplicate_warnings(found, "drop them")]
    assert codes == ["test_in_train", "duplicates"]

    dropped = find_duplicates(prints, drop=True).dropped
    assert {prints[i].name for i in dropped} == {"train/b.png", "test/t0.png", "test/t1.png", "test/t3.png"}
    assert "train/a.png" in dropped[1] and "in train" in dropped[6]
    assert duplicate_warnings(find_duplicates(prints, drop=True), "drop them") == []


def test_pooled_drop_keeps_the_first_of_each_group_over_both_splits() -> None:
    prints = [Fingerprint("b/1.png", "train", "x"), Fingerprint("a/9.png", "test", "x"),
              Fingerprint("c/2.png", "train", "x"), Fingerprint("c/3.png", "test", "y")]
    found = find_duplicates(prints, drop=True, pooled=True)
    assert found.test_in_train == 1 and found.counts["train"] == {"duplicate_images": 1, "groups": 1}
    assert {prints[i].name for i in found.dropped} == {"b/1.png", "c/2.png"}


def test_examples_and_reasons_stay_short() -> None:
    long = "d" * 5000
    prints = [Fingerprint(f"{long}/{i}.png", "train", "same") for i in range(30)]
    found = find_duplicates(prints, drop=True)
    report = found.as_dict()
    assert report["train"] == {"duplicate_images": 29, "groups": 1} and len(report["examples"]) == 10
    assert all(len(name) <= 300 for pair in report["examples"] for name in pair)
    assert all(len(reason) <= 300 for reason in found.dropped.values())


# ---------------------------------------------------------------- the loader and the intake check


def _split_folder(root: Path) -> None:
    """train/ant, train/bee with 4 distinct images each; test with 2 each; then the copies:
    train/ant/copy.png  = train/ant/0.png (byte-identical)
    test/bee/again.webp = test/bee/0.png (same pixels, lossless WebP)
    test/ant/leak.png   = train/bee/2.png (same pixels, other compression): leaked, and under another class."""
    for c, name in enumerate(("ant", "bee")):
        for i in range(4):
            save(noise(100 + 10 * c + i), root / "train" / name / f"{i}.png")
        for i in range(2):
            save(noise(200 + 10 * c + i), root / "test" / name / f"{i}.png")
    (root / "train" / "ant" / "copy.png").write_bytes((root / "train" / "ant" / "0.png").read_bytes())
    save(noise(210), root / "test" / "bee" / "again.webp", lossless=True)
    save(noise(112), root / "test" / "ant" / "leak.png", compress_level=0)


def test_loader_counts_copies_within_splits_and_test_images_in_train(tmp_path: Path) -> None:
    _split_folder(tmp_path)
    data = load_dataset(tmp_path, 8)
    assert data.duplicates == {
        "train": {"duplicate_images": 1, "groups": 1},
        "test": {"duplicate_images": 1, "groups": 1},
        "test_in_train": 1,
        "examples": [["train/bee/2.png", "test/ant/leak.png"], ["test/bee/0.png", "test/bee/again.webp"],
                     ["train/ant/0.png", "train/ant/copy.png"]],
        "dropped": 0,
    }
    assert (len(data.train_images), len(data.test_images)) == (9, 6) and data.errors == []


def test_loader_drops_copies_and_leaked_test_images_on_request(tmp_path: Path) -> None:
    _split_folder(tmp_path)
    data = load_dataset(tmp_path, 8, drop_duplicates=True)
    assert data.duplicates["dropped"] == 3 and data.duplicates["test_in_train"] == 1
    assert (len(data.train_images), len(data.test_images)) == (8, 4)
    assert {e.path for e in data.errors} == {"train/ant/copy.png", "test/bee/again.webp", "test/ant/leak.png"}
    assert data.per_class_counts("test") == {"ant": 2, "bee": 2}
    # What is left holds no copy: loading it again finds none.
    for error in data.errors:
        (tmp_path / error.path).unlink()
    again = load_dataset(tmp_path, 8).duplicates
    assert again["train"] == again["test"] == NO_DUPLICATES and again["test_in_train"] == 0


def test_a_carved_test_split_counts_copies_the_carve_put_on_both_sides(tmp_path: Path) -> None:
    # Flat layout, no test folder: 5 copies of one picture in `ant`; the carve takes 1 of them as test.
    for i in range(5):
        save(noise(7), tmp_path / "ant" / f"{i}.png")
        save(noise(300 + i), tmp_path / "bee" / f"{i}.png")
    data = load_dataset(tmp_path, 8, test_fraction=0.2)
    assert data.per_class_counts("test") == {"ant": 1, "bee": 1}
    assert data.duplicates["train"] == {"duplicate_images": 3, "groups": 1}
    assert data.duplicates["test_in_train"] == 1
    dropped = load_dataset(tmp_path, 8, test_fraction=0.2, drop_duplicates=True)
    assert dropped.per_class_counts("train") == {"ant": 1, "bee": 4}
    assert dropped.per_class_counts("test") == {"ant": 0, "bee": 1}


def test_the_intake_check_fingerprints_with_its_one_decode(tmp_path: Path) -> None:
    _split_folder(tmp_path)
    (tmp_path / "train" / "bee" / "cut.png").write_bytes((tmp_path / "train" / "bee" / "0.png").read_bytes()[:60])
    digests: dict[Path, str] = {}
    layout = validate_images(scan_source(tmp_path), digests=digests)
    assert [e.path for e in layout.errors] == ["train/bee/cut.png"]
    assert set(digests) == {item.path for item in layout.items}
    assert all(digests[item.path] == image_digest(item.path) for item in layout.items)
    assert digests[tmp_path / "train" / "ant" / "copy.png"] == digests[tmp_path / "train" / "ant" / "0.png"]


def test_generated_data_reports_an_empty_duplicate_block() -> None:
    block = load_dataset("fgsynth:classes=3,train=4,test=2", 16).duplicates
    assert block["train"] == block["test"] == NO_DUPLICATES and block["test_in_train"] == 0


# ---------------------------------------------------------------- the CLI summary's lines


def test_summary_lines_warn_while_leaked_test_images_remain() -> None:
    found = find_duplicates([Fingerprint("train/a.png", "train", "x"), Fingerprint("test/b.png", "test", "x"),
                             Fingerprint("train/c.png", "train", "x")]).as_dict()
    line, warning = duplicate_lines(found)
    assert line.startswith("duplicates") and "train 1 (1 groups)" in line and "also in train 1" in line
    assert warning.startswith("WARNING: 1 test image") and "train/a.png = test/b.png" in warning
    assert "--drop-duplicates" in warning
    assert duplicate_lines({**found, "dropped": 2}) == [f"{line}; 2 dropped (listed in report.json → dataset.errors)"]
    clean = find_duplicates([Fingerprint("train/a.png", "train", "x")]).as_dict()
    assert len(duplicate_lines(clean)) == 1 and duplicate_lines({}) == []



# ---------------------------------------------------------------- the CLI and the job report


def _cli_distill(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [arg for key, value in tiny_spec().items() if key not in ("preset", "ipc", "device")
            for arg in ("--set", f"{key}={value}")]
    return subprocess.run([sys.executable, "-m", "fd2_core", "distill", "--data", str(data), "--device", "cpu",
                           "--out", str(out), *sets, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _leaky_folder(root: Path) -> None:
    """16 train and 4 test images per class, plus a byte copy in train and a test image that is in train."""
    for c, name in enumerate(("ant", "bee")):
        for i in range(16):
            save(noise(500 + 20 * c + i, (32, 32)), root / "train" / name / f"{i}.png")
        for i in range(4):
            save(noise(600 + 20 * c + i, (32, 32)), root / "test" / name / f"{i}.png")
    (root / "train" / "bee" / "copy.png").write_bytes((root / "train" / "bee" / "5.png").read_bytes())
    save(noise(503, (32, 32)), root / "test" / "bee" / "leak.png", compress_level=9)


LEAKY = {"train": {"duplicate_images": 1, "groups": 1}, "test": NO_DUPLICATES, "test_in_train": 1,
         "examples": [["train/ant/3.png", "test/bee/leak.png"], ["train/bee/5.png", "train/bee/copy.png"]]}


def test_cli_summary_and_job_report_count_duplicates_and_warn_of_leaks(tmp_path: Path) -> None:
    _leaky_folder(tmp_path / "data")
    res = _cli_distill(tmp_path / "data", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert ("duplicates                train 1 (1 groups), test 0 (0 groups), test images also in train 1"
            in res.stdout.splitlines())
    assert "WARNING: 1 test image(s) also occur in train (e.g. train/ant/3.png = test/bee/leak.png)" in res.stdout
    assert res.stdout.count("also occur in train") == 1  # said once, not again among the dataset warnings
    report = json.loads((tmp_path / "out" / "artifacts" / "report.json").read_text())
    assert report["dataset"]["duplicates"] == {**LEAKY, "dropped": 0}
    assert report["dataset"]["splits"] == {"train": 33, "test": 9}
    # The leak travels with the data into every report and is said while the job runs, not only by the CLI.
    assert [w["code"] for w in report["dataset"]["warnings"]] == ["test_in_train", "duplicates"]
    assert "inflates every test accuracy" in report["dataset"]["warnings"][0]["message"]
    assert "fd2: warning: data warning: 1 test image also occurs in train" in res.stderr


def test_cli_drop_duplicates_trains_and_tests_without_them(tmp_path: Path) -> None:
    _leaky_folder(tmp_path / "data")
    res = _cli_distill(tmp_path / "data", tmp_path / "out", "--drop-duplicates")
    assert res.returncode == 0, res.stderr
    assert "; 2 dropped (listed in report.json → dataset.errors)" in res.stdout
    assert "WARNING: 1 test image" not in res.stdout
    report = json.loads((tmp_path / "out" / "artifacts" / "report.json").read_text())
    assert report["dataset"]["duplicates"] == {**LEAKY, "dropped": 2}
    assert report["dataset"]["splits"] == {"train": 32, "test": 8}
    assert {e["path"] for e in report["dataset"]["errors"]} == {"train/bee/copy.png", "test/bee/leak.png"}
    # The work folder remembers the choice: resuming it without the flag is refused.
    again = _cli_distill(tmp_path / "data", tmp_path / "out")
    assert again.returncode == 2 and "dropped duplicate images" in again.stderr
