"""The Celery rules both sides of the queue share, as data, and the one way to send the run task.

The API (which sends tasks by name and never imports the worker) and the worker (which runs them) build their
Celery apps from `celery_config(settings)`, so routing, serialisation and acknowledgement cannot drift apart:
- JSON only, both ways; task arguments are job ids, never objects.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only after the job reached a
  final state, so a crashed worker's job is delivered again (Redis: after the visibility timeout; the
  embedded folder broker loses unacknowledged messages on SIGKILL, which the workers' recovery pass makes up
  for).
- `worker_prefetch_multiplier=1`: a worker holds one job at a time, so a queued job never waits behind another
  job on a busy worker while an idle one could take it.
- Queues `fd2.gpu` and `fd2.cpu` (`fd2_config.queues`).
Building the configuration creates nothing; the embedded broker's folders are made by `Settings.ensure_dirs`
when the API or a worker starts. Neither Celery nor kombu is imported until a configuration is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fd2_config.queues import CPU_QUEUE, GPU_QUEUE, RUN_JOB_TASK, RUN_SHARD_TASK
from fd2_config.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

EMBEDDED_BROKER_TRANSPORT = "fd2_config.fs_broker:Transport"
# Publishing a job message: a broker that is briefly away gets two more tries within about a second; past
# that the sender hears of it (the API answers 503, a recovery pass tries again in its next round).
SEND_RETRY_POLICY: dict[str, float] = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for both sides of the queue (keys of `Celery.conf`); see the module docstring."""
    from kombu import Queue

    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": (Queue(GPU_QUEUE, routing_key=GPU_QUEUE), Queue(CPU_QUEUE, routing_key=CPU_QUEUE)),
        "task_default_queue": settings.default_queue,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.default_queue}},
        "timezone": "UTC",
        "enable_utc": True,
    }
    if settings.uses_embedded_broker:
        config["broker_transport"] = EMBEDDED_BROKER_TRANSPORT
    return config


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Where the folder broker keeps its files, or Redis's redelivery and connect timeouts."""
    if settings.uses_embedded_broker:
        folder = settings.broker_dir
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "claimed"),
        }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": settings.broker_visibility_timeout_s, "socket_connect_timeout": 5}
    return {}


def send_run_job(app: Celery, job_id: str, queue: str) -> None:
    """Publish `fd2.run_job(job_id)` to `queue`, the task id being the job id so a revoke names the job.

    The one send path of the service (API submission and worker recovery). Blocking; raises the broker's
    error when the message could not be published within `SEND_RETRY_POLICY`.
    """
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, task_id=job_id, retry=True,
                  retry_policy=SEND_RETRY_POLICY)


def send_run_shard(app: Celery, job_id: str, shard_id: str, queue: str) -> None:
    """Publish `fd2.run_shard(job_id, shard_id)` to the job's `queue` (docs/ARCHITECTURE.md, "One job on many
    workers"); blocking, raising like `send_run_job`. A duplicate is harmless: the claim skips it."""
    app.send_task(RUN_SHARD_TASK, args=[job_id, shard_id], queue=queue, retry=True,
                  retry_policy=SEND_RETRY_POLICY)
