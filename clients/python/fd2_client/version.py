"""The SDK's version, sent in the `User-Agent` header (keep in step with pyproject.toml)."""

__version__ = "0.1.0"
