"""Celery worker side of the service: turns a queued job id into a pipeline run.

Depends on `fd2_core` (the ML), `store` (persistence, job state changes) and `fd2_config`; never on `api`.
Tasks carry job ids only.
"""
