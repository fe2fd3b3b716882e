"""Decoding to tensors: image modes, orientation, broken files, archive and fgsynth sources, statistics."""

from __future__ import annotations

import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from fd2_core.data.dataset import ImageDataset, load_dataset, parse_fgsynth_source
from fd2_core.data.errors import DataError, ImageDecodeError
from fd2_core.data.images import decode_image
from fd2_core.data.limits import DataLimits


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but whose pixel data is garbage."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_palette_and_grey_modes_become_rgb(tmp_path):
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 250, 20, 10] + [0] * 762)
    p.save(tmp_path / "p.png")
    Image.new("L", (10, 10), 77).save(tmp_path / "l.png")
    Image.new("LA", (10, 10), (100, 255)).save(tmp_path / "la.png")
    assert (decode_image(tmp_path / "p.png", 8) == [250, 20, 10]).all()
    assert (decode_image(tmp_path / "l.png", 8) == 77).all()
    assert (decode_image(tmp_path / "la.png", 8) == 100).all()


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (0, 0, 255, 255)
    rgba[:, 8:] = (255, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png", 16)
    assert (out[:, :6] == [0, 0, 255]).all()
    assert (out[:, 10:] == 255).all()
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 200, 10, 0, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p_transparent.png", transparency=0)
    assert (decode_image(tmp_path / "p_transparent.png", 8) == 255).all()


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((12, 12), 32896, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = decode_image(tmp_path / "i16.png", 8)
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    out = decode_image(tmp_path / "cmyk.jpg", 8).astype(int)
    assert out[..., 0].min() > 200 and out[..., 1].max() < 60 and out[..., 2].max() < 60


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored left (red) becomes the top
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg", 20).astype(int)
    top, bottom = out[:8].mean((0, 1)), out[12:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_resize_keeps_the_centre_square(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 15:45] = 255  # the centre square plus a margin for the filter support
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 10)
    assert out.shape == (10, 10, 3) and out.min() > 240


@pytest.mark.parametrize("suffix", [".png"] + ([".webp"] if features.check("webp") else []))
def test_animated_images_use_the_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (12, 12), c) for c in ((220, 10, 10), (10, 220, 10), (10, 10, 220))]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    out = decode_image(path, 8).astype(int)
    assert out[..., 0].min() > 180 and out[..., 1].max() < 60


def test_decompression_bomb_headers_are_refused_before_decoding(tmp_path):
    huge = _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    over_cap = _png_header_only(tmp_path / "over_cap.png", 8_000, 6_000)
    for path in (huge, over_cap):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(path, 32)
        assert "too many pixels" in info.value.reason
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path / "small.png", 8, max_pixels=1000)


def _class_tree(root: Path, make_image, classes=("ant", "bee"), per_class=4, ext=".png") -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{i}{ext}", color=(40 * c + 10 * i, 100, 200 - 30 * c), size=(14, 11))


def test_folder_loads_with_broken_files_reported(tmp_path, make_image):
    _class_tree(tmp_path, make_image, per_class=5)
    make_image(tmp_path / "ant" / "photo.JPG")
    jpeg = (tmp_path / "ant" / "photo.JPG").read_bytes()
    (tmp_path / "bee" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = (tmp_path / "bee" / "0.png").read_bytes()
    (tmp_path / "bee" / "cut.png").write_bytes(png[: len(png) - 30])
    (tmp_path / "bee" / "notes.txt").write_text("x")
    ds = load_dataset(tmp_path, 16, workers=2)
    assert ds.classes == ["ant", "bee"]
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape[1:] == (3, 16, 16)
    assert ds.train_labels.dtype == torch.int64
    assert len(ds.train_images) + len(ds.test_images) == 11
    assert {"bee/cut.jpg", "bee/cut.png", "bee/notes.txt"} == {e.path for e in ds.errors}
    assert ds.per_class_counts("train")["ant"] + ds.per_class_counts("test")["ant"] == 6


def test_mean_and_std_come_from_the_train_split(tmp_path, make_image):
    _class_tree(tmp_path, make_image)
    ds = load_dataset(tmp_path, 8)
    pixels = ds.train_images.double() / 255
    assert np.allclose(ds.mean, pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(ds.std, pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-6)


def test_archive_source_is_extracted_and_cleaned_up(tmp_path, make_image, monkeypatch):
    _class_tree(tmp_path / "src" / "wrapped", make_image)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(file, file.relative_to(tmp_path / "src").as_posix())
        zf.writestr("wrapped/ant/nested.zip", b"PK\x05\x06" + b"\0" * 18)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ds = load_dataset(archive, 8)
    assert ds.classes == ["ant", "bee"] and len(ds.train_labels) + len(ds.test_labels) == 8
    assert any("nested archive" in e.reason for e in ds.errors)
    assert list(scratch.iterdir()) == []
    folder = load_dataset(tmp_path / "src", 8)
    assert torch.equal(folder.train_images, ds.train_images)


def test_manifest_sources(tmp_path, make_image):
    _class_tree(tmp_path / "imgs", make_image)
    rows = [{"path": f"imgs/{c}/{i}.png", "label": c, "split": "test" if i == 0 else "train"}
            for c in ("ant", "bee") for i in range(4)]
    ds = load_dataset({"root": str(tmp_path), "items": rows}, 8)
    assert ds.per_class_counts("test") == {"ant": 1, "bee": 1}
    lines = ["path,label"] + [f"imgs/{c}/{i}.png,{c}" for c in ("ant", "bee") for i in range(4)]
    (tmp_path / "list.csv").write_text("\n".join(lines))
    assert load_dataset(tmp_path / "list.csv", 8).num_classes == 2


def test_unusable_sources_raise_data_errors(tmp_path, make_image):
    _class_tree(tmp_path / "one", make_image, classes=("only",))
    cases = {"one_class": tmp_path / "one", "not_found": tmp_path / "nope"}
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "b").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "broken" / "b" / "y.jpg").write_bytes(b"\xff\xd8\xff nope")
    cases["no_images"] = tmp_path / "broken"
    (tmp_path / "text.bin").write_text("plain text")
    cases["bad_source"] = tmp_path / "text.bin"
    for code, source in cases.items():
        with pytest.raises(DataError) as info:
            load_dataset(source, 8)
        assert info.value.code == code


def test_fgsynth_source(tmp_path):
    ds = load_dataset("fgsynth:classes=3,train=4,test=2,seed=5", 24)
    assert ds.train_images.shape == (12, 3, 24, 24) and ds.test_images.shape == (6, 3, 24, 24)
    assert ds.per_class_counts("train") == {name: 4 for name in ds.classes}
    assert ds.source.startswith("fgsynth:") and "seed=5" in ds.source and "size=24" in ds.source
    again = load_dataset("fgsynth:classes=3,train=4,test=2,seed=5", 24)
    assert torch.equal(ds.train_images, again.train_images)
    resized = load_dataset("fgsynth:classes=3,size=48,train=2,test=1,variant=cars", 24)
    assert resized.train_images.shape == (6, 3, 24, 24) and "variant=cars" in resized.source
    assert parse_fgsynth_source("fgsynth", 32)["image_size"] == 32
    for bad in ("fgsynth:colours=3", "fgsynth:classes=x", "fgsynth:classes=1", "fgsynth:variant=fish"):
        with pytest.raises(DataError) as info:
            load_dataset(bad, 16)
        assert info.value.code == "bad_source"


def test_image_dataset_passes_through_and_checks_its_size(tmp_path):
    ds = load_dataset("fgsynth:classes=2,train=2,test=1", 16)
    assert load_dataset(ds, 16) is ds
    with pytest.raises(ValueError):
        load_dataset(ds, 32)
    with pytest.raises(ValueError):
        ImageDataset(ds.train_images.float(), ds.train_labels, ds.test_images, ds.test_labels, ds.classes,
                     ds.mean, ds.std)


def test_pixel_limit_applies_while_loading(tmp_path, make_image):
    _class_tree(tmp_path, make_image)
    make_image(tmp_path / "ant" / "big.png", size=(60, 60))
    ds = load_dataset(tmp_path, 8, limits=DataLimits(max_image_pixels=50 * 50))
    assert [e.path for e in ds.errors] == ["ant/big.png"]


def test_train_bytes_are_the_train_files_used_as_stored_on_disk(tmp_path, make_image):
    """The report's real data bytes: the encoded train files the job used, not test files, not
    files that failed to decode; the same from an archive (its extracted files); none for
    generated data."""
    for split, count in (("train", 3), ("test", 1)):
        for c, name in enumerate(("ant", "bee")):
            for i in range(count):
                make_image(tmp_path / "src" / split / name / f"{i}.png", color=(40 * i, 90 * c, 7),
                           size=(12 + 5 * i + c, 10 + 3 * i))
    (tmp_path / "src" / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    expected = sum(p.stat().st_size for p in (tmp_path / "src" / "train").rglob("[0-9].png"))
    test_files = sum(p.stat().st_size for p in (tmp_path / "src" / "test").rglob("*.png"))
    assert expected > 0 and test_files > 0

    folder = load_dataset(tmp_path / "src", 8)
    assert [e.path for e in folder.errors] == ["train/bee/broken.png"] and len(folder.train_labels) == 6
    assert folder.train_bytes == expected

    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(file, file.relative_to(tmp_path / "src").as_posix())
    assert load_dataset(archive, 8).train_bytes == expected

    assert load_dataset("fgsynth:classes=2,train=2,test=1", 16).train_bytes is None
