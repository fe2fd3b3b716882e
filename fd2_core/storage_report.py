"""What a job's "compressed synthetic dataset" weighs, next to the real data it replaces.

The download is the distilled images plus their soft labels; `storage_report` counts both from
the artifacts as written, so the report says what a user really gets. Torch-free (the standard
library only), so the API, the CLIs and the benchmark can use it without loading torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENCODED_FILES = "encoded files"
DECODED_PIXELS = "decoded pixels (built-in data: S²·3·N)"
STORED = "stored"
ONLINE = "online (teacher file)"
RATIO_FORMULA = "real_data_bytes / (distilled_images_bytes + soft_labels_bytes)"
IMAGES_FOLDER = "images/"  # where distilled.tar.gz keeps the encoded images (fd2_core.artifacts)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone.

    The format is an 8-byte little-endian header length, then that many bytes of JSON; reading
    them directly needs neither torch nor a tensor framework, and never maps the tensors.
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {length} bytes is too large")
        header = json.loads(fh.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def is_online(metadata: Mapping[str, str]) -> bool:
    """Whether soft labels are computed by the student from the shipped teacher: metadata
    `label_encoding` is a JSON object with `"online": true`."""
    try:
        encoding = json.loads(metadata.get("label_encoding") or "null")
    except ValueError:
        return False
    return isinstance(encoding, dict) and encoding.get("online") is True


def archive_image_bytes(path: str | os.PathLike[str]) -> int:
    """The encoded images inside distilled.tar.gz as stored (PNG/JPEG bytes, no tar headers or
    padding, no labels.csv or manifest.json)."""
    with tarfile.open(path, "r:*") as tar:
        return sum(m.size for m in tar if m.isfile() and m.name.startswith(IMAGES_FOLDER))


def real_data(train_bytes: int | None, num_train: int, image_size: int) -> tuple[int, str]:
    """(bytes, kind) of the real training data: the encoded files the loader read, or, for data
    generated in memory (no files), the decoded uint8 pixels S²·3·N."""
    if train_bytes is not None:
        return int(train_bytes), ENCODED_FILES
    return image_size * image_size * 3 * num_train, DECODED_PIXELS


def storage_report(artifacts: Mapping[str, Path], real_data_bytes: int, real_data_kind: str) -> dict[str, Any]:
    """The report's `storage` block from the artifacts `distilled.tar.gz`,
    `soft_labels.safetensors` and `teacher.safetensors`, and the real data's size and kind
    (`real_data`).

    With online soft labels the student recomputes them from the teacher, so the teacher file is
    what the labels cost; `soft_labels_file_bytes` is the labels file's own size either way.
    """
    archive = Path(artifacts["distilled.tar.gz"])
    labels_file = Path(artifacts["soft_labels.safetensors"])
    teacher_bytes = Path(artifacts["teacher.safetensors"]).stat().st_size
    online = is_online(safetensors_metadata(labels_file))
    images = archive_image_bytes(archive)
    labels = teacher_bytes if online else labels_file.stat().st_size
    compressed = images + labels
    return {
        "distilled_images_bytes": images,
        "distilled_archive_bytes": archive.stat().st_size,
        "soft_labels_bytes": labels,
        "soft_labels_kind": ONLINE if online else STORED,
        "soft_labels_file_bytes": labels_file.stat().st_size,
        "teacher_bytes": teacher_bytes,
        "real_data_bytes": int(real_data_bytes),
        "real_data_kind": real_data_kind,
        "compressed_bytes": compressed,
        "compression_ratio": real_data_bytes / compressed if compressed else None,
        "compression_ratio_formula": RATIO_FORMULA,
    }


def human_bytes(size: float) -> str:
    """Decimal units, one decimal: 41200 → "41.2 KB" (no formatting library is a dependency)."""
    if abs(size) < 1000:
        return f"{size:.0f} B"
    power = min(3, int(math.log10(abs(size))) // 3)
    return f"{size / 1000**power:.1f} {('KB', 'MB', 'GB')[power - 1]}"


def storage_line(storage: Mapping[str, Any]) -> str:
    """The CLI summary's one line about the storage block."""
    online = storage.get("soft_labels_kind") == ONLINE
    ratio = storage.get("compression_ratio")
    return (
        f"storage: images {human_bytes(storage['distilled_images_bytes'])} + soft labels "
        f"{'(online: teacher file) ' if online else ''}{human_bytes(storage['soft_labels_bytes'])} = "
        f"{human_bytes(storage['compressed_bytes'])}; real data {human_bytes(storage['real_data_bytes'])} "
        f"({storage['real_data_kind']}); ratio {'n/a' if ratio is None else f'×{ratio:.1f}'} "
        f"(real / (images + labels)); teacher {human_bytes(storage['teacher_bytes'])}"
    )


__all__ = [
    "DECODED_PIXELS", "ENCODED_FILES", "ONLINE", "RATIO_FORMULA", "STORED", "archive_image_bytes", "human_bytes",
    "is_online", "real_data", "safetensors_metadata", "storage_line", "storage_report",
]
