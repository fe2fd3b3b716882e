"""What an upload sends: an archive as it is, or a folder zipped into a temporary file first.

The file is streamed from disk (never read whole into memory) through `CountingReader`, which reports the
bytes handed to the connection so a caller can draw a progress bar.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MEDIA_TYPES = {".zip": "application/zip", ".tar": "application/x-tar", ".gz": "application/gzip",
               ".tgz": "application/gzip"}

ByteProgress = Callable[[int, "int | None"], None]  # (bytes sent, bytes in all)


@contextmanager
def upload_file(source: Path) -> Iterator[Path]:
    """The archive to send for `source`: the file itself, or a temporary zip of a folder (removed afterwards).

    Raises FileNotFoundError for a missing path and ValueError for a file that is not an accepted archive.
    """
    if source.is_dir():
        handle, name = tempfile.mkstemp(prefix=f"{source.name}-", suffix=".zip")
        os.close(handle)
        archive = Path(name)
        try:
            zip_folder(source, archive)
            yield archive
        finally:
            archive.unlink(missing_ok=True)
        return
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if not source.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise ValueError(f"{source}: upload a folder or a {', '.join(ARCHIVE_SUFFIXES)} archive")
    yield source


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip every file under `folder` (paths relative to it, sorted; hidden files and folders left out, links
    to folders not followed), so `train/<class>/…` or `<class>/…` sits at the archive's root."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(root, name)
                if path.is_file():
                    out.write(path, path.relative_to(folder).as_posix())
    return archive


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


class CountingReader(io.RawIOBase):
    """A read-only binary file that calls `on_progress(bytes read, size)` as it is read; a seek back to the
    start (a retried request) starts the count again."""

    def __init__(self, handle: BinaryIO, size: int, on_progress: ByteProgress | None) -> None:
        super().__init__()
        self.handle = handle
        self.size = size
        self.on_progress = on_progress
        self.done = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.done += len(data)
        if self.on_progress is not None and (data or self.done == 0):
            self.on_progress(self.done, self.size)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self.handle.seek(offset, whence)
        self.done = position
        return position

    def tell(self) -> int:
        return self.handle.tell()
