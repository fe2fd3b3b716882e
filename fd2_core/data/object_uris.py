"""`s3://bucket/key` references to datasets in an S3-compatible object store, and the operator's
allow-list they are checked against.

Torch-free and store-free: the API parses and checks a reference before any call to the store, so a
reference outside the tenant's allow-list is refused without revealing whether the bucket exists.

A key is compared as text, as S3 does (a key has no path semantics). So that an allowed prefix means
the same to every S3-compatible server, keys with empty, `.` or `..` segments, backslashes or
control characters are refused rather than interpreted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "s3://"
# S3's bucket naming rules: 3–63 lowercase letters, digits, dots and hyphens, starting and ending
# with a letter or digit, not an IP address
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 length


class ObjectUriError(ValueError):
    """A reference that is not a usable `s3://bucket/key`; the message says what to write instead."""


@dataclass(frozen=True)
class ObjectUri:
    """An object (`key` names it) or a prefix (`key` empty or ending with `/`) in `bucket`."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def within(self, allowed: ObjectUri) -> bool:
        """Whether this object or prefix lies under `allowed`: the same bucket, and the key starts with
        the allowed prefix (an allowed key without a trailing `/` allows only itself and what lies
        under `key/`)."""
        if self.bucket != allowed.bucket:
            return False
        if allowed.is_prefix:
            return self.key.startswith(allowed.key)
        return self.key == allowed.key or self.key.startswith(allowed.key + "/")

    def child(self, name: str) -> ObjectUri:
        """The object `name` under this prefix."""
        return ObjectUri(self.bucket, self.key + name)


def parse_object_uri(text: str) -> ObjectUri:
    """`s3://bucket[/key]` → ObjectUri. Raises ObjectUriError naming the problem (another scheme, a
    bucket name S3 would refuse, a key S3 or the allow-list could read two ways)."""
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise ObjectUriError(f"{text!r} is not an s3:// reference; write s3://<bucket>/<prefix or key>")
    bucket, _, key = text[len(SCHEME):].partition("/")
    if not _BUCKET.match(bucket) or _IP_ADDRESS.match(bucket) or ".." in bucket:
        raise ObjectUriError(f"{bucket!r} is not a valid bucket name (3–63 lowercase letters, digits, dots and "
                             "hyphens, starting and ending with a letter or digit)")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ObjectUriError(f"the key is longer than S3's {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or c in "\\\x7f" for c in key):
        raise ObjectUriError("the key holds a control character or a backslash; name the object as the store "
                             "lists it")
    segments = key.split("/")
    inner = segments[:-1] if key.endswith("/") else segments
    if key and any(part in ("", ".", "..") for part in inner):
        raise ObjectUriError(f"the key {key!r} has an empty, '.' or '..' segment, which S3-compatible servers read "
                             "differently; write the key without it")
    return ObjectUri(bucket, key)


def allowed_by(uri: ObjectUri, allow_list: list[ObjectUri]) -> bool:
    """Whether `uri` lies under some entry of `allow_list` (an empty list allows nothing)."""
    return any(uri.within(entry) for entry in allow_list)
