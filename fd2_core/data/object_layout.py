"""The layout of a dataset under an `s3://` prefix, found by the one layout scanner without
downloading an image.

The scanner (`fd2_core.data.layout.scan_source`) decides classes, splits, the carved test share and
every skipped file from names alone (decoding is a later, separate step). So a listing is laid out
as a *skeleton*: one empty file per listed object, at the object's key below the prefix, in a
temporary folder, scanned as an upload's folder is. Admission (the API, before a job is accepted)
and the worker (which then downloads the admitted objects into the same shape) run the very same
code, so the counts at admission are the counts the job sees. The listing is bounded by the
operator's `max_files`; a key that cannot be a file name here (`..` segments, a leading `/`, a
name longer than the file system allows) is reported as a skipped file with its reason.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import FileError
from .layout import MANIFEST_NAMES, DatasetLayout, scan_source
from .limits import DataLimits
from .object_store import ObjectStore, StoredObject
from .object_uris import ObjectUri

MAX_NAME_BYTES = 255


@dataclass
class ObjectLayout:
    """The scanned layout with each item's object: `objects[i]` is the object of `layout.items[i]`
    (its key, size and ETag as admitted). Item paths are the keys below the prefix, relative
    (`layout.root` is `.`): the skeleton they were scanned in is gone."""

    prefix: ObjectUri
    layout: DatasetLayout
    objects: list[StoredObject]

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


def _relative_key(prefix: ObjectUri, key: str) -> str | None:
    """The key below the prefix as a relative POSIX path, or None when it cannot be one."""
    relative = key[len(prefix.key):]
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in relative.split("/")):
        return None
    if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts) or "\x00" in relative:
        return None
    return relative


def lay_out_objects(
    prefix: ObjectUri, objects: list[StoredObject], *, test_fraction: float, seed: int, limits: DataLimits
) -> ObjectLayout:
    """The layout of `objects` (listed under `prefix`) by the layout scanner, on a skeleton tree.

    Raises DataError as `scan_source` does (`no_images`, `one_class`, `too_many_files`, …).
    """
    unusable: list[FileError] = []
    with tempfile.TemporaryDirectory(prefix="fd2-listing-") as folder:
        root = Path(folder) / "data"
        root.mkdir()
        by_path: dict[Path, StoredObject] = {}
        for item in objects:
            relative = _relative_key(prefix, item.key)
            if relative is None:
                unusable.append(FileError(item.key, "the object's key cannot be a file name (an empty, '.' or '..' "
                                                    "segment, or a name over 255 bytes); rename it"))
                continue
            if "/" not in relative and relative.lower() in (*MANIFEST_NAMES, "manifest.jsonl"):
                unusable.append(FileError(item.key, "a manifest object is read only when the job names it "
                                                    f"(dataset.uri s3://{prefix.bucket}/{item.key}); ignored"))
                continue
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            by_path[path.resolve()] = item
        layout = scan_source(root, test_fraction=test_fraction, seed=seed, limits=limits)
        chosen = [by_path[item.path.resolve()] for item in layout.items]
        data_root = layout.root
        layout.items = [dataclasses.replace(item, path=item.path.relative_to(data_root)) for item in layout.items]
    layout.root = Path(".")
    layout.errors = unusable + layout.errors
    return ObjectLayout(prefix, layout, chosen)


def scan_object_prefix(
    store: ObjectStore, prefix: ObjectUri, *, test_fraction: float, seed: int, limits: DataLimits
) -> ObjectLayout:
    """List `prefix` (at most `limits.max_files` objects; StoreError `too_many_objects` past it) and lay
    it out. Raises StoreError for the store's refusals and DataError for an unusable layout."""
    listed = store.list(prefix if prefix.is_prefix else ObjectUri(prefix.bucket, prefix.key + "/"),
                        limit=limits.max_files)
    return lay_out_objects(prefix if prefix.is_prefix else ObjectUri(prefix.bucket, prefix.key + "/"), listed,
                           test_fraction=test_fraction, seed=seed, limits=limits)


@dataclass
class RowProblem:
    row: int
    uri: str
    reason: str


def scan_object_rows(
    store: ObjectStore, rows: list[dict[str, str]], *, test_fraction: float, seed: int, limits: DataLimits,
    workers: int = 16,
) -> tuple[ObjectLayout, list[RowProblem]]:
    """The layout of an inline manifest of object URIs (`{"uri", "label", "split"?}` rows, each URI
    already parsed and allowed): every object's size and ETag read with a HEAD request (bounded
    concurrency; no object is downloaded), then the rows laid out by `scan_manifest_items` on a
    skeleton `<bucket>/<key>`. Returns the layout and the rows that cannot be used (missing objects
    and what the scanner refused), for the caller to refuse the job with; raises StoreError for a
    store-wide refusal (no such bucket, access denied)."""
    from concurrent.futures import ThreadPoolExecutor

    from .layout import scan_manifest_items
    from .object_store import StoreError
    from .object_uris import parse_object_uri

    if len(rows) > limits.max_manifest_rows:
        raise StoreError("too_many_objects", f"the manifest lists more than {limits.max_manifest_rows} objects, the "
                         "operator's limit; split the job", {"limit": limits.max_manifest_rows})
    uris = [parse_object_uri(row["uri"]) for row in rows]
    problems: list[RowProblem] = []

    def head(index: int) -> StoredObject | None:
        try:
            return store.head(uris[index])
        except StoreError as exc:
            if exc.code != "no_such_key":
                raise
            problems.append(RowProblem(index + 1, str(uris[index]), "object not found"))
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        heads = list(pool.map(head, range(len(rows))))
    with tempfile.TemporaryDirectory(prefix="fd2-manifest-") as folder:
        root = Path(folder)
        items, by_path = [], {}
        for row, uri, found in zip(rows, uris, heads, strict=True):
            if found is None:
                continue
            relative = f"{uri.bucket}/{uri.key}"
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            by_path[path.resolve()] = found
            items.append({"path": relative, "label": row["label"], **({"split": row["split"]} if row.get("split")
                                                                        else {})})
        layout = scan_manifest_items(root, items, test_fraction=test_fraction, seed=seed, limits=limits)
        chosen = [by_path[item.path.resolve()] for item in layout.items]
        layout.items = [dataclasses.replace(item, path=item.path.relative_to(root.resolve())) for item in layout.items]
    layout.root = Path(".")
    problems += [RowProblem(0, f"s3://{error.path}", error.reason) for error in layout.errors]
    common = ObjectUri(uris[0].bucket, "") if uris else ObjectUri("unknown", "")
    return ObjectLayout(common, layout, chosen), problems
