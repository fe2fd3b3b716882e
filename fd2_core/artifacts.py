"""Writers for the downloadable artifacts (README.md, "Artifacts of a job"): tar.gz of PNGs, safetensors,
JSON and a PNG preview.

Everything is written atomically and deterministically (fixed mtimes, sorted members): the same run gives
the same bytes, so sha256 checksums are stable across a resume.
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write

MEDIA_TYPES = {
    "distilled.tar.gz": "application/gzip",
    "soft_labels.safetensors": "application/octet-stream",
    "teacher.safetensors": "application/octet-stream",
    "report.json": "application/json",
    "preview.png": "image/png",
}
PREVIEW_CELL = 64
PREVIEW_MAX_ROWS = 100


def safe_folder_names(classes: list[str]) -> list[str]:
    """File-system-safe, case-insensitively unique folder names for class names (labels.csv keeps the real)."""
    names: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(classes):
        clean = unicodedata.normalize("NFC", name)
        clean = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]", "_", clean).strip().strip(".")
        clean = clean[:100] or f"class_{i}"
        if clean.casefold() in seen:
            clean = f"{clean}_{i}"
        seen.add(clean.casefold())
        names.append(clean)
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
    """images/<class>/<class>_<j>.png + labels.csv + manifest.json (with per-file sha256)."""
    import json

    folders = safe_folder_names(classes)
    files: list[tuple[str, bytes]] = []
    rows = [("file", "class_index", "class_name")]
    for img, label, j in zip(images_u8, labels.tolist(), ipc_index.tolist(), strict=False):
        name = f"images/{folders[label]}/{folders[label]}_{j}.png"
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
    """Grid rows = classes (first PREVIEW_MAX_ROWS), columns = ipc; with attention, one heat map per image."""
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
