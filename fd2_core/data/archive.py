"""Unpack an uploaded zip or tar(.gz) without trusting anything it says about itself (torch-free).

The archive type comes from magic bytes, not the file name. Member paths that are absolute or climb
out with `..` refuse the whole archive (that is an attack, not an accident); links, devices, fifos,
encrypted members and nested archives are skipped and reported. File count, total bytes and the
compression ratio are enforced on the bytes actually written, so lying headers do not help a bomb.
Everything is written to a temporary folder beside the destination and renamed into place only on
success: a failure leaves nothing behind.

Member names are bytes in whatever encoding the archiver used (a zip's UTF-8 flag is often missing):
they are decoded together once every member has been read (`fd2_core.data.names`), so members are
first written under numbered names in a staging folder and moved to their decoded names at the end.
A decoded name longer than a file system allows is cut by the one rule of
`fd2_core.data.names.ShortNames` (reported for folders).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from fd2_core.data.errors import DataError, DataWarning, FileError
from fd2_core.data.layout import find_data_root, is_ignored_name
from fd2_core.data.limits import DataLimits
from fd2_core.data.names import ShortNames, absolute_name, decode_names

ArchiveKind = Literal["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"]

NESTED_ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".zip", ".tar", ".tgz", ".gz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst",
)
_CHUNK = 1024 * 1024
_STAGING = ".staging"  # inside the partial folder; a dot-name, so no member can be placed there
_ZIP_UTF8_FLAG = 0x800
_ZIP_UNICODE_PATH = 0x7075  # Info-ZIP Unicode Path extra field: a UTF-8 name beside a legacy one
# Exceptions that mean "the archive's bytes are wrong" while reading (writing errors are the
# server's own).
_READ_ERRORS = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError,
)
# Decompressors that check the stream's end marker and checksum (tarfile's own stream mode does
# not).
_DECOMPRESSORS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    "tar.gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "tar.bz2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    "tar.xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
}


@dataclass
class Extraction:
    """Result of `extract_archive`: the folder to scan and what was left out."""

    root: Path
    dest: Path
    kind: ArchiveKind
    files: int = 0
    bytes_written: int = 0
    skipped: list[FileError] = field(default_factory=list)
    # names decoded from a guessed code page, ...
    warnings: list[DataWarning] = field(default_factory=list)


def detect_archive(path: str | Path) -> ArchiveKind | None:
    """The archive type from the first bytes of the file, or None when it is not a supported
    archive."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head[:3] == b"BZh":
        return "tar.bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "tar.xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def member_parts(name: str) -> tuple[str, ...]:
    """Split a member name into safe path parts; raise DataError `path_escape` for absolute
    (`names.absolute_name`: `/x`, `C:/x`, `C:\\x`, UNC) or `..` names. `B: benign/x.png` is
    relative."""
    text = name.replace("\\", "/")
    if absolute_name(text):
        raise DataError("path_escape", f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError("path_escape", f"archive member {name!r} points outside the archive")
    return parts


def _is_nested_archive(name: str) -> bool:
    return name.lower().endswith(NESTED_ARCHIVE_SUFFIXES)


@dataclass
class _Member:
    """A member as read, before its name is decoded: a staged file, a folder, or a skip with its
    reason."""

    raw: bytes
    kind: Literal["file", "dir", "skip"]
    staged: Path | None = None
    reason: str = ""


class _Writer:
    """Stages members under `base/.staging` while counting files and bytes against the limits, then
    places them under `base` by their names decoded all together (`place`)."""

    def __init__(self, base: Path, limits: DataLimits, archive_bytes: int, result: Extraction) -> None:
        self.base = base
        self.staging = base / _STAGING
        self.staging.mkdir()
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.result = result
        self.members: list[_Member] = []

    def accept(self, raw_name: bytes) -> str | None:
        """A provisional name for messages and for the checks that only look at ASCII (`..`,
        absolute paths, clutter, nested archives), or None when the member is skipped silently.
        Raises DataError `path_escape` at once, before anything else is read."""
        if b"\x00" in raw_name:
            raise DataError("bad_archive", "archive member name contains a NUL byte")
        text = raw_name.decode("utf-8", "replace")
        parts = member_parts(text)
        # Clutter is judged on `/` parts only: in Shift_JIS a backslash byte can be half of a
        # character.
        if not parts or any(is_ignored_name(p) for p in text.split("/") if p not in ("", ".")):
            return None
        return "/".join(parts)

    def skip(self, raw_name: bytes, reason: str) -> None:
        self.members.append(_Member(raw_name, "skip", reason=reason))

    def make_dir(self, raw_name: bytes) -> None:
        self.members.append(_Member(raw_name, "dir"))

    def write_file(self, raw_name: bytes, name: str, read: Callable[[int], bytes]) -> None:
        """Copy one member's data to the staging folder; `name` (provisional) is only for
        messages."""
        if self.result.files >= self.limits.max_files:
            raise DataError("too_many_files", f"the archive holds more than {self.limits.max_files} files")
        staged = self.staging / str(len(self.members))
        self.members.append(_Member(raw_name, "file", staged=staged))
        self.result.files += 1
        with open(staged, "xb") as out:
            while True:
                try:
                    chunk = read(_CHUNK)
                except _READ_ERRORS as exc:
                    message = f"the archive is corrupt or truncated at {name}: {exc}"
                    raise DataError("bad_archive", message) from None
                if not chunk:
                    break
                out.write(chunk)
                self.count(len(chunk))

    def place(self) -> None:
        """Decode every name together, then create folders, move staged files and record skips in
        archive order: of two members that end up with one name, the first is kept."""
        decoding = decode_names(m.raw for m in self.members)
        self.result.warnings.extend(decoding.warnings)
        named: list[tuple[_Member, tuple[str, ...]]] = []
        for member in self.members:
            parts = member_parts(decoding.text(member.raw))
            if not parts or any(is_ignored_name(p) for p in parts):
                self._drop(member)
            else:
                named.append((member, parts))
        short = ShortNames((parts, member.kind == "dir") for member, parts in named)
        self.result.warnings.extend(short.warnings)
        for member, parts in named:
            name = "/".join(parts)  # messages name the member as sent
            if member.kind == "dir":
                try:
                    self.base.joinpath(*short.on_disk(parts)).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    self.result.skipped.append(FileError(name + "/", f"cannot create folder: {exc.strerror or exc}"))
            elif member.kind == "skip":
                self.result.skipped.append(FileError(name, member.reason))
            else:
                reason = self._move(member, short.on_disk(parts))
                if reason is not None:
                    self.result.skipped.append(FileError(name, reason))
                    self._drop(member)
        shutil.rmtree(self.staging)

    def _move(self, member: _Member, parts: tuple[str, ...]) -> str | None:
        """Move a staged file to its place; the reason when it cannot go there."""
        assert member.staged is not None
        target = self.base.joinpath(*parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            return "a file of the archive is in the way of this member's folder"
        except OSError as exc:  # e.g. a whole path longer than the system allows
            return f"cannot create its folder: {exc.strerror or exc}"
        if os.path.lexists(target):
            return "duplicate archive member; the first one is kept"
        try:
            os.rename(member.staged, target)
        except OSError as exc:
            return f"cannot create file: {exc.strerror or exc}"
        return None

    def _drop(self, member: _Member) -> None:
        if member.kind == "file":
            self.result.files -= 1

    def count(self, n: int) -> None:
        self.result.bytes_written += n
        total = self.result.bytes_written
        limits = self.limits
        if total > limits.max_total_uncompressed_bytes:
            cap = limits.max_total_uncompressed_bytes
            raise DataError("too_large", f"the archive unpacks to more than {cap} bytes")
        if total > limits.ratio_grace_bytes and total > limits.max_compression_ratio * self.archive_bytes:
            ratio = limits.max_compression_ratio
            raise DataError("too_large", f"the archive expands more than {ratio:g} times its size (a bomb?)")


def zip_member_name(info: zipfile.ZipInfo) -> bytes:
    """The member's name as stored, in bytes (up to a NUL, as `zipfile` reads it).

    `zipfile` decodes names without the UTF-8 flag as cp437, which gives their bytes back
    losslessly. An Info-ZIP Unicode Path extra field whose checksum matches those bytes holds the
    name in UTF-8: it wins.
    """
    if info.flag_bits & _ZIP_UTF8_FLAG:
        return info.filename.encode("utf-8")
    stored = info.orig_filename.encode("cp437")
    extra = info.extra
    while len(extra) >= 4:
        kind, size = struct.unpack("<HH", extra[:4])
        body, extra = extra[4:4 + size], extra[4 + size:]
        if kind == _ZIP_UNICODE_PATH and len(body) >= 5 and body[0] == 1:
            if struct.unpack("<L", body[1:5])[0] == zlib.crc32(stored):
                return body[5:].split(b"\x00", 1)[0]
    return info.filename.encode("cp437")


def _zip_members(path: Path, writer: _Writer) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as exc:
        raise DataError("bad_archive", f"not a readable zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        if sum(not i.is_dir() for i in infos) > writer.limits.max_files:
            raise DataError("too_many_files", f"the archive holds more than {writer.limits.max_files} files")
        declared = sum(i.file_size for i in infos)
        if declared > writer.limits.max_total_uncompressed_bytes:
            raise DataError("too_large", f"the archive declares {declared} uncompressed bytes; the limit is"
                                         f" {writer.limits.max_total_uncompressed_bytes}")
        for info in infos:
            raw = zip_member_name(info)
            name = writer.accept(raw)
            if name is None:
                continue
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISDIR(mode):
                writer.make_dir(raw)
            elif stat.S_ISLNK(mode):
                writer.skip(raw, "symbolic link refused")
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                writer.skip(raw, "special file refused")
            elif info.flag_bits & 0x1:
                writer.skip(raw, "encrypted member skipped")
            elif _is_nested_archive(name):
                writer.skip(raw, "nested archive not extracted")
            else:
                try:
                    src = zf.open(info)
                except NotImplementedError as exc:
                    writer.skip(raw, f"unsupported compression: {exc}")
                    continue
                except _READ_ERRORS as exc:
                    raise DataError("bad_archive", f"the archive is corrupt at {name}: {exc}") from None
                with src:
                    writer.write_file(raw, name, src.read)


def _tar_members(path: Path, kind: ArchiveKind, writer: _Writer) -> None:
    with open(path, "rb") as raw:
        stream = _DECOMPRESSORS[kind](raw) if kind in _DECOMPRESSORS else raw
        try:
            # Undecodable name bytes come back as surrogates, which `encode(..., "surrogateescape")`
            # reverses.
            tf = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")
        except _READ_ERRORS as exc:
            raise DataError("bad_archive", f"not a readable tar archive: {exc}") from None
        with tf:
            for member in _iterate_tar(tf):
                raw = member.name.encode("utf-8", "surrogateescape")
                name = writer.accept(raw)
                if name is not None and member.isfile() and not _is_nested_archive(name):
                    writer.write_file(raw, name, _open_tar_member(tf, member, name).read)
                    continue
                # Skipped data is still decompressed to reach the next header: it counts against the
                # budget.
                writer.count(max(member.size, 0) if member.isfile() else 0)
                if name is None:
                    continue
                if member.isdir():
                    writer.make_dir(raw)
                elif member.issym() or member.islnk():
                    writer.skip(raw, "link refused")
                elif not member.isfile():
                    writer.skip(raw, "device, fifo or other special file refused")
                else:
                    writer.skip(raw, "nested archive not extracted")
        if stream is not raw:
            _drain(stream, writer)


def _drain(stream: IO[bytes], writer: _Writer) -> None:
    """Read a compressed stream to its end so a truncated or corrupt tail is noticed (bytes still
    count)."""
    while True:
        try:
            chunk = stream.read(_CHUNK)
        except _READ_ERRORS as exc:
            raise DataError("bad_archive", f"the compressed archive is corrupt or truncated: {exc}") from None
        if not chunk:
            return
        writer.count(len(chunk))


def _iterate_tar(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tf.next()
        except _READ_ERRORS as exc:
            raise DataError("bad_archive", f"the tar archive is corrupt or truncated: {exc}") from None
        if member is None:
            return
        yield member


def _open_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> IO[bytes]:
    try:
        src = tf.extractfile(member)
    except _READ_ERRORS as exc:
        raise DataError("bad_archive", f"the tar archive is corrupt at {name}: {exc}") from None
    if src is None:
        raise DataError("bad_archive", f"the tar archive has no data for {name}")
    return src


def extract_archive(
    archive_path: str | Path, dest_dir: str | Path, limits: DataLimits = DataLimits(), shown_name: str | None = None
) -> Extraction:
    """Unpack a zip/tar/tar.gz into `dest_dir` (which must not exist yet, or be empty) safely.

    `shown_name` is the name messages use for the archive (a service keeps uploads under internal
    names; the user knows the file they sent).

    Raises DataError: `not_found`, `bad_archive` (unknown type, corrupt, truncated), `path_escape`,
    `too_many_files`, `too_large`. Skipped members are listed in the result's `skipped`; names that
    were not UTF-8 (decoded from a guessed code page, or kept percent-encoded) in its `warnings`.
    """
    archive_path = Path(archive_path)
    dest = Path(dest_dir)
    shown = shown_name or archive_path.name
    if not archive_path.is_file():
        raise DataError("not_found", f"archive {shown!r} not found")
    if archive_path.stat().st_size == 0:
        raise DataError("bad_archive", f"{shown} is empty (0 bytes)")
    kind = detect_archive(archive_path)
    if kind is None:
        raise DataError("bad_archive", f"{shown} is not a zip or tar(.gz) archive")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extraction target {dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    result = Extraction(root=dest, dest=dest, kind=kind)
    try:
        writer = _Writer(tmp, limits, archive_path.stat().st_size, result)
        if kind == "zip":
            _zip_members(archive_path, writer)
        else:
            _tar_members(archive_path, kind, writer)
        writer.place()
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.root = find_data_root(dest)
    return result


def safe_extract(archive_path: str | Path, dest_dir: str | Path, limits: DataLimits = DataLimits()) -> Path:
    """Unpack safely (see `extract_archive`) and return the folder to scan, one wrapping folder
    unwrapped."""
    return extract_archive(archive_path, dest_dir, limits).root
