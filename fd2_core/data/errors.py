"""Errors of the data layer: one for a whole input that cannot be used, one for a single skipped file, and
warnings about input that was used anyway.

`DataError.code` is stable snake_case so the API can put it in its JSON error body; the message is one line
for a person. A `FileError` is not raised: it is recorded beside the data so an upload answers with every
problem at once instead of failing on the first bad image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATA_ERROR_CODES: frozenset[str] = frozenset(
    {
        "no_images",
        "one_class",
        "bad_archive",
        "path_escape",
        "too_large",
        "too_many_files",
        "too_many_classes",
        "bad_manifest",
        "not_found",
        "bad_source",
        # raised by the pipeline when a spec cannot run on a dataset or a work folder
        "ipc_too_large",
        "no_test_split",
        "workdir_conflict",
        "bad_teacher_weights",
        "teacher_classes_mismatch",
    }
)


class DataError(ValueError):
    """The input as a whole cannot be used; `code` names why (e.g. `no_images`, `bad_archive`)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in DATA_ERROR_CODES:
            raise ValueError(f"unknown data error code {code!r}")
        super().__init__(" ".join(message.split()))
        self.code = code
        self.message = str(self)

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class FileError:
    """One file (or archive member) that was skipped, with the reason in words."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class ImageDecodeError(Exception):
    """A single image could not be turned into pixels; `reason` is short enough for a per-file error list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DataWarning:
    """A finding that did not stop the input being used, e.g. names decoded from a guessed code page.

    `code` is stable snake_case (`names_code_page`, `names_undecodable`), `message` one line for a person,
    `details` JSON values that back it (the guessed encoding, examples).
    """

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}
