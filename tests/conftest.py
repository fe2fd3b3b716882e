"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """Write a small solid-colour image file (format from the suffix) and return its path."""

    def write(path: Path, color: tuple[int, ...] | int = (200, 30, 30), size: tuple[int, int] = (12, 10),
              mode: str = "RGB") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color).save(path)
        return path

    return write
