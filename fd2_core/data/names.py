"""File names in another encoding: archive members and folders on disk come out as NFC text
(torch-free).

A name is bytes: zip members without the UTF-8 flag, tar headers and Linux folder names carry no
encoding.
- Bytes that are valid UTF-8 are UTF-8, whatever a zip's flag says (macOS Finder writes UTF-8
  without it).
- The other names of one archive or folder tree were written in one legacy code page (a Windows zip,
  a latin-1 tar): it is detected once from all of them together, since more text gives a better
  guess, by charset-normalizer among `CODE_PAGES`, and the guess is reported as a `names_code_page`
  warning.
- A name that still cannot be decoded keeps its bytes in a reversible ASCII form, reported as
  `names_undecodable`: every byte outside printable ASCII, and `%` itself, is written `%XX`
  (upper-case hex), so `urllib.parse.unquote_to_bytes(name)` gives the original bytes back
  (`unescape_name`).
Every name is normalised to NFC, so a class spelled NFC and NFD is one class (docs/INTERFACES.md,
datasets). Names the service writes go through one rule too (`fit_name`, `distinct_name`): a path
component is at most `MAX_NAME_BYTES` of UTF-8, cut at a character boundary, since file systems and
`tar` refuse longer ones.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from itertools import count
from urllib.parse import unquote_to_bytes

from charset_normalizer import from_bytes

from fd2_core.data.errors import DataWarning

# Code pages that archivers and file systems wrote names in. Short names often fit several pages
# equally well (cp1250 and cp1252 both read "Café"); among such ties the earlier page here wins:
# Western, Cyrillic, other single-byte pages, then multi-byte East Asian ones. latin-1 and
# ISO 8859-1/15 are covered by cp1252.
CODE_PAGES: tuple[str, ...] = (
    "cp1252", "cp437", "cp850", "cp1251", "cp866", "koi8_r", "koi8_u", "iso8859_5", "cp855",
    "cp1250", "cp852", "iso8859_2", "cp1253", "cp737", "cp869", "cp1254", "cp857", "cp1255", "cp862",
    "cp1256", "cp720", "cp1257", "cp775", "cp874", "cp1258", "cp932", "euc_jp", "gb18030", "cp949", "big5",
)
# charset-normalizer's own margins within which two guesses are equally good (its CharsetMatch
# ordering).
_CHAOS_TIE, _COHERENCE_TIE = 0.005, 0.02
# distinct name parts fed to the detector; more adds time, not certainty
MAX_DETECTION_BYTES = 64 * 1024
MAX_EXAMPLES = 5
MAX_EXAMPLE_CHARS = 200  # a member name may be 64 KiB long; a warning stays small
_PRINTABLE_ASCII = frozenset(range(0x20, 0x7F)) - {ord("%")}
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
# NAME_MAX of ext4, XFS, btrfs and tmpfs: the bytes one path component may have (`tar xf` fails past
# it).
MAX_NAME_BYTES = 255
# A letter and a colon then a separator, or nothing: a drive on Windows. `B: benign` is a relative
# name.
_DRIVE_ABSOLUTE = re.compile(r"[A-Za-z]:(?:[/\\]|$)")


def escape_name(raw: bytes) -> str:
    """The reversible ASCII form of undecodable name bytes: `%XX` for every byte outside printable
    ASCII and for `%` itself (`caf\\xe9 100%` → `caf%E9 100%25`)."""
    return "".join(chr(b) if b in _PRINTABLE_ASCII else f"%{b:02X}" for b in raw)


def unescape_name(name: str) -> bytes:
    """The original bytes of a name kept in the reversible form (the inverse of `escape_name`)."""
    return unquote_to_bytes(name)


def utf8_name(raw: bytes) -> str | None:
    """`raw` as NFC text when it is valid UTF-8, else None."""
    try:
        return unicodedata.normalize("NFC", raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def absolute_name(name: str) -> bool:
    """Whether a member or manifest path would leave its folder on some system: rooted (`/x`, `\\x`,
    UNC `\\\\host\\share`, `//host/share`) or drive-absolute (`C:/x`, `C:\\x`, a bare `C:`). A
    letter and a colon followed by anything else (`B: benign/x.png`) is a relative name: medical
    class names often look so."""
    return name.startswith(("/", "\\")) or _DRIVE_ABSOLUTE.match(name) is not None


def fit_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """`name` cut to at most `limit` bytes of UTF-8 at a character boundary; unchanged when it
    fits."""
    data = name.encode("utf-8")
    if len(data) <= limit:
        return name
    # "ignore" drops only the split last character
    return data[:max(limit, 0)].decode("utf-8", "ignore")


def distinct_name(name: str, taken: Collection[str], *, ending: str = "", limit: int = MAX_NAME_BYTES,
                  suffixes: Iterable[str] | None = None, key: Callable[[str], str] = str) -> str:
    """The one cutting rule: `name` + `ending` in at most `limit` bytes, `name` cut (`fit_name`),
    and when `key` of that is in `taken` (two long names that are equal once cut), the first of
    `suffixes` (default `~1`, `~2`, …) that makes it free, put before `ending`; suffix and ending
    count in the budget."""
    candidates = (f"~{n}" for n in count(1)) if suffixes is None else suffixes
    size = len(ending.encode("utf-8"))
    fitted = fit_name(name, limit - size) + ending
    if key(fitted) not in taken:
        return fitted
    for suffix in candidates:
        room = limit - size - len(suffix.encode("utf-8"))
        if room <= 0:
            break
        fitted = fit_name(name, room) + suffix + ending
        if key(fitted) not in taken:
            return fitted
    raise ValueError(f"no free name for {name[:40]!r}… within {limit} bytes")


def _detection_text(raws: Iterable[bytes]) -> bytes:
    """Distinct non-ASCII parts of the names, joined by spaces (line breaks between many short lines
    read as mess to the detector): shared folders and ASCII file names add nothing."""
    parts: dict[bytes, None] = {}
    size = 0
    for raw in raws:
        for part in raw.split(b"/"):
            # A control byte makes the detector give up on everything; such a name is escaped
            # anyway.
            if part and not part.isascii() and part not in parts and not _CONTROL_BYTES.search(part):
                parts[part] = None
                size += len(part) + 1
                if size >= MAX_DETECTION_BYTES:
                    return b" ".join(parts)
    return b" ".join(parts)


def detect_code_page(raws: Iterable[bytes]) -> str | None:
    """The code page of legacy-encoded names, guessed by charset-normalizer from all of them, or
    None.

    The guess is a guess: short names fit several pages equally well (same mess and coherence
    scores); among those `CODE_PAGES` order decides, rather than the library's preference for
    multi-byte readings, which turns a few Cyrillic words into Japanese.
    """
    text = _detection_text(raws)
    if not text:
        return None
    matches = list(from_bytes(text, cp_isolation=list(CODE_PAGES)))
    if not matches:
        return None
    best = matches[0]
    tied = {
        enc for m in matches
        if abs(m.chaos - best.chaos) < _CHAOS_TIE and abs(m.coherence - best.coherence) <= _COHERENCE_TIE
        for enc in (m.encoding, *m.could_be_from_charset)
    }
    return next((enc for enc in CODE_PAGES if enc in tied), None)


def _decode(raw: bytes, encoding: str | None) -> str | None:
    if encoding is None:
        return None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        return None
    return None if _CONTROL_CHARACTERS.search(text) else unicodedata.normalize("NFC", text)


def _short(text: str) -> str:
    """`text` cut in the middle when too long, so both the folder and the file name stay
    readable."""
    if len(text) <= MAX_EXAMPLE_CHARS:
        return text
    half = (MAX_EXAMPLE_CHARS - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


@dataclass
class NameDecoding:
    """Text of every name of one archive or folder tree, and the warnings that say how it was
    obtained."""

    names: dict[bytes, str] = field(default_factory=dict)
    encoding: str | None = None
    warnings: list[DataWarning] = field(default_factory=list)

    def text(self, raw: bytes) -> str:
        """The decoded text of `raw` (one of the decoded names, or any valid UTF-8 name)."""
        found = self.names.get(raw)
        if found is not None:
            return found
        return utf8_name(raw) or escape_name(raw)


def decode_names(raws: Iterable[bytes], what: str = "archive member names",
                 remedy: str = "re-create the archive with UTF-8 names") -> NameDecoding:
    """Decode a whole set of names at once (see the module text); `what` names them in warning
    messages and `remedy` says how to get UTF-8 names where they come from (an archive, a folder on
    disk)."""
    decoding = NameDecoding()
    legacy: list[bytes] = []
    for raw in dict.fromkeys(raws):
        text = utf8_name(raw)
        if text is None:
            legacy.append(raw)
        else:
            decoding.names[raw] = text
    if not legacy:
        return decoding
    encoding = detect_code_page(legacy)
    decoded: list[tuple[bytes, str]] = []
    escaped: list[str] = []
    for raw in legacy:
        text = _decode(raw, encoding)
        if text is None:
            escaped.append(escape_name(raw))
            decoding.names[raw] = escaped[-1]
        else:
            decoded.append((raw, text))
            decoding.names[raw] = text
    if decoded:
        decoding.encoding = encoding
        examples = [{"bytes": _short(escape_name(raw)), "name": _short(text)} for raw, text in decoded[:MAX_EXAMPLES]]
        decoding.warnings.append(DataWarning(
            "names_code_page",
            f"{len(decoded)} {what} are not UTF-8; they were decoded as {encoding}, a code page guessed from the "
            f"names themselves: check the class names, or {remedy}",
            {"encoding": encoding, "count": len(decoded), "examples": examples},
        ))
    if escaped:
        decoding.warnings.append(DataWarning(
            "names_undecodable",
            f"{len(escaped)} {what} could not be decoded; they are kept with each byte outside printable ASCII "
            "(and % itself) written %XX, from which urllib.parse.unquote_to_bytes gives the original bytes back: "
            "rename them as UTF-8 text to get readable class names",
            {"form": "percent-encoded bytes", "count": len(escaped),
             "examples": [_short(name) for name in escaped[:MAX_EXAMPLES]]},
        ))
    return decoding


class TreeNames:
    """Display names for the entries of one folder tree on disk, decided for the whole tree.

    Python gives undecodable bytes of a name on disk as surrogate escapes; `os.fsencode` turns the
    name back into its bytes. UTF-8 names need nothing else; the first name that is not UTF-8 makes
    the tree's other non-UTF-8 names be collected (one walk that skips what `ignore` says and stops
    after `max_entries`), so one code page is detected for all.
    """

    def __init__(self, root: str | os.PathLike[str], max_entries: int = 200_000,
                 ignore: Callable[[str], bool] = lambda name: False) -> None:
        self.root = os.fspath(root)
        self.max_entries = max_entries
        self.ignore = ignore
        self._decoding: NameDecoding | None = None

    def text(self, name: str) -> str:
        """The NFC text of one name (a single path component) as listed by the operating system."""
        if name.isascii():
            return name
        raw = os.fsencode(name)
        return utf8_name(raw) or self._tree_decoding().text(raw)

    def relative(self, parts: Iterable[str]) -> str:
        """A relative path for people: each component decoded, joined with `/`."""
        return "/".join(self.text(part) for part in parts)

    @property
    def warnings(self) -> list[DataWarning]:
        return list(self._decoding.warnings) if self._decoding is not None else []

    def _tree_decoding(self) -> NameDecoding:
        if self._decoding is None:
            self._decoding = decode_names(self._legacy_names(), "file and folder names",
                                          "rename the files and folders to UTF-8 names")
        return self._decoding

    def _legacy_names(self) -> list[bytes]:
        found: list[bytes] = []
        seen = 0
        for _folder, dirs, files in os.walk(os.fsencode(self.root)):
            dirs[:] = [d for d in dirs if not self.ignore(os.fsdecode(d))]
            for raw in (*dirs, *files):
                if utf8_name(raw) is None and not self.ignore(os.fsdecode(raw)):
                    found.append(raw)
            seen += len(dirs) + len(files)
            if seen > self.max_entries:
                break
        return found


# `.png`, `.jpeg`: kept whole when a long file name is cut, so it stays an image
MAX_KEPT_EXTENSION_BYTES = 16


def _split_extension(part: str) -> tuple[str, str]:
    stem, dot, ext = part.rpartition(".")
    if dot and stem and len((dot + ext).encode("utf-8")) <= MAX_KEPT_EXTENSION_BYTES:
        return stem, dot + ext
    return part, ""


class ShortNames:
    """Names on disk for a tree of decoded paths (the members of one archive), by the one cutting
    rule.

    A component over `MAX_NAME_BYTES` is cut (`distinct_name`, its extension kept) and made distinct
    from its siblings; every other component stays as it is and keeps its place, so a long name
    never takes a short one's. The same component under the same folder always gets the same name.
    """

    def __init__(self, paths: Iterable[tuple[tuple[str, ...], bool]]) -> None:
        """`paths`: (components, whether the last one is a folder), in archive order."""
        listed = list(paths)
        taken: dict[tuple[str, ...], set[str]] = {}
        for parts, _is_dir in listed:
            for k, part in enumerate(parts):
                if len(part.encode("utf-8")) <= MAX_NAME_BYTES:
                    taken.setdefault(parts[:k], set()).add(part)
        self._table: dict[tuple[tuple[str, ...], str], str] = {}
        # original paths of shortened folders, in order
        self._folders: dict[tuple[str, ...], None] = {}
        for parts, is_dir in listed:
            for k, part in enumerate(parts):
                key = (parts[:k], part)
                if key not in self._table and len(part.encode("utf-8")) > MAX_NAME_BYTES:
                    stem, ext = _split_extension(part)
                    siblings = taken.setdefault(parts[:k], set())
                    self._table[key] = distinct_name(stem, siblings, ending=ext)
                    siblings.add(self._table[key])
                if key in self._table and (k < len(parts) - 1 or is_dir):
                    self._folders[parts[:k + 1]] = None

    def on_disk(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """The components written for the decoded path `parts`."""
        return tuple(self._table.get((parts[:k], part), part) for k, part in enumerate(parts))

    @property
    def warnings(self) -> list[DataWarning]:
        """`names_shortened` when a folder was cut: its name (often a class name) is not the one
        sent. A cut file name is not reported: nothing but the file's own path shows it."""
        if not self._folders:
            return []
        examples = [{"name": _short("/".join(parts)), "shortened": _short("/".join(self.on_disk(parts)))}
                    for parts in list(self._folders)[:MAX_EXAMPLES]]
        return [DataWarning(
            "names_shortened",
            f"{len(self._folders)} folder names are longer than {MAX_NAME_BYTES} bytes, more than a file system "
            "allows; they were cut at a character boundary (with ~N where two became equal), and classes are "
            "named by the shortened folders: give the folders shorter names to keep the names you chose",
            {"limit_bytes": MAX_NAME_BYTES, "count": len(self._folders), "examples": examples},
        )]
