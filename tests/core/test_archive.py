"""Safe archive extraction: type by magic bytes, path escapes, links, bombs, truncation, atomic
results."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from fd2_core.data.archive import detect_archive, extract_archive, safe_extract
from fd2_core.data.errors import DataError
from fd2_core.data.limits import DataLimits


def _png_bytes(make_image, tmp_path: Path, color=(10, 200, 30)) -> bytes:
    return make_image(tmp_path / "src.png", color=color).read_bytes()


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_zip_round_trip_unwraps_the_top_folder(tmp_path, make_image):
    png = _png_bytes(make_image, tmp_path)
    archive = _zip(tmp_path / "upload.zip", {"ds/train/a/1.png": png, "ds/train/b/2.png": png,
                                             "__MACOSX/ds/._1.png": b"junk", "ds/.hidden": b"x"})
    root = safe_extract(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "ds"
    assert (root / "train" / "a" / "1.png").read_bytes() == png
    assert not (tmp_path / "out" / "__MACOSX").exists() and not (root / ".hidden").exists()
    assert _leftovers(tmp_path) == ["out", "src.png", "upload.zip"]


def test_type_is_read_from_magic_bytes_not_the_name(tmp_path, make_image):
    png = _png_bytes(make_image, tmp_path)
    archive = _tar(tmp_path / "really_a_tgz.zip", [(_file("a/1.png"), png), (_file("b/1.png"), png)])
    assert detect_archive(archive) == "tar.gz"
    plain = _tar(tmp_path / "plain.bin", [(_file("a/1.png"), png)], mode="w")
    assert detect_archive(plain) == "tar"
    result = extract_archive(archive, tmp_path / "out")
    assert result.kind == "tar.gz" and result.files == 2 and result.bytes_written == 2 * len(png)
    assert (result.root / "b" / "1.png").read_bytes() == png


def test_text_file_named_zip_is_a_bad_archive(tmp_path):
    fake = tmp_path / "photos.zip"
    fake.write_text("this is not an archive at all")
    with pytest.raises(DataError) as info:
        safe_extract(fake, tmp_path / "out")
    assert info.value.code == "bad_archive"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "..\\evil.png"])
def test_zip_slip_refuses_the_whole_archive(tmp_path, make_image, name):
    png = _png_bytes(make_image, tmp_path)
    archive = _zip(tmp_path / "slip.zip", {"a/ok.png": png, name: png})
    dest = tmp_path / "work" / "out"
    with pytest.raises(DataError) as info:
        safe_extract(archive, dest)
    assert info.value.code == "path_escape"
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "work" / "evil.png").exists()
    assert _leftovers(tmp_path / "work") == []


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "c:\\evil.png", "C:", "\\evil.png",
                                  "\\\\server\\share\\evil.png", "//server/share/evil.png"])
def test_absolute_member_paths_are_refused(tmp_path, make_image, name):
    png = _png_bytes(make_image, tmp_path)
    archive = _tar(tmp_path / "abs.tar.gz", [(_file("a/ok.png"), png), (_file(name), png)])
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out")
    assert info.value.code == "path_escape"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["B: benign", "b:benign", "X:y"])
def test_a_letter_and_a_colon_then_a_name_is_a_relative_member(tmp_path, make_image, name):
    """`B: benign/x.png` is a class folder (medical names often look so), not a drive: only `X:/`
    and `X:\\` are drive-absolute."""
    png = _png_bytes(make_image, tmp_path)
    archive = _zip(tmp_path / "colon.zip", {f"{name}/x.png": png, f"{name}\\y.png": png, "a/ok.png": png})
    result = extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in (result.root / name).iterdir()) == ["x.png", "y.png"]
    assert result.skipped == [] and result.files == 3


def test_links_devices_and_fifos_in_tar_are_skipped_and_recorded(tmp_path, make_image):
    png = _png_bytes(make_image, tmp_path)
    archive = _tar(tmp_path / "links.tgz", [
        (_file("a/ok.png"), png),
        (_special("a/passwd.png", tarfile.SYMTYPE, "/etc/passwd"), None),
        (_special("a/hard.png", tarfile.LNKTYPE, "a/ok.png"), None),
        (_special("a/dev.png", tarfile.CHRTYPE), None),
        (_special("a/pipe.png", tarfile.FIFOTYPE), None),
        (_file("b/ok.png"), png),
    ])
    result = extract_archive(archive, tmp_path / "out")
    skipped = {e.path: e.reason for e in result.skipped}
    assert set(skipped) == {"a/passwd.png", "a/hard.png", "a/dev.png", "a/pipe.png"}
    assert "link" in skipped["a/passwd.png"] and "link" in skipped["a/hard.png"]
    assert sorted(p.name for p in (result.root / "a").iterdir()) == ["ok.png"]
    assert result.files == 2


def test_symlink_member_in_zip_is_skipped(tmp_path, make_image):
    png = _png_bytes(make_image, tmp_path)
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/ok.png", png)
        link = zipfile.ZipInfo("a/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    result = extract_archive(archive, tmp_path / "out")
    assert [e.path for e in result.skipped] == ["a/link.png"]
    assert not (result.root / "a" / "link.png").exists()


def test_nested_archives_are_reported_not_extracted(tmp_path, make_image):
    png = _png_bytes(make_image, tmp_path)
    inner = _zip(tmp_path / "inner.zip", {"x/1.png": png}).read_bytes()
    archive = _zip(tmp_path / "outer.zip", {"a/1.png": png, "a/more.zip": inner, "a/more.tar.gz": b"\x1f\x8b"})
    result = extract_archive(archive, tmp_path / "out")
    assert {e.path for e in result.skipped} == {"a/more.zip", "a/more.tar.gz"}
    assert all("nested archive" in e.reason for e in result.skipped)
    assert not (result.root / "a" / "more.zip").exists()


def test_compression_ratio_bomb_is_stopped(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"a/zeros.png": b"\0" * 4_000_000})
    assert archive.stat().st_size < 40_000
    limits = DataLimits(max_compression_ratio=50, ratio_grace_bytes=1_000_000)
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out", limits)
    assert info.value.code == "too_large"
    assert _leftovers(tmp_path) == ["bomb.zip"]


def test_total_size_limit_counts_written_bytes_of_a_tar_stream(tmp_path):
    archive = _tar(tmp_path / "big.tgz", [(_file(f"a/{i}.png"), b"\1" * 3000) for i in range(4)])
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out", DataLimits(max_total_uncompressed_bytes=10_000))
    assert info.value.code == "too_large"
    assert not (tmp_path / "out").exists()


def test_lying_size_headers_do_not_get_past_the_limits(tmp_path):
    archive = _zip(tmp_path / "liar.zip", {"a/big.png": b"\1" * 50_000})
    data = bytearray(archive.read_bytes())
    # Rewrite the declared uncompressed size (local header offset 22, central directory offset 24)
    # to 10.
    data[22:26] = (10).to_bytes(4, "little")
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out", DataLimits(max_total_uncompressed_bytes=1_000))
    assert info.value.code in ("bad_archive", "too_large")
    assert not (tmp_path / "out").exists()


def test_file_count_limit(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"a/{i}.png": b"x" for i in range(6)})
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out", DataLimits(max_files=5))
    assert info.value.code == "too_many_files"


@pytest.mark.parametrize("maker", ["zip", "tgz", "tar"])
def test_truncated_archives_are_bad(tmp_path, maker):
    payload = bytes(range(256)) * 400
    if maker == "zip":
        archive = _zip(tmp_path / "t.zip", {"a/1.png": payload, "a/2.png": payload}, zipfile.ZIP_STORED)
    else:
        mode = "w:gz" if maker == "tgz" else "w"
        archive = _tar(tmp_path / f"t.{maker}", [(_file("a/1.png"), payload), (_file("a/2.png"), payload)], mode)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "out")
    assert info.value.code == "bad_archive"
    assert _leftovers(tmp_path) == [archive.name]


def test_empty_archive_extracts_to_an_empty_folder(tmp_path):
    archive = _zip(tmp_path / "empty.zip", {})
    result = extract_archive(archive, tmp_path / "out")
    assert result.files == 0 and list(result.root.iterdir()) == []


def test_duplicate_members_keep_the_first(tmp_path):
    archive = _tar(tmp_path / "dup.tar", [(_file("a/1.png"), b"first"), (_file("a/1.png"), b"second")], mode="w")
    result = extract_archive(archive, tmp_path / "out")
    assert (result.root / "a" / "1.png").read_bytes() == b"first"
    assert [e.path for e in result.skipped] == ["a/1.png"]


def test_existing_destination_is_not_overwritten(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"a/1.png": b"x"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
