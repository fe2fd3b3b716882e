"""The API key and a URL's userinfo as secrets: cleaned and checked once, never shown in any text.

A key pasted from a file (`$(cat key)`) often ends in a newline, and a key a header cannot carry
used to fail deep inside httpx with the whole key in the error. Here surrounding whitespace is
stripped, the rest is checked up front, and a message about a key names the problem, never the key.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# A key this long (the service's are 50+ characters) never occurs by chance: masked anywhere;
# a shorter one (a test's "k") only where it stands alone ("broker" keeps its "k").
MASKED_ANYWHERE_CHARS = 16
KEY_HINT = "the operator makes one with `fd2 keys create <tenant>`"
# Any userinfo after an optional scheme, up to the last '@' before the path (as urlsplit reads it).
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@")


def clean_api_key(key: object) -> str:
    """`key` without surrounding whitespace; ValueError naming the problem (never the key) for an
    empty key or one with inner whitespace, control or non-ASCII characters (a key is one word of
    printable ASCII, all a bearer header can carry)."""
    if key is None:
        key = ""
    if not isinstance(key, str):
        raise TypeError(f"the API key must be a str, not {type(key).__name__}")
    text = key.strip()
    if not text:
        raise ValueError(f"the API key is empty ({KEY_HINT})")
    for position, char in enumerate(text, 1):
        if not "!" <= char <= "~":
            raise ValueError(f"the API key has {_kind(char)} at character {position} (a key is one word of "
                             "printable ASCII): give the key alone, exactly as `fd2 keys create` printed it")
    return text


def _kind(char: str) -> str:
    """What is wrong with a character of a key, in words that do not show it (it is of the key)."""
    if char in "\r\n":
        return "a line break"
    if char in " \t":
        return "whitespace"
    if ord(char) > 0x7F:
        return "a non-ASCII character"
    return "a control character"


class ApiKey:
    """A checked API key (see `clean_api_key`) whose repr and str never show it.

    `authorization()` is the one place it is spelled out; `redact` masks it in text quoting it."""

    __slots__ = ("_pattern", "_value")

    def __init__(self, key: object) -> None:
        self._value = clean_api_key(key)
        quoted = re.escape(self._value)
        alone = len(self._value) < MASKED_ANYWHERE_CHARS
        self._pattern = re.compile(rf"(?<![\w-]){quoted}(?![\w-])" if alone else quoted)

    def __repr__(self) -> str:
        return f"ApiKey('{MASK}')"

    __str__ = __repr__

    def authorization(self) -> str:
        """The `Authorization` header's value."""
        return f"Bearer {self._value}"

    def redact(self, text: str) -> str:
        return self._pattern.sub(MASK, text)

    def redact_json(self, value: Any) -> Any:
        """`value` (an error answer's JSON `details`) with the key masked in every string in it."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_json(item) for item in value]
        if isinstance(value, dict):
            return {self.redact(str(k)): self.redact_json(v) for k, v in value.items()}
        return value


def without_userinfo(url: str) -> str:
    """`url` as it may be shown: a `user:password@` becomes `***@` (also without a scheme)."""
    return _USERINFO.sub(lambda match: f"{match['scheme'] or ''}{MASK}@", url, count=1)
