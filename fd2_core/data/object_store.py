"""Reading datasets from an S3-compatible object store: listing a prefix within a bound, reading one
object as admitted (its ETag), and the store's answers as errors that say their cause.

The client is boto3: the standard, well-kept S3 client, whose credential and endpoint chain (the
`AWS_*` variables including `AWS_ENDPOINT_URL`, an instance or pod role, the config files) is exactly
what operators already configure, and whose `standard` retry mode retries throttling and transient
errors with backoff. Importing it costs about 0.1 s, so it is imported only when a store is first
used: the API starts without it. The endpoint and credentials come from the operator (the chain, or
`FD2_S3_ENDPOINT_URL`), never from a spec, so a spec cannot make the service call another host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, BinaryIO

from .object_uris import ObjectUri

MAX_ATTEMPTS = 5  # boto3's standard retry mode: exponential backoff with jitter
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
LIST_PAGE = 1000  # S3's largest page


class StoreError(Exception):
    """What the store answered, as `code` (no_such_bucket, access_denied, no_such_key, object_changed,
    too_many_objects, store_unreachable, store_error) and a message naming the reference and the fix."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


@dataclass(frozen=True)
class StoredObject:
    """One listed object: its key, size in bytes and ETag (quotes removed); `bucket` when it is not
    the bucket of the listing it came with (rows of a manifest of object URIs)."""

    key: str
    size: int
    etag: str
    bucket: str = ""


_CODES = {
    "NoSuchBucket": ("no_such_bucket", "bucket {bucket!r} does not exist at the store; check the reference"),
    "AccessDenied": ("access_denied", "the store's policy denies the service access to {uri}; ask the bucket's "
                     "owner to allow the service's credentials"),
    "403": ("access_denied", "the store's policy denies the service access to {uri}; ask the bucket's owner to "
            "allow the service's credentials"),
    "NoSuchKey": ("no_such_key", "{uri} does not exist at the store"),
    "404": ("no_such_key", "{uri} does not exist at the store"),
    "PreconditionFailed": ("object_changed", "{uri} changed at the store since the job was admitted (another "
                           "ETag); submit the job again to use the new object"),
    "412": ("object_changed", "{uri} changed at the store since the job was admitted (another ETag); submit the "
            "job again to use the new object"),
}


def _etag(value: str) -> str:
    return value.strip('"')


class ObjectStore:
    """One S3 endpoint: `endpoint_url` overrides the standard chain's (`FD2_S3_ENDPOINT_URL`); None
    leaves it to the chain."""

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url or None

    @cached_property
    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def _error(self, exc: Exception, uri: ObjectUri) -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, EndpointConnectionError):
            return StoreError("store_unreachable", "the object store does not answer; try again later, or ask the "
                              "operator to check the service's store endpoint")
        if isinstance(exc, NoCredentialsError):
            return StoreError("store_error", "the service has no credentials for the object store; the operator "
                              "sets them (AWS_* variables, a role or the config file)")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CODES:
                name, text = _CODES[code]
                return StoreError(name, text.format(bucket=uri.bucket, uri=uri), {"uri": str(uri)})
            return StoreError("store_error", f"the object store refused {uri} ({code or 'no code'}); try again or "
                              "check the reference", {"uri": str(uri), "store_code": code})
        raise exc

    def _pages(self, prefix: ObjectUri) -> Iterator[list[dict[str, Any]]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key,
                                       PaginationConfig={"PageSize": LIST_PAGE}):
            yield page.get("Contents", [])

    def list(self, prefix: ObjectUri, limit: int) -> list[StoredObject]:
        """Every object under `prefix`, in key order; stops reading after `limit` + 1 objects and raises
        StoreError `too_many_objects`, so the cost of a listing is bounded by `limit`. Raises StoreError
        for the store's refusals."""
        found: list[StoredObject] = []
        try:
            for page in self._pages(prefix):
                for item in page:
                    if item["Key"].endswith("/") and item.get("Size", 0) == 0:
                        continue  # a folder marker, not an object
                    found.append(StoredObject(item["Key"], int(item["Size"]), _etag(item["ETag"])))
                    if len(found) > limit:
                        raise StoreError("too_many_objects", f"{prefix} holds more than {limit} objects, the "
                                         "operator's limit; point at a smaller prefix or a manifest",
                                         {"uri": str(prefix), "limit": limit})
        except StoreError:
            raise
        except Exception as exc:  # botocore's errors, mapped; anything else re-raised
            raise self._error(exc, prefix) from None
        return found

    def read(self, uri: ObjectUri, etag: str | None = None) -> bytes:
        """The object's bytes; with `etag`, only if it is still that version (StoreError
        `object_changed` otherwise)."""
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        try:
            answer = self.client.get_object(Bucket=uri.bucket, Key=uri.key, **extra)
            return answer["Body"].read()
        except Exception as exc:
            raise self._error(exc, uri) from None

    def download(self, uri: ObjectUri, etag: str, out: BinaryIO, chunk_bytes: int = 1 << 20) -> int:
        """Stream the object, only if it is still version `etag`, into `out` chunk by chunk; returns
        the bytes written. Raises StoreError (`object_changed` for another version)."""
        try:
            body = self.client.get_object(Bucket=uri.bucket, Key=uri.key, IfMatch=f'"{etag}"')["Body"]
            written = 0
            for chunk in body.iter_chunks(chunk_bytes):
                out.write(chunk)
                written += len(chunk)
            return written
        except Exception as exc:
            raise self._error(exc, uri) from None

    def head(self, uri: ObjectUri) -> StoredObject:
        """Size and ETag of one object (StoreError `no_such_key` when absent)."""
        try:
            answer = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:
            raise self._error(exc, uri) from None
        return StoredObject(uri.key, int(answer["ContentLength"]), _etag(answer["ETag"]), uri.bucket)
