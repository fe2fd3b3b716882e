"""Jobs over data already on the workers' storage: a root under an operator-allowed folder and listed rows.

Unlike an upload, where unusable files are skipped and listed in the dataset's `errors`, a job has no place
to report skipped rows; so any unusable row refuses the job with 422 and every problem in `details`.
Rows pointing outside the root (absolute, `..`, or a link leading out) answer `path_escape`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api.dataset_intake import data_limits
from api.errors import ApiError
from api.schemas import Manifest
from api.storage_errors import storage_errors
from fd2_config.settings import Settings
from fd2_core.data.errors import DataError
from fd2_core.data.layout import PATH_ESCAPE_REASONS, DatasetLayout, scan_manifest_items
from store.folders import discard_file
from store.jobs import job_workdir

MANIFEST_FILE = "manifest.json"
MAX_REPORTED_ROWS = 100
ROOT_FIELD = "dataset.manifest.root"


def root_not_allowed(message: str) -> ApiError:
    return ApiError(422, "data_root_not_allowed", message, {"field": ROOT_FIELD})


def allowed_manifest_root(settings: Settings, root_text: str) -> Path:
    """The resolved root when it lies under one of the operator's `allowed_data_roots`, else 422."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in root_text):
        raise root_not_allowed("manifest root must not contain control characters; give the folder's plain path")
    root = Path(root_text).expanduser()
    if not root.is_absolute():
        raise root_not_allowed(f"manifest root {root_text[:200]!r} is not an absolute path; give it from / on")
    try:
        resolved = root.resolve()
    except (OSError, RuntimeError, ValueError):
        raise root_not_allowed("manifest root cannot be resolved; give an existing folder's absolute path") from None
    if not settings.allowed_data_roots:
        raise root_not_allowed("this service allows no data roots, so jobs cannot read a manifest's files; upload "
                               "the data as an archive (POST /v1/datasets) and submit the job with its id")
    for allowed in settings.allowed_data_roots:
        if resolved == allowed or allowed in resolved.parents:
            return resolved
    raise root_not_allowed("manifest root is not under an operator-allowed data root; use a folder under one of "
                           "the roots the operator allowed (FD2_ALLOWED_DATA_ROOTS), or upload the data instead")


def refuse_unusable_rows(layout: DatasetLayout) -> None:
    if not layout.errors:
        return
    problems = [e.as_dict() for e in layout.errors]
    escaping = any(e.reason in PATH_ESCAPE_REASONS for e in layout.errors)
    code = "path_escape" if escaping else "bad_manifest"
    first = problems[0]
    raise ApiError(
        422, code, f"{len(problems)} manifest row(s) cannot be used; first: {first['path']!r}: {first['reason']}; "
        "fix or remove those rows (each is listed in details.rows)",
        {"field": "dataset.manifest.items", "rows": problems[:MAX_REPORTED_ROWS], "count": len(problems)},
    )


def scan_manifest(settings: Settings, manifest: Manifest, test_fraction: float,
                  seed: int) -> tuple[Path, list[dict[str, Any]], DatasetLayout]:
    """Resolve and check a job's manifest now (root allowed, every row usable); returns root, rows, layout."""
    root = allowed_manifest_root(settings, manifest.root)
    rows = [item.model_dump(exclude_none=True) for item in manifest.items]
    try:
        layout = scan_manifest_items(root, rows, test_fraction=test_fraction, seed=seed, limits=data_limits(settings))
    except DataError as exc:
        raise ApiError(422, exc.code, exc.message, {"field": "dataset.manifest", **(exc.details or {})}) from None
    refuse_unusable_rows(layout)
    return root, rows, layout


def write_job_file(settings: Settings, job_id: str, name: str, document: dict[str, Any]) -> Path:
    """`<job workdir>/<name>` = `document` as JSON, written whole or not at all.

    A disk that cannot take it answers 503 `insufficient_storage` with the partial file and the
    folder removed (what the disk refuses to remove is the storage sweep's: no row owns it)."""
    path = job_workdir(settings, job_id) / name
    partial = path.with_suffix(".partial")
    with storage_errors(settings):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(document))
            partial.replace(path)
        except BaseException:
            discard_file(partial)
            remove_manifest(path)
            raise
    return path


def write_manifest(settings: Settings, job_id: str, root: Path, rows: list[dict[str, Any]]) -> Path:
    """`<job workdir>/manifest.json` = {"root", "items"}: the worker reads rows relative to `root`
    (`write_job_file`'s 503 on a full disk)."""
    return write_job_file(settings, job_id, MANIFEST_FILE, {"root": str(root), "items": rows})


def remove_manifest(path: Path | None) -> None:
    """Quietly: it runs while another answer is being given."""
    if path is None:
        return
    discard_file(path)
    try:
        path.parent.rmdir()
    except OSError:
        pass
