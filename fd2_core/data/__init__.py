"""Data layer: dataset sources to decoded tensors.

This package import stays torch-free on purpose (the API imports `layout` and `archive` to validate uploads);
the torch part lives in `fd2_core.data.dataset` and is imported only where tensors are needed.
"""

from fd2_core.data.errors import DataError, FileError, ImageDecodeError
from fd2_core.data.limits import DataLimits

__all__ = ["DataError", "DataLimits", "FileError", "ImageDecodeError"]
