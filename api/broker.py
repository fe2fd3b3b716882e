"""Sending jobs to the workers: a Celery client that knows tasks only by name.

The API never imports `worker` (the import rules of docs/ARCHITECTURE.md); it publishes `fd2.run_job(job_id)`
through the one send path (`fd2_config.celery_config.send_run_job`), with the task id equal to the job id, so a
revoke names the job directly.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import TYPE_CHECKING

from fd2_config.celery_config import celery_config, send_run_job
from fd2_config.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("fd2.api")


class JobBroker:
    """Publish, revoke and health-check against the configured broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def celery(self) -> Celery:
        # Imported on first use: Celery is a large import and most API processes start before any job.
        from celery import Celery

        app = Celery("fd2-api", set_as_current=False)
        app.conf.update(celery_config(self.settings))
        return app

    def send_job(self, job_id: str, queue: str) -> None:
        """Enqueue the job (blocking; raises when the broker cannot take it)."""
        send_run_job(self.celery, job_id, queue)

    def revoke(self, job_id: str) -> None:
        """Ask workers to drop the job's message; best effort, the database flag is what workers obey."""
        try:
            self.celery.control.revoke(job_id)
        except Exception:  # cancellation already succeeded in the database
            logger.warning("revoke of %s could not be broadcast", job_id, exc_info=True)

    def ping(self) -> None:
        """Raise unless the broker accepts a connection right now."""
        if self.settings.uses_embedded_broker:
            queue_dir = self.settings.broker_dir / "queue"
            if not (queue_dir.is_dir() and os.access(queue_dir, os.W_OK)):
                raise RuntimeError(f"broker folder {queue_dir} is not writable")
            return
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=self.settings.readiness_timeout_s)
            client = getattr(connection.default_channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()

    def close(self) -> None:
        if "celery" in self.__dict__:
            self.celery.close()
