"""The hostile-input corpus: every case is a named request built by code,
with the answer it must get.

`CASES` is one table.
Each case sends one request through the real API and expects either a
documented 4xx error (status and `error.code`), or, where the input is
partly usable, a `ready` dataset whose `errors` name each skipped file.
`tests/api/test_hostile_corpus.py` runs the table and checks that rejected inputs leave no rows and no
files behind; docs/SECURITY.md quotes its size.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from fastapi.testclient import TestClient
from PIL import Image

from fd2_config.settings import Settings
from fd2_core.spec import JobSpec
from store.db import session_scope
from store.keys import create_tenant_key, revoke_key

# Limits of the corpus service: small, so each bound is reached with a few kilobytes.
CORPUS_SETTINGS: dict[str, Any] = {
    "max_upload_bytes": 1024**2,
    "max_json_body_bytes": 256 * 1024,
    "max_extracted_bytes": 4 * 1024**2,
    "max_archive_members": 3000,
    "max_compression_ratio": 50.0,
    "compression_ratio_grace_bytes": 256 * 1024,
    "max_classes": 1000,
    "max_manifest_rows": 100,
    "max_manifest_bytes": 64 * 1024,
    "max_job_cost": 1e8,
    "max_dataset_memory_bytes": 16 * 1024**2,
    "rate_limit_per_minute": 0.0,
    "callback_allow_hosts": ["hooks.example.com"],
}
ALLOWED_CALLBACK = "https://hooks.example.com/fd2"
BASE = {"wren": 3, "finch": 3}  # the usable part of every partly-usable upload


# ---------------------------------------------------------------- the service a case talks to


@dataclass
class Corpus:
    """What cases need: a client, the caller's key and resources, another
    tenant's resources, data roots."""

    client: TestClient
    settings: Settings
    caller: dict[str, str]
    dataset_id: str  # the caller's ready dataset: 3 classes x 8 images, no test split
    # the caller's dataset with one image per class (nothing to carve a test split from)
    singles_id: str
    job_id: str  # the caller's queued job, with the artifact `artifact`
    artifact: str
    artifact_size: int
    victim: dict[str, str]  # another tenant
    victim_dataset: str
    victim_job: str
    # under an allowed data root: <class>/<i>.png, and `wren/link.png` leading outside
    data_root: Path
    outside: Path  # a folder under no allowed root, holding `secret.png`

    def upload(self, data: bytes, filename: str = "data.zip", content_type: str = "application/zip",
               fields: Mapping[str, str] | None = None) -> Any:
        return self.client.post("/v1/datasets", headers=self.caller, files={"file": (filename, data, content_type)},
                                data=dict(fields) if fields else None)

    def submit(self, spec: Any = None, *, dataset: Any = None, headers: dict[str, str] | None = None,
               **extra: Any) -> Any:
        body = {"dataset": dataset if dataset is not None else {"id": self.dataset_id},
                "spec": spec if spec is not None else {"ipc": 1}, **extra}
        return self.client.post("/v1/jobs", headers=headers or self.caller, json=body)

    def manifest_job(self, items: list[dict[str, Any]], root: str | None = None, **spec: Any) -> Any:
        manifest = {"root": root if root is not None else str(self.data_root), "items": items}
        return self.submit({"ipc": 1, **spec}, dataset={"manifest": manifest})

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.caller if headers is None else headers, **kwargs)


@dataclass(frozen=True)
class Expect:
    """The answer a case must get."""

    status: int
    code: str | None = None  # `error.code` of a 4xx answer
    skipped: tuple[str, ...] = ()  # 201: paths the dataset's `errors` must name
    # 201: images per class (train + test) that must be kept
    class_sizes: Mapping[str, int] | None = None
    classes: tuple[str, ...] | None = None  # 201: the exact class list
    headers: tuple[str, ...] = ()  # response headers that must be present
    not_reported: tuple[str, ...] = ()  # 201: clutter that is skipped silently
    duplicates: Mapping[str, Any] | None = None  # 201: entries the dataset's `duplicates` must have
    # 201: codes the dataset's `warnings` must hold (`names_*` ones exactly)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    area: str
    send: Callable[[Corpus], Any]
    expect: Expect
    # overrides: the case gets its own app
    settings: Mapping[str, Any] = field(default_factory=dict)
    after: Callable[[Corpus], None] | None = None  # further checks once the answer is in


# ---------------------------------------------------------------- bytes of files and archives


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 8), mode: str = "RGB", color: Any = (90, 30, 200),
                **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def noisy_bytes(fmt: str, size: int = 48) -> bytes:
    """A photo-like image (noise) so that cutting it short really loses pixel data."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes((i * 7919) % 251 for i in range(size * size * 3))).save(buffer, fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb) with
    a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bmp_header_only(width: int, height: int) -> bytes:
    """A BMP header claiming a huge picture, followed by almost nothing."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return image_bytes("JPEG", (12, 8), exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (10, 10), c) for c in ((220, 10, 10), (10, 220, 10), (10, 10, 220))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    return image_bytes("PNG", (8, 8), "I;16", 40000)


def palette_png() -> bytes:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 250, 20, 10] + [0] * 762)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def tree(classes: Mapping[str, int], prefix: str = "") -> dict[str, bytes]:
    """`{member: png}` with `count` distinct small images per class."""
    files = {}
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            files[f"{prefix}{name}/{i}.png"] = image_bytes(color=((40 * c + 9 * i) % 256, 120, (200 - 7 * i) % 256))
    return files


def zip_of(members: Mapping[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with_infos(members: list[tuple[zipfile.ZipInfo, bytes]], base: Mapping[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in (base or {}).items():
            archive.writestr(name, data)
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def zip_duplicates(base: Mapping[str, bytes], name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in base.items():
            archive.writestr(member, data)
        with _quiet_duplicate_warning():
            archive.writestr(name, image_bytes(color=(1, 2, 3)))
    return buffer.getvalue()


class _quiet_duplicate_warning:
    def __enter__(self) -> None:
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)


class RawNameInfo(zipfile.ZipInfo):
    """A zip member stored under these exact name bytes without the UTF-8
    flag, as legacy zip tools write."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw.decode("cp437"))  # how zipfile reads such a name back
        self.raw = raw

    # zipfile's hook for the stored name and flags
    def _encodeFilenameFlags(self) -> tuple[bytes, int]:
        return self.raw, self.flag_bits & ~0x800


def zip_raw_names(members: Mapping[bytes, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for raw, data in members.items():
            archive.writestr(RawNameInfo(raw), data)
    return buffer.getvalue()


def raw_tree(classes: Mapping[str, int], encoding: str, form: str = "NFC") -> dict[bytes, bytes]:
    """`tree` with member names as bytes: Unicode form `form` (NFC, NFD), encoded in `encoding`."""
    return {unicodedata.normalize(form, name).encode(encoding): data for name, data in tree(classes).items()}


def tar_in_encoding(classes: Mapping[str, int], encoding: str) -> bytes:
    """A tar.gz whose member names are bytes in `encoding` (GNU format: PAX would store UTF-8)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT, encoding=encoding) as archive:
        for name, data in tree(classes).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_entry(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, target: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    if data is not None:
        info.size = len(data)
    return info, data


def tar_of(entries: list[tuple], base: Mapping[str, bytes] | None = None, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in (base or {}).items():
            info, _ = tar_entry(name, data)
            archive.addfile(info, io.BytesIO(data))
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def zip_bomb(size: int) -> bytes:
    """`size` zero bytes under an image name: compresses about a thousand to one."""
    return zip_of({**tree(BASE), "wren/zeros.png": b"\0" * size})


def lying_zip(real_size: int) -> bytes:
    """A zip whose headers declare 10 bytes for a member that unpacks to `real_size`."""
    data = bytearray(zip_of({**tree(BASE), "wren/big.png": b"\1" * real_size}))
    local = data.rfind(b"PK\x03\x04", 0, data.find(b"wren/big.png"))
    data[local + 22:local + 26] = (10).to_bytes(4, "little")
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(b"wren/big.png"))
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    return bytes(data)


def with_base(extra: Mapping[str, bytes]) -> bytes:
    return zip_of({**tree(BASE), **extra})


def cut(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


# ---------------------------------------------------------------- archives


def _archive_cases() -> Iterator[Case]:
    escape = Expect(422, "path_escape")
    yield Case("zip_slip_dotdot", "archive", lambda c: c.upload(with_base({"../evil.png": image_bytes()})), escape)
    yield Case("zip_slip_deep_dotdot", "archive",
               lambda c: c.upload(with_base({"wren/../../../../tmp/evil.png": image_bytes()})), escape)
    yield Case("zip_slip_backslashes", "archive",
               lambda c: c.upload(with_base({"..\\..\\evil.png": image_bytes()})), escape)
    yield Case("zip_absolute_path", "archive", lambda c: c.upload(with_base({"/etc/evil.png": image_bytes()})),
               escape)
    yield Case("zip_windows_drive_path", "archive",
               lambda c: c.upload(with_base({"C:\\Windows\\evil.png": image_bytes()})), escape)
    yield Case("tar_slip_dotdot", "archive",
               lambda c: c.upload(tar_of([tar_entry("../evil.png", image_bytes())], tree(BASE)), "d.tar.gz"), escape)
    yield Case("tar_absolute_path", "archive",
               lambda c: c.upload(tar_of([tar_entry("/tmp/evil.png", image_bytes())], tree(BASE)), "d.tgz"), escape)
    contained = {"class_sizes": {"wren": 3, "finch": 3}}
    yield Case("tar_symlink_outside", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/passwd.png", kind=tarfile.SYMTYPE, target="/etc/passwd")],
                                         tree(BASE)), "d.tgz"),
               Expect(201, skipped=("wren/passwd.png",), **contained))
    yield Case("tar_hardlink", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/hard.png", kind=tarfile.LNKTYPE, target="/etc/shadow")],
                                         tree(BASE)), "d.tgz"),
               Expect(201, skipped=("wren/hard.png",), **contained))
    yield Case("tar_char_device", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/zero.png", kind=tarfile.CHRTYPE)], tree(BASE)), "d.tgz"),
               Expect(201, skipped=("wren/zero.png",), **contained))
    yield Case("tar_fifo", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/pipe.png", kind=tarfile.FIFOTYPE)], tree(BASE)), "d.tar",
                                  ), Expect(201, skipped=("wren/pipe.png",), **contained))
    link = zipfile.ZipInfo("wren/link.png")
    link.external_attr = 0o120777 << 16
    yield Case("zip_symlink", "archive", lambda c: c.upload(zip_with_infos([(link, b"/etc/passwd")], tree(BASE))),
               Expect(201, skipped=("wren/link.png",), **contained))
    device = zipfile.ZipInfo("wren/device.png")
    device.external_attr = 0o020644 << 16
    yield Case("zip_device_mode", "archive", lambda c: c.upload(zip_with_infos([(device, b"x")], tree(BASE))),
               Expect(201, skipped=("wren/device.png",), **contained))
    yield Case("zip_bomb_total_size", "archive", lambda c: c.upload(zip_bomb(5 * 1024**2)), Expect(422, "too_large"))
    yield Case("zip_bomb_ratio", "archive", lambda c: c.upload(zip_bomb(2 * 1024**2)), Expect(422, "too_large"))
    # Only the declared bytes are read; the checksum then no longer matches.
    yield Case("zip_bomb_lying_header", "archive", lambda c: c.upload(lying_zip(5 * 1024**2)),
               Expect(422, "bad_archive"))
    yield Case("tar_gz_bomb_stream", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/zeros.png", b"\0" * 5 * 1024**2)], tree(BASE)), "b.tgz"),
               Expect(422, "too_large"))
    yield Case("nested_archives", "archive",
               lambda c: c.upload(with_base({"wren/more.zip": zip_of(tree(BASE)), "finch/more.tar.gz": b"\x1f\x8b"})),
               Expect(201, skipped=("wren/more.zip", "finch/more.tar.gz"), **contained))
    yield Case("too_many_files", "archive",
               lambda c: c.upload(zip_of({f"wren/{i}.png": b"x" for i in range(3001)}, zipfile.ZIP_STORED)),
               Expect(422, "too_many_files"))
    yield Case("zip_duplicate_paths", "archive", lambda c: c.upload(zip_duplicates(tree(BASE), "wren/0.png")),
               Expect(201, skipped=("wren/0.png",), **contained))
    yield Case("tar_duplicate_paths", "archive",
               lambda c: c.upload(tar_of([tar_entry("wren/0.png", image_bytes(color=(1, 2, 3)))], tree(BASE)), "d.tgz"),
               Expect(201, skipped=("wren/0.png",), **contained))
    clutter = {"__MACOSX/wren/._0.png": b"\0\5\26\7", ".DS_Store": b"x", "wren/.hidden.png": b"x",
               ".git/config": b"[core]", "Thumbs.db": b"x"}
    yield Case("macosx_and_dot_files_ignored", "archive", lambda c: c.upload(with_base(clutter)),
               Expect(201, classes=("finch", "wren"), not_reported=tuple(clutter), **contained))
    yield Case("non_image_files_reported", "archive",
               lambda c: c.upload(with_base({"wren/notes.txt": b"hi", "finch/run.sh": b"#!/bin/sh",
                                             "README.md": b"#"})),
               Expect(201, skipped=("wren/notes.txt", "finch/run.sh", "README.md"), **contained))
    long_names = {f"wren/{i}" + "x" * 60_000 + ".txt": b"x" for i in range(6)}
    long_names["/".join(["d" * 200] * 30) + "/0.png"] = image_bytes()
    yield Case("member_names_of_sixty_thousand_chars", "archive", lambda c: c.upload(with_base(long_names)),
               Expect(201, **contained))
    yield Case("empty_zip", "archive", lambda c: c.upload(zip_of({})), Expect(422, "no_images"))
    yield Case("empty_tar", "archive", lambda c: c.upload(tar_of([], mode="w"), "empty.tar"),
               Expect(422, "bad_archive"))
    yield Case("zero_byte_upload", "archive", lambda c: c.upload(b""), Expect(422, "bad_archive"))
    yield Case("plain_file_renamed_zip", "archive", lambda c: c.upload(b"just some text\n" * 40),
               Expect(422, "bad_archive"))
    yield Case("image_renamed_zip", "archive", lambda c: c.upload(image_bytes("PNG", (32, 32))),
               Expect(422, "bad_archive"))
    yield Case("truncated_zip", "archive", lambda c: c.upload(cut(zip_of(tree(BASE), zipfile.ZIP_STORED))),
               Expect(422, "bad_archive"))
    yield Case("truncated_tar_gz", "archive", lambda c: c.upload(cut(tar_of([], tree(BASE))), "d.tgz"),
               Expect(422, "bad_archive"))
    # The zip reader ends a name at its NUL byte: `wren/a` is then no image name.
    yield Case("zip_member_name_with_nul", "archive", lambda c: c.upload(with_base({"wren/a\0b.png": b"x"})),
               Expect(201, skipped=("wren/a",), **contained))
    yield from _member_name_cases()


def _member_name_cases() -> Iterator[Case]:
    """Names in another encoding come out as NFC text: UTF-8 whatever the flag says, else a detected
    code page (warned), else percent-encoded bytes (warned)."""
    french = {"Café, crème": 3, "Mésange bleue": 3}
    yield Case("zip_names_nfd_utf8_without_flag", "archive",
               lambda c: c.upload(zip_raw_names(raw_tree({"Café, crème": 3, "wren": 3}, "utf-8", "NFD"))),
               Expect(201, classes=("Café, crème", "wren"), warnings=()))
    yield Case("zip_names_nfc_and_nfd_are_one_class", "archive",
               lambda c: c.upload(zip_raw_names({**raw_tree({"Café": 2, "wren": 3}, "utf-8", "NFC"),
                                                 **raw_tree({"Café": 3}, "utf-8", "NFD")})),
               Expect(201, classes=("Café", "wren"), skipped=("Café/0.png", "Café/1.png"), warnings=(),
                      class_sizes={"Café": 3, "wren": 3}))
    for case_name, classes, encoding in (
        ("zip_names_cp1252", french, "cp1252"),
        ("zip_names_cp437", {"Grünfink": 3, "Straße": 3}, "cp437"),
        ("zip_names_cp866", {"Синица": 3, "Воробей": 3}, "cp866"),
        ("zip_names_shift_jis", {"日本の鳥": 3, "すずめ": 3}, "shift_jis"),
    ):
        yield Case(case_name, "archive", lambda c, k=classes, e=encoding: c.upload(zip_raw_names(raw_tree(k, e))),
                   Expect(201, classes=tuple(sorted(classes)), warnings=("names_code_page",)))
    yield Case("tar_names_latin1", "archive", lambda c: c.upload(tar_in_encoding(french, "latin-1"), "d.tgz"),
               Expect(201, classes=tuple(sorted(french)), warnings=("names_code_page",)))
    undecodable = {b"wren\x01\xff/" + str(i).encode() + b".png": image_bytes(color=(i, 9, 9)) for i in range(3)}
    yield Case("zip_names_undecodable", "archive",
               lambda c: c.upload(zip_raw_names({**undecodable, **raw_tree({"finch": 3}, "ascii")})),
               Expect(201, classes=("finch", "wren%01%FF"), warnings=("names_undecodable",)))


# ---------------------------------------------------------------- images


def _image_case(name: str, filename: str, data: Callable[[], bytes], accepted: bool) -> Case:
    member = f"wren/{filename}"
    if accepted:
        expect = Expect(201, class_sizes={"wren": 4, "finch": 3})
    else:
        expect = Expect(201, skipped=(member,), class_sizes={"wren": 3, "finch": 3})
    return Case(name, "image", lambda c: c.upload(with_base({member: data()})), expect)


def _image_cases() -> Iterator[Case]:
    yield _image_case("truncated_jpeg", "cut.jpg", lambda: cut(noisy_bytes("JPEG")), False)
    yield _image_case("truncated_png", "cut.png", lambda: cut(noisy_bytes("PNG")), False)
    yield _image_case("zero_byte_image", "empty.png", lambda: b"", False)
    yield _image_case("decompression_bomb_png", "bomb.png", lambda: png_header_only(100_000, 100_000), False)
    yield _image_case("decompression_bomb_bmp", "bomb.bmp", lambda: bmp_header_only(60_000, 60_000), False)
    yield _image_case("text_renamed_jpeg", "fake.jpg", lambda: b"<html>not an image</html>", False)
    yield _image_case("gif_renamed_png", "gif.png", lambda: image_bytes("GIF"), False)
    yield _image_case("animated_gif", "anim.gif", lambda: animated("GIF"), False)
    yield _image_case("cmyk_jpeg", "cmyk.jpg", lambda: image_bytes("JPEG", mode="CMYK", color=(10, 200, 30, 5)), True)
    yield _image_case("sixteen_bit_png", "deep.png", sixteen_bit_png, True)
    yield _image_case("palette_png", "palette.png", palette_png, True)
    yield _image_case("alpha_png", "alpha.png", lambda: image_bytes("PNG", mode="RGBA", color=(1, 2, 3, 40)), True)
    yield _image_case("grayscale_jpeg", "grey.jpg", lambda: image_bytes("JPEG", mode="L", color=90), True)
    yield _image_case("exif_rotated_jpeg", "rotated.jpg", exif_rotated_jpeg, True)
    yield _image_case("one_pixel_png", "dot.png", lambda: image_bytes("PNG", (1, 1)), True)
    yield _image_case("animated_png", "anim.png", lambda: animated("PNG"), True)
    yield _image_case("animated_webp", "anim.webp", lambda: animated("WEBP"), True)
    # The content decides the format; the extension only whether a file is worth opening.
    yield _image_case("jfif_extension", "photo.jfif", lambda: image_bytes("JPEG"), True)
    yield _image_case("upper_case_jpe_extension", "PHOTO.JPE", lambda: image_bytes("JPEG"), True)
    yield _image_case("png_named_jpg", "really_png.jpg", lambda: image_bytes("PNG"), True)
    yield _image_case("tiff_image", "scan.tif", lambda: image_bytes("TIFF"), False)
    yield Case("every_image_broken", "image",
               lambda c: c.upload(zip_of({"wren/a.jpg": b"", "finch/b.png": cut(noisy_bytes("PNG"))})),
               Expect(422, "no_images"))


# ---------------------------------------------------------------- duplicates and train/test leakage


def _split_tree(copies: Mapping[str, tuple[str, str]]) -> bytes:
    """`train/` and `test/` of BASE's classes (distinct images), plus `{member: (source member,
    format)}` copies: the source's pixels saved again in that format (`same` keeps its bytes)."""
    members = {**tree(BASE, "train/"),
               **{f"test/{name}/t.png": image_bytes(color=(250, 5 + 40 * c, 9)) for c, name in enumerate(BASE)}}
    for member, (source, fmt) in copies.items():
        buffer = io.BytesIO()
        if fmt == "same":
            buffer.write(members[source])
        else:
            Image.open(io.BytesIO(members[source])).save(buffer, fmt, lossless=True)
        members[member] = buffer.getvalue()
    return zip_of(members)


def _duplicate_cases() -> Iterator[Case]:
    leak = {"test/wren/leak.png": ("train/wren/0.png", "same")}
    counts = {"train": {"duplicate_images": 0, "groups": 0}, "test": {"duplicate_images": 0, "groups": 0}}
    yield Case("test_image_in_train_reported", "duplicates", lambda c: c.upload(_split_tree(leak)),
               Expect(201, class_sizes={"wren": 5, "finch": 4}, warnings=("test_in_train",),
                      duplicates={**counts, "test_in_train": 1, "dropped": 0}))
    yield Case("test_image_in_train_dropped", "duplicates",
               lambda c: c.upload(_split_tree(leak), fields={"drop_duplicates": "true"}),
               Expect(201, skipped=("test/wren/leak.png",), class_sizes={"wren": 4, "finch": 4},
                      duplicates={"test_in_train": 1, "dropped": 1}))
    same_pixels = {"train/finch/copy.webp": ("train/finch/0.png", "WEBP")}
    yield Case("same_pixels_other_bytes_reported", "duplicates", lambda c: c.upload(_split_tree(same_pixels)),
               Expect(201, warnings=("duplicates",),
                      duplicates={"train": {"duplicate_images": 1, "groups": 1}, "test_in_train": 0}))
    yield Case("drop_duplicates_not_a_boolean", "duplicates",
               lambda c: c.upload(_split_tree(leak), fields={"drop_duplicates": "maybe"}),
               Expect(422, "validation_error"))


# ---------------------------------------------------------------- class structure


def _class_cases() -> Iterator[Case]:
    yield Case("one_class", "classes", lambda c: c.upload(zip_of(tree({"wren": 4}))), Expect(422, "one_class"))
    empty_folder = zipfile.ZipInfo("empty/")
    yield Case("empty_class_folder", "classes", lambda c: c.upload(zip_with_infos([(empty_folder, b"")], tree(BASE))),
               Expect(201, skipped=("empty/",), classes=("finch", "wren")))
    yield Case("class_smaller_than_ipc", "classes", lambda c: c.submit({"ipc": 7}), Expect(422, "ipc_too_large"))
    odd = {"Grünfink": 2, "日本の鳥": 2, "blue tit": 2, "sp. 1": 2, "a.b.c": 2}
    yield Case("unicode_spaces_and_dots_in_class_names", "classes", lambda c: c.upload(zip_of(tree(odd))),
               Expect(201, classes=tuple(sorted(odd))))
    yield Case("class_names_differing_by_case", "classes", lambda c: c.upload(zip_of(tree({"Wren": 2, "wren": 2}))),
               Expect(201, classes=("Wren", "wren")))
    yield Case("thousands_of_classes", "classes",
               lambda c: c.upload(zip_of({f"c{i:04d}/0.png": image_bytes("PNG", (1, 1)) for i in range(1001)})),
               Expect(422, "too_many_classes"))


# ---------------------------------------------------------------- manifests


def _in_archive_manifest(rows: Any, name: str = "manifest.json", extra: Mapping[str, bytes] | None = None) -> bytes:
    text = rows if isinstance(rows, (bytes, str)) else json.dumps(rows)
    return zip_of({**tree(BASE), **(extra or {}), name: text.encode() if isinstance(text, str) else text})


def _rows(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"path": p, "label": p.split("/")[0]} for p in tree(BASE)] + extra


def _manifest_cases() -> Iterator[Case]:
    contained = {"class_sizes": {"wren": 3, "finch": 3}}
    for case_name, row, reason in (
        ("archive_manifest_path_escape", {"path": "../../../etc/passwd.png", "label": "wren"},
         "../../../etc/passwd.png"),
        ("archive_manifest_absolute_path", {"path": "/etc/ssl/cert.png", "label": "wren"}, "/etc/ssl/cert.png"),
        ("archive_manifest_missing_file", {"path": "wren/404.png", "label": "wren"}, "wren/404.png"),
        ("archive_manifest_unknown_split", {"path": "wren/0.png", "label": "wren", "split": "holdout"}, "wren/0.png"),
        ("archive_manifest_duplicate_row", {"path": "wren/0.png", "label": "wren"}, "wren/0.png"),
        ("archive_manifest_control_chars_in_label", {"path": "wren/1.png", "label": "w\x00ren"}, "wren/1.png"),
        ("archive_manifest_nul_in_path", {"path": "wren/0.png\x00.jpg", "label": "wren"}, "wren/0.png\x00.jpg"),
    ):
        # The duplicated or relabelled image stays once under its own class.
        yield Case(case_name, "manifest", lambda c, row=row: c.upload(_in_archive_manifest(_rows([row]))),
                   Expect(201, skipped=(reason,), **contained))
    test_only = [{"path": "heron/0.png", "label": "heron", "split": "test"}]
    yield Case("archive_manifest_label_not_in_training_classes", "manifest",
               lambda c: c.upload(_in_archive_manifest([{**r, "split": "train"} for r in _rows([])] + test_only,
                                                       extra={"heron/0.png": image_bytes()})),
               Expect(201, skipped=("heron/0.png",), classes=("finch", "wren")))
    digits = [{"path": "wren/0.png", "label": "0"}, {"path": "wren/1.png", "label": "0"},
              {"path": "finch/0.png", "label": "²"}, {"path": "finch/1.png", "label": "²"}]
    yield Case("archive_manifest_unicode_digit_label", "manifest",
               lambda c: c.upload(_in_archive_manifest(digits)), Expect(201, classes=("0", "²")))
    yield Case("archive_manifest_malformed_json", "manifest",
               lambda c: c.upload(_in_archive_manifest('[{"path": "wren/0.png", "label": ')),
               Expect(422, "bad_manifest"))
    yield Case("archive_manifest_deeply_nested_json", "manifest",
               lambda c: c.upload(_in_archive_manifest("[" * 20_000 + "]" * 20_000)), Expect(422, "bad_manifest"))
    yield Case("archive_manifest_not_a_list", "manifest", lambda c: c.upload(_in_archive_manifest({"rows": 3})),
               Expect(422, "bad_manifest"))
    yield Case("archive_manifest_csv_without_header", "manifest",
               lambda c: c.upload(_in_archive_manifest("wren/0.png,wren\nfinch/0.png,finch\n", "manifest.csv")),
               Expect(422, "bad_manifest"))
    yield Case("archive_manifest_csv_binary", "manifest",
               lambda c: c.upload(_in_archive_manifest(b"path,label\n\xff\xfe\x00\x00garbage", "manifest.csv")),
               Expect(422, "bad_manifest"))
    big_rows = _rows([{"path": f"wren/{i}.png", "label": "wren"} for i in range(101)])
    yield Case("archive_manifest_row_limit", "manifest", lambda c: c.upload(_in_archive_manifest(big_rows)),
               Expect(422, "too_many_files"))
    yield Case("archive_manifest_byte_limit", "manifest",
               lambda c: c.upload(_in_archive_manifest(json.dumps(_rows([])) + " " * 70_000)),
               Expect(422, "too_large"))

    def items(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"path": f"{name}/{i}.png", "label": name} for name in ("wren", "finch") for i in range(4)] + extra

    yield Case("job_manifest_root_outside_allowed", "manifest",
               lambda c: c.manifest_job(items([]), root=str(c.outside)), Expect(422, "data_root_not_allowed"))
    yield Case("job_manifest_root_climbs_out", "manifest",
               lambda c: c.manifest_job(items([]), root=f"{c.data_root}/../../../outside"),
               Expect(422, "data_root_not_allowed"))
    yield Case("job_manifest_relative_root", "manifest", lambda c: c.manifest_job(items([]), root="shared/birds"),
               Expect(422, "data_root_not_allowed"))
    yield Case("job_manifest_root_with_nul", "manifest",
               lambda c: c.manifest_job(items([]), root=f"{c.data_root}\x00/x"), Expect(422, "data_root_not_allowed"))
    yield Case("job_manifest_path_escape", "manifest",
               lambda c: c.manifest_job(items([{"path": "../../outside/secret.png", "label": "wren"}])),
               Expect(422, "path_escape"))
    yield Case("job_manifest_absolute_path", "manifest",
               lambda c: c.manifest_job(items([{"path": str(c.outside / "secret.png"), "label": "wren"}])),
               Expect(422, "path_escape"))
    yield Case("job_manifest_link_leading_out", "manifest",
               lambda c: c.manifest_job(items([{"path": "wren/link.png", "label": "wren"}])),
               Expect(422, "path_escape"))
    yield Case("job_manifest_missing_file", "manifest",
               lambda c: c.manifest_job(items([{"path": "wren/404.png", "label": "wren"}])),
               Expect(422, "bad_manifest"))
    yield Case("job_manifest_unknown_split", "manifest",
               lambda c: c.manifest_job(items([{"path": "wren/0.png", "label": "wren", "split": "holdout"}])),
               Expect(422, "validation_error"))
    yield Case("job_manifest_duplicate_rows", "manifest",
               lambda c: c.manifest_job(items([{"path": "wren/0.png", "label": "wren"}])), Expect(422, "bad_manifest"))
    yield Case("job_manifest_label_not_in_training_classes", "manifest",
               lambda c: c.manifest_job([{**r, "split": "train"} for r in items([])]
                                        + [{"path": "heron/0.png", "label": "heron", "split": "test"}]),
               Expect(422, "bad_manifest"))
    yield Case("job_manifest_label_with_control_chars", "manifest",
               lambda c: c.manifest_job(items([{"path": "heron/0.png", "label": "he\x07ron"}])),
               Expect(422, "bad_manifest"))
    yield Case("job_manifest_label_too_long", "manifest",
               lambda c: c.manifest_job(items([{"path": "heron/0.png", "label": "h" * 201}])),
               Expect(422, "validation_error"))
    yield Case("job_manifest_row_limit", "manifest",
               lambda c: c.manifest_job([{"path": f"wren/{i % 4}.png", "label": "wren"} for i in range(101)]),
               Expect(422, "too_many_files"))
    yield Case("job_manifest_no_rows", "manifest", lambda c: c.manifest_job([]), Expect(422, "validation_error"))
    yield Case("job_manifest_and_id_together", "manifest",
               lambda c: c.submit(dataset={"id": c.dataset_id, "manifest": {"root": str(c.data_root),
                                                                           "items": items([])}}),
               Expect(422, "validation_error"))
    yield Case("job_malformed_json_body", "manifest",
               lambda c: c.client.post("/v1/jobs", headers={**c.caller, "Content-Type": "application/json"},
                                       content=b'{"dataset": {"manifest": {"root": '),
               Expect(422, "validation_error"))
    yield Case("job_deeply_nested_json_body", "manifest",
               lambda c: c.client.post("/v1/jobs", headers={**c.caller, "Content-Type": "application/json"},
                                       content=b'{"spec":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
               Expect(400, "json_too_deep"))


# ---------------------------------------------------------------- specs


def numeric_bounds() -> Iterator[tuple[str, type, str, float]]:
    """(field, type, which bound, bound) for every numeric spec field."""
    for name, info in JobSpec.model_fields.items():
        if info.annotation not in (int, float):
            continue
        for rule in info.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if isinstance(rule, (Ge, Gt, Le, Lt)) and hasattr(rule, attr):
                    yield name, info.annotation, attr, getattr(rule, attr)


def _outside(kind: type, attr: str, bound: float) -> float:
    """The nearest value that breaks the bound (an equal value breaks a strict one)."""
    if attr in ("gt", "lt"):
        return bound
    step = 1 if kind is int else 10 ** (math.floor(math.log10(abs(bound))) - 2) if bound else 1e-3
    return bound - step if attr == "ge" else bound + step


def _spec_cases() -> Iterator[Case]:
    invalid = Expect(422, "invalid_spec")
    for name, kind, attr, bound in numeric_bounds():
        side = "below_min" if attr in ("ge", "gt") else "above_max"
        value = _outside(kind, attr, bound)
        yield Case(f"spec_{name}_{side}", "spec", lambda c, n=name, v=value: c.submit({n: v}), invalid)
    for case_name, spec in (
        ("spec_int_as_string", {"ipc": "1"}), ("spec_int_as_bool", {"ipc": True}),
        ("spec_int_as_fraction", {"ipc": 1.5}), ("spec_bool_as_int", {"amp": 1}),
        ("spec_float_as_string", {"lambda_fc": "0.5"}), ("spec_choice_as_list", {"backbone": ["convnet"]}),
        ("spec_huge_integer", {"seed": 10**30}), ("spec_unknown_field", {"learning_rate": 0.1}),
        ("spec_unknown_preset", {"preset": "paper-imagenet"}), ("spec_unknown_backbone", {"backbone": "vgg19"}),
        ("spec_unknown_method", {"method": "dc"}),
        ("spec_thousands_of_unknown_fields", {f"field_{i}": i for i in range(5000)}),
        ("spec_unknown_field_with_a_huge_name", {"x" * 100_000: 1}),
        ("spec_random_with_fd2_parts", {"method": "random", "fc": True}),
        ("spec_base_recipe_with_sc", {"method": "sre2l++", "sc": True}),
        ("spec_fc_without_cal", {"cal": False, "fc": True}),
        ("spec_weights_for_convnet", {"torchvision_weights": True}),
        ("spec_baseline_without_evaluation", {"evaluate": False, "eval_random_baseline": True}),
    ):
        yield Case(case_name, "spec", lambda c, s=spec: c.submit(s), invalid)
    yield Case("spec_not_an_object", "spec", lambda c: c.submit([1, 2]), Expect(422, "validation_error"))
    yield Case("job_body_unknown_field", "spec", lambda c: c.submit({"ipc": 1}, priority="urgent"),
               Expect(422, "validation_error"))
    yield Case("spec_cost_above_limit", "spec",
               lambda c: c.submit({"ipc": 5, "image_size": 512, "distill_iterations": 100_000}),
               Expect(422, "cost_too_high"))
    yield Case("spec_decoded_size_above_limit", "spec", lambda c: c.submit({"image_size": 512}),
               Expect(422, "dataset_too_large"))
    yield Case("spec_evaluation_without_test_images", "spec", lambda c: c.submit(dataset={"id": c.singles_id}),
               Expect(422, "no_test_split"))
    yield Case("job_unknown_dataset", "spec", lambda c: c.submit(dataset={"id": "ds_" + "0" * 32}),
               Expect(422, "unknown_dataset"))


# ---------------------------------------------------------------- HTTP, keys and tenants


def _revoked_key(c: Corpus) -> dict[str, str]:
    with session_scope(c.settings) as session:
        key = create_tenant_key(session, "revoked-tenant")
        assert revoke_key(session, key)
    return {"Authorization": f"Bearer {key}"}


def _victim_untouched(c: Corpus) -> None:
    assert c.get(f"/v1/datasets/{c.victim_dataset}", c.victim).status_code == 200
    assert c.get(f"/v1/jobs/{c.victim_job}", c.victim).json()["status"] == "queued"


def _http_cases() -> Iterator[Case]:
    unauthorized = Expect(401, "unauthorized", headers=("WWW-Authenticate",))
    yield Case("no_api_key", "http", lambda c: c.get("/v1/datasets", {}), unauthorized)
    yield Case("basic_auth_instead_of_bearer", "http",
               lambda c: c.get("/v1/datasets", {"Authorization": "Basic dXNlcjpwYXNz"}), unauthorized)
    yield Case("malformed_api_key", "http", lambda c: c.get("/v1/jobs", {"Authorization": "Bearer ' OR 1=1 --"}),
               unauthorized)
    yield Case("unknown_api_key", "http",
               lambda c: c.get("/v1/jobs", {"Authorization": "Bearer fd2_deadbeef_" + "A" * 43}), unauthorized)
    yield Case("oversized_api_key", "http", lambda c: c.get("/v1/jobs", {"Authorization": "Bearer " + "k" * 8000}),
               unauthorized)
    yield Case("revoked_api_key", "http", lambda c: c.get("/v1/datasets", _revoked_key(c)), unauthorized)
    for case_name, method, path in (
        ("other_tenant_dataset_read", "GET", "/v1/datasets/{ds}"),
        ("other_tenant_dataset_delete", "DELETE", "/v1/datasets/{ds}"),
        ("other_tenant_job_read", "GET", "/v1/jobs/{job}"),
        ("other_tenant_job_cancel", "POST", "/v1/jobs/{job}/cancel"),
        ("other_tenant_job_events", "GET", "/v1/jobs/{job}/events"),
        ("other_tenant_job_delete", "DELETE", "/v1/jobs/{job}"),
        ("other_tenant_artifact", "GET", "/v1/jobs/{job}/artifacts/report.json"),
    ):
        yield Case(case_name, "http",
                   lambda c, m=method, p=path: c.client.request(
                       m, p.format(ds=c.victim_dataset, job=c.victim_job), headers=c.caller),
                   Expect(404, "not_found"), after=_victim_untouched)
    yield Case("other_tenant_job_event_stream", "http",
               lambda c: c.get(f"/v1/jobs/{c.victim_job}/events", {**c.caller, "Accept": "text/event-stream"}),
               Expect(404, "not_found"), after=_victim_untouched)
    yield Case("other_tenant_dataset_in_job", "http", lambda c: c.submit(dataset={"id": c.victim_dataset}),
               Expect(422, "unknown_dataset"), after=_victim_untouched)
    for case_name, path in (
        ("id_with_nul_byte", "/v1/jobs/job_%00abc"), ("id_with_encoded_traversal", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
        ("id_of_ten_thousand_chars", "/v1/datasets/" + "d" * 10_000),
    ):
        yield Case(case_name, "http", lambda c, p=path: c.get(p), Expect(404, "not_found"))
    yield Case("cursor_with_nul_byte", "http",
               lambda c: c.get("/v1/jobs", params={"cursor": "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwiXHUwMDAwIl0"}),
               Expect(422, "invalid_cursor"))
    yield Case("events_after_beyond_64_bits", "http",
               lambda c: c.get(f"/v1/jobs/{c.job_id}/events", params={"after": 2**64}), Expect(422, "validation_error"))
    for case_name, value in (("last_event_id_beyond_64_bits", str(2**64)), ("last_event_id_not_a_number", "1; --")):
        yield Case(case_name, "http",
                   lambda c, v=value: c.get(f"/v1/jobs/{c.job_id}/events",
                                            {**c.caller, "Accept": "text/event-stream", "Last-Event-ID": v}),
                   Expect(422, "validation_error"))
    for case_name, name in (
        ("artifact_name_traversal", "..%2F..%2F..%2Fetc%2Fpasswd"),
        ("artifact_name_dot_segments", "%2e%2e%2freport.json"),
        ("artifact_name_backslashes", "..%5C..%5Creport.json"), ("artifact_name_nul", "report.json%00.png"),
        ("artifact_name_absolute", "%2Fetc%2Fpasswd"),
    ):
        yield Case(case_name, "http", lambda c, n=name: c.get(f"/v1/jobs/{c.job_id}/artifacts/{n}"),
                   Expect(404, "not_found"))
    for case_name, header in (("range_start_past_end", "bytes={size}-"), ("range_suffix_zero", "bytes=-0"),
                              ("range_reversed", "bytes=50-10")):
        yield Case(case_name, "http",
                   lambda c, h=header: c.get(f"/v1/jobs/{c.job_id}/artifacts/{c.artifact}",
                                             headers={**c.caller, "Range": h.format(size=c.artifact_size)}),
                   Expect(416, "range_not_satisfiable", headers=("Content-Range",)))
    big_body = {"dataset": {"manifest": {"root": "/data", "items": [{"path": f"a/{i}.png", "label": "a"}
                                                                    for i in range(10_000)]}}}
    yield Case("oversized_json_body", "http", lambda c: c.client.post("/v1/jobs", headers=c.caller, json=big_body),
               Expect(413, "payload_too_large"))
    raw = json.dumps(big_body).encode()
    yield Case("oversized_json_body_chunked", "http",
               lambda c: c.client.post("/v1/jobs", headers={**c.caller, "Content-Type": "application/json"},
                                       content=iter([raw[i:i + 65536] for i in range(0, len(raw), 65536)])),
               Expect(413, "payload_too_large"))
    yield Case("oversized_upload", "http", lambda c: c.upload(b"PK\x03\x04" + b"\0" * (1024**2 + 10)),
               Expect(413, "upload_too_large"))
    yield Case("upload_as_json", "http",
               lambda c: c.client.post("/v1/datasets", headers={**c.caller, "Content-Type": "application/json"},
                                       content=b'{"file": "x"}'), Expect(415, "unsupported_media_type"))
    yield Case("upload_as_urlencoded_form", "http",
               lambda c: c.client.post("/v1/datasets", headers=c.caller, data={"file": "x"}),
               Expect(415, "unsupported_media_type"))
    yield Case("upload_multipart_without_boundary", "http",
               lambda c: c.client.post("/v1/datasets", headers={**c.caller, "Content-Type": "multipart/form-data"},
                                       content=b"--x\r\n"), Expect(415, "unsupported_media_type"))
    yield Case("upload_without_file_part", "http",
               lambda c: c.client.post("/v1/datasets", headers=c.caller, files={"other": ("a.zip", b"PK")}),
               Expect(422, "validation_error"))
    yield Case("upload_with_too_many_form_parts", "http",
               lambda c: c.client.post("/v1/datasets", headers=c.caller, data={f"f{i}": "x" for i in range(40)},
                                       files={"file": ("d.zip", zip_of(tree(BASE)), "application/zip")}),
               Expect(422, "validation_error"))
    yield Case("upload_with_a_huge_part_header", "http", _upload_with_huge_part_header, Expect(400, "bad_request"))
    yield Case("upload_name_field_too_long", "http",
               lambda c: c.client.post("/v1/datasets", headers=c.caller, data={"name": "n" * 5000},
                                       files={"file": ("d.zip", zip_of(tree(BASE)), "application/zip")}),
               Expect(422, "validation_error"))
    yield Case("upload_malformed_multipart", "http",
               lambda c: c.client.post("/v1/datasets", content=b"--zz\r\nContent-Disposition: form-data\r\n\r\n",
                                       headers={**c.caller, "Content-Type": "multipart/form-data; boundary=zz"}),
               Expect(422, "validation_error"))
    yield Case("job_as_plain_text", "http",
               lambda c: c.client.post("/v1/jobs", headers={**c.caller, "Content-Type": "text/plain"},
                                       content=json.dumps({"dataset": {"id": c.dataset_id}})),
               Expect(415, "unsupported_media_type"))
    yield Case("job_as_form", "http", lambda c: c.client.post("/v1/jobs", headers=c.caller, data={"dataset": "x"}),
               Expect(415, "unsupported_media_type"))
    for case_name, url, code in (
        ("callback_host_not_allowed", "https://evil.example.org/hook", "callback_host_not_allowed"),
        ("callback_lookalike_host", "https://hooks.example.com.evil.org/hook", "callback_host_not_allowed"),
        ("callback_internal_address", "http://127.0.0.1:6379/", "callback_host_not_allowed"),
        ("callback_metadata_address", "http://169.254.169.254/latest/meta-data/", "callback_host_not_allowed"),
        ("callback_credentials_trick", "https://hooks.example.com@evil.example.org/", "invalid_callback_url"),
        ("callback_backslash_trick", "https://evil.example.org\\@hooks.example.com/", "invalid_callback_url"),
        ("callback_file_scheme", "file:///etc/passwd", "invalid_callback_url"),
        ("callback_control_characters", "https://hooks.example.com/a\r\nX-Injected: 1", "invalid_callback_url"),
    ):
        yield Case(case_name, "http", lambda c, u=url: c.submit(callback_url=u), Expect(422, code))
    yield Case("idempotency_key_with_control_chars", "http",
               lambda c: c.client.post("/v1/jobs", headers={**c.caller, "Idempotency-Key": "a\tb"},
                                       json={"dataset": {"id": c.dataset_id}}), Expect(422, "validation_error"))
    yield Case("rate_limit_per_key", "http", _burst_of_requests,
               Expect(429, "rate_limited", headers=("Retry-After",)),
               settings={"rate_limit_per_minute": 6.0, "rate_limit_burst": 3})
    yield Case("active_jobs_per_tenant", "http", lambda c: c.submit(dataset={"id": c.victim_dataset}, headers=c.victim),
               Expect(429, "too_many_active_jobs", headers=("Retry-After",)),
               settings={"max_active_jobs_per_tenant": 1})
    yield Case("storage_quota_per_tenant", "http", lambda c: c.upload(zip_of(tree(BASE))),
               Expect(413, "storage_quota_exceeded"), settings={"max_tenant_storage_bytes": 1000})
    yield Case("storage_quota_reached_by_extraction", "http", _upload_past_a_fresh_quota,
               Expect(413, "storage_quota_exceeded"), settings={"max_tenant_storage_bytes": 1500})


def _upload_past_a_fresh_quota(c: Corpus) -> Any:
    """A tenant with nothing stored yet passes the first check; the
    extracted size then exceeds the quota."""
    with session_scope(c.settings) as session:
        key = create_tenant_key(session, f"fresh-{secrets.token_hex(4)}")
    photos = {f"{name}/{i}.png": noisy_bytes("PNG") for name in BASE for i in range(2)}
    return c.client.post("/v1/datasets", headers={"Authorization": f"Bearer {key}"},
                         files={"file": ("d.zip", zip_of(photos), "application/zip")})


def _upload_with_huge_part_header(c: Corpus) -> Any:
    body = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\nX-Padding: '
            + b"p" * 20_000 + b"\r\n\r\nPK\r\n--zz--\r\n")
    return c.client.post("/v1/datasets", content=body,
                         headers={**c.caller, "Content-Type": "multipart/form-data; boundary=zz"})


def _burst_of_requests(c: Corpus) -> Any:
    """More requests than the bucket holds; the last answer is the one the case judges."""
    answers = [c.get("/v1/datasets") for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    return answers[-1]


def all_cases() -> list[Case]:
    cases = [*_archive_cases(), *_image_cases(), *_duplicate_cases(), *_class_cases(), *_manifest_cases(),
             *_spec_cases(), *_http_cases()]
    names = [case.name for case in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


CASES: list[Case] = all_cases()
