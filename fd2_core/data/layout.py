"""Find classes, splits and image files of a dataset on disk without decoding any pixels
(torch-free).

Accepted layouts, checked in this order (one wrapping top folder is looked through):
1. `manifest.json` / `manifest.csv` rows `path,label[,split]` relative to the manifest's folder;
2. `train/<class>/...` with optional `test/<class>/...` (`val/` counts as test when there is no
   `test/`; a test folder without class folders of the training classes, such as a flat `val/`, is
   not a test split);
3. flat `<class>/...`.
Without a test split, a seeded per-class share of the images becomes test, so the same data and seed
always give the same split. Files that cannot be used are recorded in `errors` with a reason, never
silently dropped (except `__MACOSX/` and dot-files, which are operating-system clutter). Names on
disk are bytes: class names and shown paths are NFC text, decoded for the whole tree at once
(`fd2_core.data.names`); folders whose names differ only in NFC/NFD spelling are one class.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import stat
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fd2_core.data.errors import DataError, DataWarning, FileError, ImageDecodeError, UnusableDataError
from fd2_core.data.images import check_image, image_digest, is_image_name
from fd2_core.data.limits import DataLimits
from fd2_core.data.names import TreeNames, absolute_name, escape_name, utf8_name

Split = Literal["train", "test"]
LayoutKind = Literal["imagefolder", "flat", "manifest"]

MANIFEST_NAMES: tuple[str, ...] = ("manifest.json", "manifest.csv")
TRAIN_DIR_NAMES: frozenset[str] = frozenset({"train"})
TEST_DIR_NAMES: frozenset[str] = frozenset({"test"})
VAL_DIR_NAMES: frozenset[str] = frozenset({"val", "validation"})
_SPLIT_DIR_NAMES = TRAIN_DIR_NAMES | TEST_DIR_NAMES | VAL_DIR_NAMES
_SPLIT_ALIASES: dict[str, Split] = {"train": "train", "test": "test", "val": "test", "validation": "test"}
MAX_LABEL_CHARS = 200
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Reasons of manifest rows that point outside their root: callers that refuse such input outright
# match on them.
ABSOLUTE_PATH_REASON = "absolute path refused: paths are relative to the dataset root"
ESCAPING_PATH_REASON = "path escapes the dataset root"
PATH_ESCAPE_REASONS: frozenset[str] = frozenset({ABSOLUTE_PATH_REASON, ESCAPING_PATH_REASON})


@dataclass(frozen=True)
class Item:
    """One image file with its class index into `DatasetLayout.classes` and its split."""

    path: Path
    label: int
    split: Split
    # True when the source gave no split and the seeded carve chose one (see `carved_test_count`).
    assigned: bool = False


TestSource = Literal["archive", "carved", "none"]


@dataclass
class DatasetLayout:
    """What a dataset source holds: classes (sorted names), items, per-file problems and
    warnings."""

    root: Path
    classes: list[str]
    items: list[Item]
    errors: list[FileError] = field(default_factory=list)
    kind: LayoutKind = "imagefolder"
    # The carve share used for images the source gave no split (0 when every split was given).
    test_fraction: float = 0.0
    warnings: list[DataWarning] = field(default_factory=list)
    names: TreeNames | None = field(default=None, repr=False, compare=False)  # how paths are shown
    # how reports name the source when it is not `root` (objects fetched from an s3:// prefix)
    shown_as: str = ""

    @property
    def splits_given(self) -> bool:
        """Whether the source itself says which images are test (a test/val folder or a split
        column)."""
        return not any(item.assigned for item in self.items)

    @property
    def test_source(self) -> TestSource:
        """`archive` (the source's own test images), `carved` (a seeded share of train) or
        `none`."""
        tests = [item for item in self.items if item.split == "test"]
        if not tests:
            return "none"
        return "carved" if all(item.assigned for item in tests) else "archive"

    @property
    def test_split(self) -> dict[str, Any]:
        """Where the test split comes from, in the shape of the dataset resource's `test_split`."""
        return {"source": self.test_source, "splits_given": self.splits_given,
                "fraction": None if self.splits_given else self.test_fraction}

    @property
    def per_class(self) -> dict[str, dict[str, int]]:
        counts = {name: {"train": 0, "test": 0} for name in self.classes}
        for item in self.items:
            counts[self.classes[item.label]][item.split] += 1
        return counts

    @property
    def splits(self) -> dict[str, int]:
        totals = {"train": 0, "test": 0}
        for item in self.items:
            totals[item.split] += 1
        return totals

    def summary(self, max_errors: int | None = None) -> dict[str, Any]:
        """JSON-ready counts in the shape of the API's dataset resource."""
        errors = self.errors if max_errors is None else self.errors[:max_errors]
        return {
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "splits": self.splits,
            "per_class": self.per_class,
            "test_split": self.test_split,
            "errors": [e.as_dict() for e in errors],
            "warnings": [w.as_dict() for w in self.warnings],
        }

    def without(self, failed: Mapping[Path, str], record: bool = True) -> DatasetLayout:
        """Drop the given files (path -> reason) into `errors` (only when `record`: a caller may
        hold the reasons already), in place; classes left without training images are dropped too
        and labels renumbered. Raises DataError when too little remains."""
        if not failed:
            return self
        if record:
            self.errors.extend(FileError(relative_name(self.root, p, self.names), reason)
                               for p, reason in failed.items())
        kept = [item for item in self.items if item.path not in failed]
        self.classes, self.items = _drop_untrainable(self.root, self.classes, kept, self.errors, self.names)
        check_usable(self.classes, self.items, self.errors, self.kind)
        return self


def relative_name(root: Path, path: Path, names: TreeNames | None = None) -> str:
    """A path as shown to users: relative to the dataset root, never the server's absolute path, as
    NFC text (decoded by `names` for its tree; else non-UTF-8 parts in the percent-encoded form of
    `escape_name`)."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        parts = (Path(path).name,)
    if names is not None:
        return names.relative(parts)
    return "/".join(utf8_name(os.fsencode(p)) or escape_name(os.fsencode(p)) for p in parts)


def is_ignored_name(name: str) -> bool:
    """Operating-system clutter that is skipped without a report."""
    return name.startswith(".") or name == "__MACOSX" or name == "Thumbs.db" or name == "desktop.ini"


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not is_ignored_name(e.name)), key=lambda e: e.name)


def find_data_root(path: Path) -> Path:
    """Look through one wrapping folder: the only entry of `path` is a folder that is not itself a
    split folder and holds a manifest or no images directly (a lone class folder is not a
    wrapper)."""
    path = Path(path)
    if any((path / name).is_file() for name in MANIFEST_NAMES):
        return path
    entries = _visible_entries(path)
    if len(entries) != 1 or not entries[0].is_dir(follow_symlinks=False):
        return path
    inner = Path(entries[0].path)
    if entries[0].name.lower() in _SPLIT_DIR_NAMES:
        return path
    if any((inner / name).is_file() for name in MANIFEST_NAMES):
        return inner
    if any(e.is_file(follow_symlinks=False) and is_image_name(e.name) for e in _visible_entries(inner)):
        return path
    return inner


class _FileBudget:
    def __init__(self, limits: DataLimits) -> None:
        self.limits = limits
        self.count = 0

    def take(self) -> None:
        self.count += 1
        if self.count > self.limits.max_files:
            raise DataError("too_many_files", f"more than {self.limits.max_files} files in the dataset")


def _walk_images(
    folder: Path, root: Path, errors: list[FileError], budget: _FileBudget, names: TreeNames
) -> Iterator[Path]:
    """Image files under `folder`, depth first in name order; links and special files are
    reported."""
    stack = [folder]
    while stack:
        current = stack.pop()
        subdirs = []
        for entry in _visible_entries(current):
            path = Path(entry.path)
            if entry.is_symlink():
                errors.append(FileError(relative_name(root, path, names), "symbolic link not followed"))
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append(path)
            elif not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                errors.append(FileError(relative_name(root, path, names), "not a regular file"))
            elif not is_image_name(entry.name):
                budget.take()
                errors.append(FileError(relative_name(root, path, names), "skipped: not an image file"))
            else:
                budget.take()
                names.text(entry.name)  # so that the tree's warnings cover names that are not shown
                yield path
        stack.extend(reversed(subdirs))


def _class_folders(
    parent: Path, root: Path, errors: list[FileError], budget: _FileBudget, where: str, names: TreeNames
) -> dict[str, list[Path]]:
    """`{class name: image paths}` for the sub-folders of `parent`; loose files there are reported.
    Folders whose decoded names are equal (`Café` written NFC and NFD) are one class."""
    found: dict[str, list[Path]] = {}
    for entry in _visible_entries(parent):
        path = Path(entry.path)
        if entry.is_symlink():
            errors.append(FileError(relative_name(root, path, names), "symbolic link not followed"))
        elif entry.is_dir(follow_symlinks=False):
            images = list(_walk_images(path, root, errors, budget, names))
            if images:
                found.setdefault(names.text(entry.name), []).extend(images)
            else:
                errors.append(FileError(relative_name(root, path, names) + "/", "class folder has no images; ignored"))
        else:
            budget.take()
            reason = f"skipped: not inside a class folder of {where}"
            errors.append(FileError(relative_name(root, path, names), reason))
    return found


def carved_test_count(total: int, test_fraction: float) -> int:
    """How many of a class's `total` images without a given split become test at `test_fraction`.

    The one carving rule, used by the scanner, the upload summary and submit-time checks alike: a
    rounded share, at least one test image when the class has two or more, and always at least one
    training image.
    """
    if total < 2 or test_fraction <= 0:
        return 0
    return min(total - 1, max(1, int(total * test_fraction + 0.5)))


def _carve_test(paths: Sequence[Path], class_name: str, test_fraction: float, seed: int) -> set[Path]:
    """The seeded test share of one class (`carved_test_count` images). Seeded per class name, so
    adding a class leaves the other splits alone."""
    n_test = carved_test_count(len(paths), test_fraction)
    if n_test == 0:
        return set()
    ordered = sorted(paths, key=lambda p: p.as_posix())
    rng = random.Random(f"fd2-split/{seed}/{class_name}")
    return set(rng.sample(ordered, n_test))


def _drop_untrainable(
    root: Path, classes: list[str], items: list[Item], errors: list[FileError], names: TreeNames | None = None
) -> tuple[list[str], list[Item]]:
    trainable = {item.label for item in items if item.split == "train"}
    if len(trainable) == len(classes):
        return classes, items
    for label, name in enumerate(classes):
        if label not in trainable:
            errors.extend(FileError(relative_name(root, i.path, names), f"class {name!r} has no training images")
                          for i in items if i.label == label)
    kept_names = [name for label, name in enumerate(classes) if label in trainable]
    new_index = {old: new for new, old in enumerate(sorted(trainable))}
    kept = [Item(i.path, new_index[i.label], i.split, i.assigned) for i in items if i.label in trainable]
    return kept_names, kept


MANIFEST_FIXES: dict[str, str] = {
    "no_images": "list image files that exist, with paths relative to the manifest's folder and a label each",
    "one_class": "give the rows at least two different labels",
}


def check_usable(
    classes: Sequence[str], items: Sequence[Item], errors: Sequence[FileError] = (), kind: LayoutKind = "flat"
) -> None:
    """Raise UnusableDataError (a DataError whose message and details summarise `errors`, the
    skipped files) unless at least two classes have training images."""
    fixes = MANIFEST_FIXES if kind == "manifest" else {}
    if not items:
        raise UnusableDataError("no_images", "no usable images were found", errors, fix=fixes.get("no_images"))
    if len(classes) < 2:
        raise UnusableDataError("one_class", f"only one class ({classes[0]!r}) was found; at least two are needed",
                                errors, fix=fixes.get("one_class"), details={"classes": list(classes)})


def _assemble(
    root: Path,
    kind: LayoutKind,
    by_class: Mapping[str, Iterable[tuple[Path, Split | None]]],
    errors: list[FileError],
    *,
    test_fraction: float,
    seed: int,
    limits: DataLimits,
    class_order: Sequence[str] | None = None,
    tree: TreeNames | None = None,
) -> DatasetLayout:
    """Labels, carved splits (for images without one) and the final checks, shared by every
    layout."""
    names = list(class_order) if class_order is not None else sorted(by_class)
    if len(names) > limits.max_classes:
        raise DataError("too_many_classes", f"{len(names)} classes found; the limit is {limits.max_classes}")
    items: list[Item] = []
    for label, name in enumerate(names):
        entries = list(by_class[name])
        unsplit = [p for p, s in entries if s is None]
        test = _carve_test(unsplit, name, test_fraction, seed)
        for path, split in entries:
            items.append(Item(path, label, split or ("test" if path in test else "train"), split is None))
    classes, items = _drop_untrainable(root, names, items, errors, tree)
    check_usable(classes, items, errors, kind)
    warnings = tree.warnings if tree is not None else []
    return DatasetLayout(root=root, classes=classes, items=items, errors=errors, kind=kind, warnings=warnings,
                         names=tree, test_fraction=test_fraction)


def _scan_split_tree(
    root: Path, *, test_fraction: float, seed: int, limits: DataLimits
) -> DatasetLayout:
    errors: list[FileError] = []
    budget = _FileBudget(limits)
    names = _tree_names(root, limits)
    dirs: dict[str, Path] = {}
    for entry in _visible_entries(root):
        path = Path(entry.path)
        lowered = entry.name.lower()
        if entry.is_symlink():
            errors.append(FileError(relative_name(root, path, names), "symbolic link not followed"))
        elif entry.is_dir(follow_symlinks=False) and lowered in _SPLIT_DIR_NAMES and lowered not in dirs:
            dirs[lowered] = path
        elif entry.is_dir(follow_symlinks=False):
            errors.append(FileError(relative_name(root, path, names) + "/", "folder outside train/ and test/"))
        else:
            errors.append(FileError(relative_name(root, path, names), "file outside train/ and test/ ignored"))
    train = _class_folders(dirs["train"], root, errors, budget, "train/", names)
    by_class: dict[str, list[tuple[Path, Split | None]]] = defaultdict(list)
    for name, paths in train.items():
        by_class[name].extend((p, "train") for p in paths)
    test: dict[str, list[Path]] = {}
    chosen: Path | None = None
    for candidate in [dirs[name] for name in ("test", *sorted(VAL_DIR_NAMES)) if name in dirs]:
        shown = relative_name(root, candidate, names) + "/"
        if chosen is not None:
            errors.append(FileError(shown, f"ignored: {names.text(chosen.name)}/ is the test split"))
            continue
        found = _class_folders(candidate, root, errors, budget, f"{names.text(candidate.name)}/", names)
        for name, paths in found.items():
            if name in train:
                test[name] = paths
            else:
                errors.extend(FileError(relative_name(root, p, names), f"class {name!r} has no training images")
                              for p in paths)
        if test:
            chosen = candidate
        else:
            # An ImageNet-style flat val/ (images without class folders) carries no labels: it is no
            # test split, and the scanner, the upload summary and the loader all carve a seeded
            # share instead.
            errors.append(FileError(shown, "holds no class folders of the training classes, so it is not used "
                                    "as the test split"))
    if not test:
        by_class = defaultdict(list, {name: [(p, None) for p, _ in v] for name, v in by_class.items()})
    for name, paths in test.items():
        by_class[name].extend((p, "test") for p in paths)
    return _assemble(
        root, "imagefolder", by_class, errors, test_fraction=test_fraction, seed=seed, limits=limits, tree=names
    )


def _scan_flat(root: Path, *, test_fraction: float, seed: int, limits: DataLimits) -> DatasetLayout:
    errors: list[FileError] = []
    names = _tree_names(root, limits)
    found = _class_folders(root, root, errors, _FileBudget(limits), "the dataset root", names)
    by_class = {name: [(p, None) for p in paths] for name, paths in found.items()}
    return _assemble(root, "flat", by_class, errors, test_fraction=test_fraction, seed=seed, limits=limits,
                     tree=names)


def _tree_names(root: Path, limits: DataLimits) -> TreeNames:
    return TreeNames(root, max_entries=limits.max_files, ignore=is_ignored_name)


def read_manifest(path: Path, limits: DataLimits = DataLimits()) -> list[dict[str, Any]]:
    """Rows of a `manifest.json` (a list, or `{"items": [...]}`) or `manifest.csv`
    (`path,label[,split]`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("not_found", f"manifest {path.name} not found")
    if path.stat().st_size > limits.max_manifest_bytes:
        raise DataError("too_large", f"manifest {path.name} is larger than {limits.max_manifest_bytes} bytes")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, RecursionError) as exc:
            # bad UTF-8 or JSON, nesting too deep, a 5000-digit number
            raise DataError("bad_manifest", f"{path.name} is not valid JSON: {str(exc)[:200]}") from None
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            data = data["items"]
        if not isinstance(data, list):
            raise DataError("bad_manifest", f'{path.name} must be a list of rows or {{"items": [...]}}', fix="")
        rows = data
    elif suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = [h.strip().lower() for h in (reader.fieldnames or [])]
                if "path" not in header or "label" not in header:
                    raise DataError("bad_manifest", f"{path.name} needs a header row with path,label[,split]",
                                    fix="")
                reader.fieldnames = header
                rows = []
                for row in reader:
                    rows.append(row)
                    if len(rows) > limits.max_manifest_rows:
                        break
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError("bad_manifest", f"{path.name} is not a readable CSV file: {exc}") from None
    else:
        raise DataError("bad_manifest", f"{path.name}: a manifest is a .json or .csv file", fix="")
    if len(rows) > limits.max_manifest_rows:
        raise DataError("too_many_files", f"manifest has more than {limits.max_manifest_rows} rows")
    return rows


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) and abs(value) < 10**MAX_LABEL_CHARS:
        return str(value)
    if isinstance(value, str) and value.strip():
        return unicodedata.normalize("NFC", value.strip())  # one class however the label is spelled
    return None


def _label_problem(label: str) -> str | None:
    """Why a label cannot name a class (it becomes a folder and a CSV cell of the distilled
    artifact)."""
    if len(label) > MAX_LABEL_CHARS:
        return f"label is longer than {MAX_LABEL_CHARS} characters"
    if _CONTROL_CHARACTERS.search(label):
        return "label contains control characters"
    return None


def _is_integer_label(name: str) -> bool:
    digits = name[1:] if name.startswith("-") else name
    return digits.isascii() and digits.isdigit()


def _manifest_class_order(names: Iterable[str]) -> list[str]:
    """Sorted names; integer labels sort numerically so label `k` keeps index `k` when labels are
    0..K-1."""
    names = set(names)
    if names and all(_is_integer_label(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _resolve_member(root_resolved: Path, text: str) -> tuple[Path | None, str]:
    if _CONTROL_CHARACTERS.search(text):
        return None, "path contains control characters"
    if absolute_name(text):  # `/x`, `C:/x`, UNC; `B: benign/x.png` is relative, as in archives
        return None, ABSOLUTE_PATH_REASON
    try:
        candidate = (root_resolved / text.replace("\\", "/")).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long for the system
        return None, "path cannot be resolved"
    if candidate != root_resolved and root_resolved not in candidate.parents:
        return None, ESCAPING_PATH_REASON
    return candidate, ""


def _is_regular_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def scan_manifest_items(
    root: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    limits: DataLimits = DataLimits(),
) -> DatasetLayout:
    """Layout from manifest rows `{path, label, split?}` relative to `root` (files are checked to
    exist).

    Rows that escape `root` (absolute, `..`, or a link pointing outside), miss their file, name no
    image or carry an unknown split are recorded in `errors`. Without any split column a test share
    is carved.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("not_found", "manifest root folder not found", fix="check the manifest's root folder")
    if len(rows) > limits.max_manifest_rows:
        raise DataError("too_many_files", f"manifest has more than {limits.max_manifest_rows} rows")
    root_resolved = root.resolve()
    errors: list[FileError] = []
    any_split = any(_clean(row.get("split")) for row in rows if isinstance(row, Mapping))
    by_class: dict[str, list[tuple[Path, Split | None]]] = defaultdict(list)
    seen: set[Path] = set()
    for index, row in enumerate(rows):
        where = f"row {index + 1}"
        if not isinstance(row, Mapping):
            errors.append(FileError(where, "row is not an object with path and label"))
            continue
        text = row.get("path")
        if not isinstance(text, str) or not text.strip():
            errors.append(FileError(where, "row has no path"))
            continue
        text = text.strip()
        label = _label_text(row.get("label"))
        if label is None:
            errors.append(FileError(text, "row has no label"))
            continue
        label_problem = _label_problem(label)
        if label_problem is not None:
            errors.append(FileError(text, label_problem))
            continue
        split_text = _clean(row.get("split"))
        if split_text and split_text not in _SPLIT_ALIASES:
            errors.append(FileError(text, f"unknown split {split_text!r} (use train, test or val)"))
            continue
        path, reason = _resolve_member(root_resolved, text)
        if path is None:
            errors.append(FileError(text, reason))
        elif not is_image_name(path.name):
            errors.append(FileError(text, "skipped: not an image file"))
        elif not _is_regular_file(path):
            errors.append(FileError(text, "file not found"))
        elif path in seen:
            errors.append(FileError(text, "listed twice; the first row is used"))
        else:
            seen.add(path)
            default: Split | None = "train" if any_split else None
            split = _SPLIT_ALIASES[split_text] if split_text else default
            by_class[label].append((path, split))
    layout = _assemble(
        root_resolved, "manifest", by_class, errors, test_fraction=test_fraction, seed=seed, limits=limits,
        class_order=_manifest_class_order(by_class),
    )
    return layout


def _clean(value: Any) -> str:
    return value.strip().lower() if isinstance(value, str) else ""


def scan_manifest(
    manifest: Path,
    *,
    root: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    limits: DataLimits = DataLimits(),
) -> DatasetLayout:
    """Layout from a manifest file; its paths are relative to `root` (default: the manifest's
    folder)."""
    manifest = Path(manifest)
    rows = read_manifest(manifest, limits)
    base = root if root is not None else manifest.parent
    return scan_manifest_items(base, rows, test_fraction=test_fraction, seed=seed, limits=limits)


def scan_source(
    path: str | Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    limits: DataLimits = DataLimits(),
) -> DatasetLayout:
    """Discover the layout of a folder (ImageFolder, flat classes, or a manifest inside) or a
    manifest file.

    Raises DataError: `not_found`, `bad_source` (an archive or other file: extract archives first),
    `no_images`, `one_class`, `too_many_files`, `too_many_classes`, `bad_manifest`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    path = Path(path)
    if not path.exists():
        raise DataError("not_found", f"dataset source {path.name!r} not found")
    if path.is_file():
        if path.suffix.lower() in (".json", ".csv"):
            return scan_manifest(path, test_fraction=test_fraction, seed=seed, limits=limits)
        raise DataError("bad_source", f"{path.name} is a file: expected a folder or a manifest .json/.csv",
                        fix="extract an archive first, or give its folder")
    root = find_data_root(path)
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return scan_manifest(root / name, test_fraction=test_fraction, seed=seed, limits=limits)
    if any(e.is_dir(follow_symlinks=False) and e.name.lower() == "train" for e in _visible_entries(root)):
        return _scan_split_tree(root, test_fraction=test_fraction, seed=seed, limits=limits)
    return _scan_flat(root, test_fraction=test_fraction, seed=seed, limits=limits)


def validate_images(
    layout: DatasetLayout,
    limits: DataLimits = DataLimits(),
    verify: bool = True,
    workers: int | None = None,
    digests: dict[Path, str] | None = None,
) -> DatasetLayout:
    """Open every image (header only, or fully decoded when `verify`), in a thread pool, and move
    broken ones from `items` to `errors`. Updates `layout` in place and returns it; raises DataError
    when fewer than two classes with training images remain. Given `digests`, each image is decoded
    in full at its own resolution instead and its `pixel_digest` stored there by path (the same
    decode checks and fingerprints)."""
    workers = workers or min(8, os.cpu_count() or 1)

    def problem(item: Item) -> str | None:
        try:
            if digests is None:
                check_image(item.path, limits.max_image_pixels, full=verify)
            else:
                digests[item.path] = image_digest(item.path, limits.max_image_pixels)
        except ImageDecodeError as exc:
            return exc.reason
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(problem, layout.items))
    pairs = zip(layout.items, reasons, strict=True)
    failed = {item.path: reason for item, reason in pairs if reason is not None}
    return layout.without(failed)
