"""Writers for the downloadable artifacts (README.md, "Artifacts of a job"): tar.gz of PNGs,
safetensors, JSON and a PNG preview.

Everything is written atomically and deterministically (fixed mtimes, sorted members): the same run
gives the same bytes, so sha256 checksums are stable across a resume.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import shutil
import tarfile
import unicodedata
from itertools import chain, count
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write
from .data.names import MAX_NAME_BYTES, distinct_name

MEDIA_TYPES = {
    "distilled.tar.gz": "application/gzip",
    "soft_labels.safetensors": "application/octet-stream",
    "teacher.safetensors": "application/octet-stream",
    "report.json": "application/json",
    "preview.png": "image/png",
}
PREVIEW_CELL = 64
PREVIEW_MAX_ROWS = 100
MAX_FOLDER_CHARS = 100  # a readable folder; the byte budget below may cut a multi-byte name further
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|\ud800-\udfff]")


def image_ending(j: int) -> str:
    """The end of an image's file name after its folder's name: `_<j>.png`, j its ipc index."""
    return f"_{j}.png"


def image_member(folder: str, j: int) -> str:
    """`images/<folder>/<folder>_<j>.png`, the archive member of image j of a class."""
    return f"images/{folder}/{folder}{image_ending(j)}"


def ipc_index_of(member: str) -> int:
    """The ipc index j of an `image_member` name: the digits after its last `_` (a folder's own `_`
    or a uniqueness suffix come before it)."""
    stem = member.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return int(stem.rsplit("_", 1)[-1])


def safe_folder_names(classes: list[str], ending: str = "") -> list[str]:
    """File-system-safe, case-insensitively unique folder names for class names (labels.csv keeps
    the real).

    Each fits `MAX_NAME_BYTES` with `ending` (the longest file-name ending put after it,
    `image_ending`) appended, by the one rule (`fd2_core.data.names.distinct_name`); a name taken
    already gets `_<i>` (i its class index), and `_<i>_<n>` if that is taken too.
    """
    limit = MAX_NAME_BYTES - len(ending.encode("utf-8"))
    names: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(classes):
        clean = _UNSAFE.sub("_", unicodedata.normalize("NFC", name)).strip().strip(".")
        clean = clean[:MAX_FOLDER_CHARS] or f"class_{i}"
        suffixes = chain([f"_{i}"], (f"_{i}_{n}" for n in count(2)))
        folder = distinct_name(clean, seen, limit=limit, suffixes=suffixes, key=str.casefold)
        seen.add(folder.casefold())
        names.append(folder)
    return names


def png_bytes(image_u8: torch.Tensor) -> bytes:
    """uint8 [3,H,W] → PNG bytes (no metadata chunks, so bytes are deterministic)."""
    array = image_u8.permute(1, 2, 0).contiguous().cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_distilled_tar(
    path: Path,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    ipc_index: torch.Tensor,
    classes: list[str],
    manifest: dict,
) -> Path:
    """images/<class>/<class>_<j>.png + labels.csv + manifest.json (with per-file sha256); every
    member's path component is at most `MAX_NAME_BYTES` (`safe_folder_names`)."""
    import json

    folders = safe_folder_names(classes, image_ending(max(ipc_index.tolist(), default=0)))
    files: list[tuple[str, bytes]] = []
    rows = [("file", "class_index", "class_name")]
    for img, label, j in zip(images_u8, labels.tolist(), ipc_index.tolist(), strict=False):
        name = image_member(folders[label], j)
        files.append((name, png_bytes(img)))
        rows.append((name, str(label), classes[label]))
    files.sort(key=lambda item: item[0])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    manifest = {**manifest, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files}}
    meta_files = [
        ("labels.csv", text.getvalue().encode("utf-8")),
        ("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")),
    ]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in meta_files + files:
                    _add_member(tar, name, data)

    return atomic_write(path, write)


def copy_file(src: Path, dst: Path) -> Path:
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _heatmap(attention: torch.Tensor, size: int) -> np.ndarray:
    """Mean of the M attention maps, upsampled and coloured (black → red → yellow)."""
    a = attention.float().mean(0, keepdim=True)[None]
    a = torch.nn.functional.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    rgb = torch.stack([a.clamp(0, 0.5) * 2, (a - 0.5).clamp(0, 0.5) * 2, torch.zeros_like(a)], dim=-1)
    return (rgb * 255).round().byte().cpu().numpy()


def write_preview(
    path: Path,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    ipc_index: torch.Tensor,
    num_classes: int,
    ipc: int,
    attention: torch.Tensor | None = None,
) -> Path:
    """Grid rows = classes (first PREVIEW_MAX_ROWS), columns = ipc; with attention, one heat map per
    image."""
    rows = min(num_classes, PREVIEW_MAX_ROWS)
    cols = ipc * (2 if attention is not None else 1)
    cell = PREVIEW_CELL
    canvas = np.full((rows * cell, cols * cell, 3), 255, dtype=np.uint8)
    for i, (label, j) in enumerate(zip(labels.tolist(), ipc_index.tolist(), strict=False)):
        if label >= rows:
            continue
        thumb = Image.fromarray(images_u8[i].permute(1, 2, 0).cpu().numpy()).resize((cell, cell), Image.BICUBIC)
        col = j * (2 if attention is not None else 1)
        canvas[label * cell : (label + 1) * cell, col * cell : (col + 1) * cell] = np.asarray(thumb)
        if attention is not None:
            heat = _heatmap(attention[i], cell)
            canvas[label * cell : (label + 1) * cell, (col + 1) * cell : (col + 2) * cell] = heat

    def write(tmp: Path) -> None:
        Image.fromarray(canvas).save(tmp, format="PNG")

    return atomic_write(path, write)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
