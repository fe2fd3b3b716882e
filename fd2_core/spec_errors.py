"""Spec errors in words: what a person should change when pydantic refuses a spec.

The CLI and the API both answer a refused spec with these words, so the two say the same thing.
Torch-free, like the schema whose errors it words.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .spec import JobSpec


def describe_spec_error(error: Mapping[str, Any]) -> str:
    """One pydantic error of a spec in words that say what to change.

    An unknown field gets the closest known names (`unknown field (did you mean 'ipc'?)`).
    A rule of the spec loses pydantic's `Value error, ` prefix.
    """
    if error.get("type") == "extra_forbidden":
        loc = error.get("loc") or ("",)
        close = difflib.get_close_matches(str(loc[-1]), sorted(JobSpec.model_fields), n=2)
        return "unknown field" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else "")
    return str(error.get("msg", "")).removeprefix("Value error, ")


__all__ = ["describe_spec_error"]
