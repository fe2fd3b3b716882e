"""Thin route modules: each function reads like a sentence; the work lives in `api.*` and `store.*`."""
