"""Undo what one command wrote under its output path when the command is refused part-way.

Checks come before writes wherever they can (`fd2_core.pipeline.run`), but some refusals can only be found
after writing began. Then the command removes what it wrote itself, and never what an earlier run left in the
same place: a path that did not exist is removed whole (with the parent folders this command created for
it); in an existing folder only the entries that appeared since the snapshot are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class OutputRollback:
    """Snapshot of `out` taken before a command writes to it; `undo()` restores that state by deletion.

    Files that existed before and were rewritten in place are kept as they are now (the pipeline only
    rewrites a file with the same content, e.g. `spec.json` of a resumed run)."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.created = self._first_missing(self.out)
        self.before: set[str] = self._entries(self.out) if self.created is None and self.out.is_dir() else set()

    @staticmethod
    def _first_missing(out: Path) -> Path | None:
        """The outermost folder on the way to `out` (or `out` itself) that does not exist yet."""
        missing = None
        absolute = out.absolute()
        for path in (absolute, *absolute.parents):
            if os.path.lexists(path):
                break
            missing = path
        return missing

    @staticmethod
    def _entries(folder: Path) -> set[str]:
        found: set[str] = set()
        for current, dirs, files in os.walk(folder):
            rel = Path(current).relative_to(folder)
            found.update((rel / name).as_posix() for name in (*dirs, *files))
        return found

    def undo(self) -> None:
        """Remove what appeared since the snapshot; a no-op when nothing did."""
        if self.created is not None:
            _remove(self.created)
            return
        if not self.out.is_dir():
            return
        new = sorted(self._entries(self.out) - self.before)
        for rel in new:
            parent = Path(rel).parent.as_posix()
            if parent == "." or parent in self.before:  # the top of a new subtree
                _remove(self.out / rel)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)
