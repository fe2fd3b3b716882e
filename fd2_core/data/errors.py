"""Errors of the data layer: one for a whole input that cannot be used, one for a single skipped file, and
warnings about input that was used anyway.

`DataError.code` is stable snake_case so the API can put it in its JSON error body; the message is one line
for a person that says the cause and the fix, and `details` carries the context (for too little usable data:
the most common reasons files were skipped, with counts and an example path each). A `FileError` is not
raised: it is recorded beside the data so an upload answers with every problem at once instead of failing on
the first bad image.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
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
        "bad_workdir",
    }
)


# What to do about each kind of refusal, added to a message that does not name its own fix, so that every
# refusal says both why and what to change.
DEFAULT_FIXES: dict[str, str] = {
    "no_images": "put readable images (JPEG, PNG, WebP or BMP) in one folder per class: <class>/<image> "
    "(or train/<class>/<image> with test/<class>/<image>)",
    "one_class": "put each class's images in its own folder, <class>/<image>, with at least two classes",
    "bad_archive": "re-create the archive as .zip, .tar or .tar.gz and send it again",
    "path_escape": "re-create the archive with paths relative to its top folder (no absolute paths, no '..')",
    "too_large": "use a smaller dataset (fewer or smaller files)",
    "too_many_files": "use fewer files (leave out what is not an image, or split the dataset)",
    "too_many_classes": "use fewer classes (split the dataset)",
    "bad_manifest": "give a manifest.json (a list of {path, label[, split]} rows) or a manifest.csv with a "
    "path,label[,split] header",
    "not_found": "check the path",
    "bad_source": "give a folder, a .zip/.tar/.tar.gz archive, a manifest .json/.csv, or fgsynth[:k=v,...]",
    "bad_teacher_weights": "give a .safetensors file or a torch state dict made for the same backbone, e.g. an "
    "earlier run's artifacts/teacher.safetensors, or set teacher_weights_mode=backbone for a feature extractor",
    "teacher_classes_mismatch": "use weights trained on the same classes, or set teacher_weights_mode=backbone to "
    "take only the feature extractor",
    "ipc_too_large": "lower ipc or add images to the smallest class",
    "no_test_split": "set evaluate=false, or add test images (a test/ folder of class folders, or manifest rows "
    "with split=test; a manifest without a split column has a test share carved)",
    "workdir_conflict": "choose another work folder, or repeat the earlier run's spec to resume it",
    "bad_workdir": "choose a work folder that can be created and written",
}


class DataError(ValueError):
    """The input as a whole cannot be used; `code` names why (e.g. `no_images`, `bad_archive`).

    The message is the cause followed by `fix` (default: `DEFAULT_FIXES[code]`; pass `fix=""` when the cause
    already says what to do). `details` is JSON-ready context for an API body, or None.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *,
                 fix: str | None = None) -> None:
        if code not in DATA_ERROR_CODES:
            raise ValueError(f"unknown data error code {code!r}")
        cause = " ".join(message.split())
        fix = DEFAULT_FIXES.get(code, "") if fix is None else " ".join(fix.split())
        super().__init__(f"{cause}; {fix}" if fix and not cause.endswith(fix) else cause)
        self.code = code
        self.message = str(self)
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


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


MAX_SKIP_REASONS = 3
MAX_EXAMPLE_CHARS = 200
_QUOTED = re.compile(r"""\s*('[^']*'|"[^"]*")""")
_TRAILING_PARENTHESIS = re.compile(r"\s*\([^)]*\)$")


def skip_reason_kind(reason: str) -> str:
    """A skip reason without its per-file part (a decoder's message, a class name), so that files skipped
    for the same cause are counted together: `cannot decode image: …` → `cannot decode image`."""
    text = reason.removeprefix("skipped: ").split(": ", 1)[0]
    text = _TRAILING_PARENTHESIS.sub("", _QUOTED.sub("", text)).strip()
    return text or reason


def _example(path: str) -> str:
    if len(path) <= MAX_EXAMPLE_CHARS:
        return path
    half = (MAX_EXAMPLE_CHARS - 1) // 2
    return f"{path[:half]}…{path[-half:]}"


def summarize_skipped(errors: Sequence[FileError], top: int = MAX_SKIP_REASONS) -> dict[str, Any]:
    """Why files were skipped, most common cause first: `{"skipped_files": n, "top_reasons": [{"reason",
    "count", "example"}, …]}` with at most `top` causes and one example path each."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for error in errors:
        kind = skip_reason_kind(error.reason)
        counts[kind] += 1
        examples.setdefault(kind, error.path)
    return {
        "skipped_files": len(errors),
        "top_reasons": [
            {"reason": kind, "count": count, "example": _example(examples[kind])}
            for kind, count in counts.most_common(top)
        ],
    }


def describe_skipped(summary: dict[str, Any]) -> str:
    """The summary as words for a one-line message: `skipped 40 files: 38 not inside a class folder of the
    dataset root (e.g. 'IMG_1.jpg'), 2 …`; empty when nothing was skipped."""
    if not summary["skipped_files"]:
        return ""
    parts = [f"{r['count']} {r['reason']} (e.g. {r['example']!r})" for r in summary["top_reasons"]]
    shown = sum(r["count"] for r in summary["top_reasons"])
    if summary["skipped_files"] > shown:
        parts.append(f"{summary['skipped_files'] - shown} for other reasons")
    noun = "file" if summary["skipped_files"] == 1 else "files"
    return f"skipped {summary['skipped_files']} {noun}: " + ", ".join(parts)


class UnusableDataError(DataError):
    """Too little usable data is left (`no_images`, `one_class`): the message and `details` say which files
    were skipped and why, since the cause usually lies there (e.g. images not inside class folders)."""

    def __init__(self, code: str, cause: str, skipped: Sequence[FileError] = (), *, fix: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        self.cause, self.skipped, self.extra = cause, tuple(skipped), dict(details or {})
        self.fix_text = fix
        summary = summarize_skipped(self.skipped)
        said = describe_skipped(summary)
        super().__init__(code, f"{cause}; {said}" if said else cause, {**self.extra, **summary}, fix=fix)

    def with_skipped(self, earlier: Sequence[FileError]) -> UnusableDataError:
        """The same error counting files skipped before the scan too (e.g. by archive extraction)."""
        if not earlier:
            return self
        return UnusableDataError(self.code, self.cause, [*earlier, *self.skipped], fix=self.fix_text,
                                 details=self.extra)
