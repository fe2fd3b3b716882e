"""Load any accepted dataset source into uint8 tensors with its class names and per-file problems (torch).

Sources: a folder, an archive (.zip/.tar/.tar.gz, unpacked safely into a temporary folder that is removed
afterwards), a manifest file, an inline manifest `{"root": ..., "items": [...]}`, or the built-in generator
`fgsynth[:classes=K,size=S,train=N,test=M,seed=X,variant=birds|cars,first=F]` (`first=F` draws the generator's
classes F … F+K−1, disjoint from the default 0 … K−1 when F ≥ K; labels still run 0 … K−1). Images are decoded
in a thread pool (Pillow releases the GIL while decoding); undecodable files are skipped and listed in `errors`.
The same decode fingerprints each image's pixels, so duplicates and test images that occur in train are counted
(`ImageDataset.duplicates`, see `fd2_core.data.duplicates`) and, when asked, dropped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fd2_core.data import fgsynth
from fd2_core.data.archive import detect_archive, extract_archive
from fd2_core.data.duplicates import DuplicateReport, Fingerprint, duplicate_warnings, find_duplicates
from fd2_core.data.errors import DataError, DataWarning, FileError, ImageDecodeError, UnusableDataError
from fd2_core.data.images import decode_with_digest, pixel_digest
from fd2_core.data.layout import DatasetLayout, Item, relative_name, scan_manifest_items, scan_source
from fd2_core.data.limits import DataLimits

FGSYNTH_PREFIX = "fgsynth"
_FGSYNTH_KEYS: dict[str, tuple[str, type]] = {
    "classes": ("num_classes", int),
    "size": ("image_size", int),
    "train": ("train_per_class", int),
    "test": ("test_per_class", int),
    "seed": ("seed", int),
    "variant": ("variant", str),
    "first": ("first_class", int),
}
# Options left out of a described source while at their default, so existing sources keep their description.
_FGSYNTH_QUIET_DEFAULTS: dict[str, object] = {"first": 0}


@dataclass
class ImageDataset:
    """A decoded dataset: uint8 images `[N, 3, S, S]`, int64 labels, class names and train-split statistics;
    `warnings` say what was used anyway (e.g. file names decoded from a guessed code page); `duplicates` counts
    equal images per split and test images that occur in train (`DuplicateReport.as_dict`).
    `train_bytes` is the on-disk size of the train images' files as read (None for data made in
    memory, `fgsynth`), so a report can weigh the real data against the distilled set."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    errors: list[FileError] = field(default_factory=list)
    source: str = ""
    warnings: list[DataWarning] = field(default_factory=list)
    duplicates: dict[str, Any] = field(default_factory=dict)
    train_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("train_images", "test_images"):
            images = getattr(self, name)
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{name} must be a uint8 tensor [N, 3, S, S]")
        if len(self.train_images) != len(self.train_labels) or len(self.test_images) != len(self.test_labels):
            raise ValueError("images and labels differ in length")

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def per_class_counts(self, split: str = "train") -> dict[str, int]:
        """`{class name: number of images}` of the `train` or `test` split."""
        if split not in ("train", "test"):
            raise ValueError("split must be 'train' or 'test'")
        labels = self.train_labels if split == "train" else self.test_labels
        counts = torch.bincount(labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation in [0, 1] of uint8 images `[N, 3, S, S]`, chunked in float64
    so a large dataset is never copied to float at once."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        squares += block.square().sum(dim=(0, 2, 3))
        count += block.numel() // 3
    if count == 0:
        raise DataError("no_images", "the training split is empty")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _to_tensor(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_hwc)).permute(0, 3, 1, 2).contiguous()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size or len(images) == 0:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _assemble(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
    classes: Sequence[str], errors: list[FileError], source: str, duplicates: dict[str, Any],
    warnings: Sequence[DataWarning] = (), train_bytes: int | None = None,
) -> ImageDataset:
    mean, std = channel_stats(train)
    return ImageDataset(train, train_labels, test, test_labels, list(classes), mean, std, errors, source,
                        list(warnings), duplicates, train_bytes)


def parse_fgsynth_source(source: str, image_size: int) -> dict[str, Any]:
    """`fgsynth[:k=v,...]` to `fgsynth.generate` keyword arguments (`size` defaults to `image_size`)."""
    head, _, options = source.partition(":")
    if head.strip().lower() != FGSYNTH_PREFIX:
        raise DataError("bad_source", f"not an fgsynth source: {source!r}")
    kwargs: dict[str, Any] = {"image_size": image_size}
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = option.partition("=")
        key = key.strip().lower()
        if not sep or key not in _FGSYNTH_KEYS:
            known = ", ".join(_FGSYNTH_KEYS)
            raise DataError("bad_source", f"fgsynth option {option!r} is not key=value with a key in: {known}",
                            fix="")
        name, kind = _FGSYNTH_KEYS[key]
        try:
            kwargs[name] = kind(value.strip())
        except ValueError:
            raise DataError("bad_source", f"fgsynth option {key} needs a {kind.__name__}, got {value!r}",
                            fix="") from None
    return kwargs


def load_fgsynth(source: str, image_size: int, drop_duplicates: bool = False) -> ImageDataset:
    """Generate the built-in dataset in memory (nothing is read from or written to disk)."""
    kwargs = parse_fgsynth_source(source, image_size)
    try:
        data = fgsynth.generate(**kwargs)
    except ValueError as exc:
        raise DataError("bad_source", f"fgsynth: {exc}", fix="") from None
    prints = [Fingerprint(f"{split}/{index}", split, pixel_digest(image))
              for split, images in (("train", data.train_images), ("test", data.test_images))
              for index, image in enumerate(images)]
    found = find_duplicates(prints, drop=drop_duplicates)
    n_train = len(data.train_images)
    keep_train = np.array([i for i in range(n_train) if i not in found.dropped], dtype=np.int64)
    keep_test = np.array([i for i in range(len(data.test_images)) if n_train + i not in found.dropped], dtype=np.int64)
    train = _resize(_to_tensor(data.train_images[keep_train]), image_size)
    test = _resize(_to_tensor(data.test_images[keep_test]), image_size)
    described = ",".join(
        f"{key}={data.params[name]}" for key, (name, _) in _FGSYNTH_KEYS.items()
        if key not in _FGSYNTH_QUIET_DEFAULTS or data.params[name] != _FGSYNTH_QUIET_DEFAULTS[key]
    )
    return _assemble(
        train, torch.from_numpy(data.train_labels[keep_train]), test, torch.from_numpy(data.test_labels[keep_test]),
        data.classes, [FileError(prints[i].name, reason) for i, reason in found.dropped.items()],
        f"{FGSYNTH_PREFIX}:{described}", found.as_dict(), _duplicate_warnings(found),
    )


DUPLICATES_FIX = "drop them with drop_duplicates (the CLI's --drop-duplicates, the upload's drop_duplicates=true)"


def _duplicate_warnings(found: DuplicateReport) -> list[DataWarning]:
    """What the data still holds of duplicates and test images leaked from train, as warnings that travel with
    the dataset into every report (a leaked test image inflates every accuracy reported)."""
    return [DataWarning(w["code"], w["message"], w["details"]) for w in duplicate_warnings(found, DUPLICATES_FIX)]


def decode_layout(
    layout: DatasetLayout,
    image_size: int,
    *,
    limits: DataLimits = DataLimits(),
    workers: int | None = None,
    source: str = "",
    extra_errors: Sequence[FileError] = (),
    extra_warnings: Sequence[DataWarning] = (),
    on_progress: Callable[[int, int], None] | None = None,
    drop_duplicates: bool = False,
) -> ImageDataset:
    """Decode every item of a layout in a thread pool; failures move to `errors` (DataError when fewer than
    two classes with training images remain). `on_progress(done, total)` is called from this thread every
    few hundred images, so a caller can report progress or stop a long decode. The same decode fingerprints
    each image: `duplicates` counts copies in the layout's splits; `drop_duplicates` also removes them (the
    rule of `fd2_core.data.duplicates`) and lists each in `errors`.
    `train_bytes` sums the file sizes of the train images kept (each stat right after its decode,
    in the pool: no second walk)."""
    buffer = np.empty((len(layout.items), image_size, image_size, 3), dtype=np.uint8)
    digests: list[str] = [""] * len(layout.items)
    sizes = np.zeros(len(layout.items), dtype=np.int64)

    def decode_into(index_item: tuple[int, Item]) -> str | None:
        index, item = index_item
        try:
            buffer[index], digests[index] = decode_with_digest(item.path, image_size, limits.max_image_pixels)
            sizes[index] = os.stat(item.path).st_size
        except ImageDecodeError as exc:
            return exc.reason
        except OSError as exc:  # the file went away after it decoded
            return f"cannot read the file's size: {exc.strerror or exc}"
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    total = len(layout.items)
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for reason in pool.map(decode_into, enumerate(layout.items)):
            reasons.append(reason)
            if on_progress is not None and (len(reasons) % 256 == 0 or len(reasons) == total):
                on_progress(len(reasons), total)
    row_of = {item.path: index for index, item in enumerate(layout.items)}
    failed = {item.path: r for item, r in zip(layout.items, reasons, strict=True) if r is not None}
    layout.without(failed)
    prints = [Fingerprint(relative_name(layout.root, item.path), item.split, digests[row_of[item.path]])
              for item in layout.items]
    found = find_duplicates(prints, drop=drop_duplicates)
    layout.without({layout.items[index].path: reason for index, reason in found.dropped.items()})
    errors = [*extra_errors, *layout.errors]
    splits = {}
    for split in ("train", "test"):
        chosen = [item for item in layout.items if item.split == split]
        rows = np.fromiter((row_of[item.path] for item in chosen), dtype=np.int64, count=len(chosen))
        images = _to_tensor(buffer[rows]) if len(rows) else torch.empty((0, 3, image_size, image_size),
                                                                         dtype=torch.uint8)
        labels = torch.tensor([item.label for item in chosen], dtype=torch.int64)
        splits[split] = (images, labels)
        if split == "train":
            train_bytes = int(sizes[rows].sum())
    warnings = [*extra_warnings, *layout.warnings, *_duplicate_warnings(found)]
    return _assemble(*splits["train"], *splits["test"], layout.classes, errors, source, found.as_dict(), warnings,
                     train_bytes)


# What the loader (and `fd2_core.pipeline.run`) accepts: a path (folder, archive, manifest file), `fgsynth[:...]`,
# an inline manifest `{"root", "items"}`, a layout already scanned and checked (a service scans once per process
# and hands the layout on), or a decoded dataset.
DataSource = str | os.PathLike[str] | Mapping[str, Any] | DatasetLayout | ImageDataset


def load_dataset(
    source: DataSource,
    image_size: int,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    limits: DataLimits = DataLimits(),
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    drop_duplicates: bool = False,
) -> ImageDataset:
    """Load a folder, archive, manifest file, inline manifest `{"root", "items"}`, `fgsynth[:...]` source, or a
    `DatasetLayout` a caller has already scanned and checked (decoded as it is: no second scan, its own carve).

    `seed` and `test_fraction` only matter when the source has no test split (a seeded per-class share is
    carved; a layout keeps the carve it was scanned with). `drop_duplicates` removes copies within a split and
    test images that occur in train (counted in `ImageDataset.duplicates` either way). Raises DataError
    (`not_found`, `bad_source`, `bad_archive`, `no_images`, `one_class`, ...).
    """
    if image_size < 1:
        raise ValueError("image_size must be positive")
    if isinstance(source, ImageDataset):
        if source.image_size != image_size:
            raise ValueError(f"dataset has {source.image_size} px images, {image_size} px were asked for")
        return source
    if isinstance(source, DatasetLayout):
        shown = source.shown_as or (f"manifest:{source.root}" if source.kind == "manifest" else str(source.root))
        return decode_layout(source, image_size, limits=limits, workers=workers, source=shown,
                             on_progress=on_progress, drop_duplicates=drop_duplicates)
    if isinstance(source, Mapping):
        root, items = source.get("root"), source.get("items")
        if not isinstance(root, (str, os.PathLike)) or not isinstance(items, Sequence):
            raise DataError("bad_manifest", 'an inline manifest needs "root" (a folder) and "items" (a list)')
        layout = scan_manifest_items(Path(root), items, test_fraction=test_fraction, seed=seed, limits=limits)
        return decode_layout(layout, image_size, limits=limits, workers=workers, source=f"manifest:{root}",
                             on_progress=on_progress, drop_duplicates=drop_duplicates)
    text = os.fspath(source)
    path = Path(text)
    if text.strip().lower().partition(":")[0] == FGSYNTH_PREFIX and not path.exists():
        return load_fgsynth(text, image_size, drop_duplicates)
    if not path.exists():
        raise DataError("not_found", f"dataset source {text!r} not found",
                        fix="check the path, or give fgsynth[:k=v,...] for the built-in data")
    if path.is_file() and path.suffix.lower() not in (".json", ".csv"):
        if detect_archive(path) is None:
            raise DataError("bad_source", f"{path.name} is neither an archive (.zip, .tar, .tar.gz) nor a manifest")
        with tempfile.TemporaryDirectory(prefix="fd2-data-") as tmp:
            extraction = extract_archive(path, Path(tmp) / "data", limits)
            try:
                layout = scan_source(extraction.root, test_fraction=test_fraction, seed=seed, limits=limits)
                return decode_layout(layout, image_size, limits=limits, workers=workers, source=text,
                                     extra_errors=extraction.skipped, extra_warnings=extraction.warnings,
                                     on_progress=on_progress, drop_duplicates=drop_duplicates)
            except UnusableDataError as exc:  # what extraction left out may be why nothing is usable
                raise exc.with_skipped(extraction.skipped) from None
    layout = scan_source(path, test_fraction=test_fraction, seed=seed, limits=limits)
    return decode_layout(layout, image_size, limits=limits, workers=workers, source=text, on_progress=on_progress,
                         drop_duplicates=drop_duplicates)


__all__ = [
    "DataSource",
    "ImageDataset",
    "channel_stats",
    "decode_layout",
    "load_dataset",
    "load_fgsynth",
    "parse_fgsynth_source",
]
