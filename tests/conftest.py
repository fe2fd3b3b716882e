"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

# The client SDK is a distribution of its own (clients/python); the tests use this checkout's copy of it, also
# where the environment has one installed from elsewhere.
CLIENT_SOURCE = Path(__file__).resolve().parents[1] / "clients" / "python"
sys.path.insert(0, str(CLIENT_SOURCE))


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
