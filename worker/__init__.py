"""Celery worker side of the service: turns a queued job id into a pipeline run.

Depends on `fd2_core` (the ML) and `store` (persistence); never on `api`. Tasks carry job ids only.
"""
