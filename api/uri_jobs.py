"""Jobs on data already in an S3-compatible object store: `{"dataset": {"uri": "s3://bucket/prefix/"}}`
(or `…/manifest.csv|.jsonl`, a manifest object), and inline manifests of object URIs.

Checked before the job is accepted, in this order: the reference is parsed (422 `invalid_uri`), then
matched against the tenant's grants (403 `uri_not_allowed`, before any call to the store, so nothing
about the bucket is revealed), then the prefix is listed within the operator's `max_files` and laid
out by the one layout scanner without downloading an object (`fd2_core.data.object_layout`); what the
store answers is a 422 with its cause (`no_such_bucket`, `access_denied`, `too_many_objects`, …).
The admitted objects (key, size, ETag, relative path) are written to the job's `objects.json`, which
the worker fetches by (`worker.source_check`): an object changed since admission is reported there,
never mixed in.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.dataset_intake import data_limits
from api.errors import ApiError
from api.manifest_jobs import MAX_REPORTED_ROWS, write_job_file
from api.schemas import Manifest
from fd2_config.settings import Settings
from fd2_core.data.errors import DataError
from fd2_core.data.object_layout import ObjectLayout, scan_object_prefix, scan_object_rows
from fd2_core.data.object_store import ObjectStore, StoreError
from fd2_core.data.object_uris import ObjectUri, ObjectUriError, allowed_by, parse_object_uri
from store.data_uris import tenant_grants

OBJECTS_FILE = "objects.json"
MANIFEST_SUFFIXES = (".csv", ".jsonl")
FIELD = "dataset.uri"
STORE_STATUS = {"store_unreachable": 503}  # the store's other refusals are the reference's: 422


def scan_uri(session: Session, settings: Settings, tenant_id: str, text: str, test_fraction: float,
             seed: int) -> ObjectLayout:
    """The admitted layout of the objects under `text`, or the ApiError that refuses it."""
    try:
        uri = parse_object_uri(text)
    except ObjectUriError as exc:
        raise ApiError(422, "invalid_uri", str(exc), {"field": FIELD}) from None
    if not allowed_by(uri, [parse_object_uri(text) for text in tenant_grants(session, tenant_id)]):
        raise ApiError(403, "uri_not_allowed", f"{uri} is not among the buckets and prefixes this tenant may read; "
                       "ask the operator to grant it (`fd2 uris allow <tenant> s3://…`)", {"field": FIELD})
    if uri.key.lower().endswith(MANIFEST_SUFFIXES):
        manifest = read_manifest_object(settings, uri)
        return scan_uri_manifest(session, settings, tenant_id, manifest, test_fraction, seed)
    try:
        return scan_object_prefix(ObjectStore(settings.s3_endpoint_url), uri, test_fraction=test_fraction, seed=seed,
                                  limits=data_limits(settings))
    except StoreError as exc:
        raise ApiError(STORE_STATUS.get(exc.code, 422), exc.code, exc.message, {"field": FIELD, **exc.details}) \
            from None
    except DataError as exc:
        raise ApiError(422, exc.code, exc.message, {"field": FIELD, **(exc.details or {})}) from None


def read_manifest_object(settings: Settings, uri: ObjectUri) -> Manifest:
    """A manifest object (`.csv` with a header `uri|path,label[,split]`, or `.jsonl` of such objects)
    as an inline manifest of object URIs; a `path` is relative to the manifest's folder. Refused with
    422 when it is larger than the operator's manifest limit, or not such a manifest."""
    limits = data_limits(settings)
    store = ObjectStore(settings.s3_endpoint_url)
    try:
        head = store.head(uri)
        if head.size > limits.max_manifest_bytes:
            raise ApiError(422, "too_large", f"{uri} is larger than the manifest limit "
                           f"({limits.max_manifest_bytes} bytes); split it", {"field": FIELD})
        text = store.read(uri, head.etag).decode("utf-8-sig")
    except StoreError as exc:
        raise ApiError(STORE_STATUS.get(exc.code, 422), exc.code, exc.message, {"field": FIELD, **exc.details}) \
            from None
    except UnicodeDecodeError:
        raise ApiError(422, "bad_manifest", f"{uri} is not UTF-8 text", {"field": FIELD}) from None
    folder = uri.key.rsplit("/", 1)[0] + "/" if "/" in uri.key else ""
    try:
        if uri.key.lower().endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        items = []
        for row in rows:
            target = row.get("uri") or (f"s3://{uri.bucket}/{folder}{row['path']}" if row.get("path") else None)
            items.append({"uri": target, "label": row.get("label"), **({"split": row["split"]} if row.get("split")
                                                                          else {})})
        return Manifest.model_validate({"items": items})
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise ApiError(422, "bad_manifest", f"{uri} is not a manifest of rows uri (or path), label[, split]: "
                       f"{str(exc).splitlines()[0][:200]}", {"field": FIELD}) from None


def scan_uri_manifest(session: Session, settings: Settings, tenant_id: str, manifest: Manifest,
                      test_fraction: float, seed: int) -> ObjectLayout:
    """The admitted layout of an inline manifest of object URIs: every URI parsed (422 `invalid_uri`
    naming the row) and inside the tenant's grants (403 `uri_not_allowed`, before any call to the
    store), each object's size and ETag read (no download); any row that cannot be used refuses the
    job with 422 `bad_manifest` listing them, as a manifest of files does."""
    field = "dataset.manifest.items"
    grants = [parse_object_uri(text) for text in tenant_grants(session, tenant_id)]
    rows = []
    for index, item in enumerate(manifest.items):
        try:
            uri = parse_object_uri(item.uri or "")
        except ObjectUriError as exc:
            raise ApiError(422, "invalid_uri", f"row {index + 1}: {exc}", {"field": field, "row": index + 1}) \
                from None
        if not allowed_by(uri, grants):
            raise ApiError(403, "uri_not_allowed", f"row {index + 1}: {uri} is not among the buckets and prefixes "
                           "this tenant may read; ask the operator to grant it (`fd2 uris allow <tenant> s3://…`)",
                           {"field": field, "row": index + 1})
        rows.append({"uri": str(uri), "label": str(item.label), **({"split": item.split} if item.split else {})})
    try:
        admitted, problems = scan_object_rows(ObjectStore(settings.s3_endpoint_url), rows,
                                              test_fraction=test_fraction, seed=seed, limits=data_limits(settings))
    except StoreError as exc:
        raise ApiError(STORE_STATUS.get(exc.code, 422), exc.code, exc.message, {"field": field, **exc.details}) \
            from None
    except DataError as exc:
        raise ApiError(422, exc.code, exc.message, {"field": field, **(exc.details or {})}) from None
    if problems:
        listed = [{"row": p.row, "uri": p.uri, "reason": p.reason} for p in problems[:MAX_REPORTED_ROWS]]
        first = problems[0]
        raise ApiError(422, "bad_manifest", f"{len(problems)} manifest row(s) cannot be used; first: {first.uri}: "
                       f"{first.reason}; fix or remove those rows (each is listed in details.rows)",
                       {"field": field, "rows": listed, "count": len(problems)})
    return admitted


def write_objects(settings: Settings, job_id: str, admitted: ObjectLayout) -> Path:
    """`<job workdir>/objects.json`: the prefix and every admitted object (key, size, ETag and its path
    below the prefix; a manifest's label and split too). A disk that cannot take it answers 503
    `insufficient_storage`, nothing left (`write_job_file`)."""
    manifest = admitted.layout.kind == "manifest"
    classes = admitted.layout.classes
    items = [{"key": o.key, "size": o.size, "etag": o.etag, "path": item.path.as_posix(),
              **({"bucket": o.bucket} if o.bucket else {}),
              # a manifest's labels and splits are its rows', not folder names: the worker lays the
              # fetched files out by them
              **({"label": classes[item.label], "split": item.split} if manifest else {})}
             for o, item in zip(admitted.objects, admitted.layout.items, strict=True)]
    return write_job_file(settings, job_id, OBJECTS_FILE, {
        "uri": str(admitted.prefix), "bucket": admitted.prefix.bucket, "kind": "manifest" if manifest else "prefix",
        "items": items})
