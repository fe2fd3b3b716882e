"""Bounds on what one dataset may hold, so a hostile or mistaken upload fails before it fills a disk."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class DataLimits:
    """Every bound the data layer enforces; the defaults fit a large fine-grained dataset on one worker."""

    max_files: int = 200_000
    max_total_uncompressed_bytes: int = 8 * GIB
    # Uncompressed bytes per archive byte. Photos barely compress, so a high ratio means a bomb; it is only
    # judged past `ratio_grace_bytes` so that a tiny archive of flat test images is not refused.
    max_compression_ratio: float = 200.0
    ratio_grace_bytes: int = 64 * MIB
    # Width x height checked on the image header before any pixel is decoded (decompression-bomb cap).
    max_image_pixels: int = 40_000_000
    max_classes: int = 5_000
    max_manifest_rows: int = 500_000
    max_manifest_bytes: int = 256 * MIB
    # Archives found inside an archive are never unpacked: they are skipped and reported. Only 0 is valid; the
    # field exists so the bound is visible next to the others.
    max_archive_depth: int = 0

    def __post_init__(self) -> None:
        if self.max_archive_depth != 0:
            raise ValueError("nested archives are never unpacked; max_archive_depth must be 0")
        for name in ("max_files", "max_total_uncompressed_bytes", "max_image_pixels", "max_classes",
                     "max_manifest_rows", "max_manifest_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_compression_ratio <= 1:
            raise ValueError("max_compression_ratio must be greater than 1")
