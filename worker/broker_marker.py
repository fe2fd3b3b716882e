"""Notice when the Redis broker has lost its messages, so that queued jobs are sent again.

A Redis without persistence comes back empty after a restart (so does one that was flushed, or a replica
promoted before it had the data): every message waiting in a queue is gone while the database still says
`queued`, and Redis does not tell its clients. So the workers keep a marker key in the broker's database. It
lives as long as Redis keeps its data and vanishes with everything else; a recovery pass that finds it
missing sends every queued job again and then sets it (`worker.recovery`). Re-sending is safe because a
duplicate message is skipped by the job claim (`store.job_states`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fd2_config.settings import Settings

if TYPE_CHECKING:
    import redis

MARKER_KEY = "fd2:broker-marker"
REDIS_TIMEOUT_S = 5.0


class BrokerMarker:
    """The marker key in the Redis database that holds the job queues."""

    def __init__(self, broker_url: str) -> None:
        import redis

        self._client: redis.Redis = redis.Redis.from_url(
            broker_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )

    def missing(self) -> bool:
        """True when Redis lost its data since the marker was set (or it was never set); raises
        `redis.RedisError` while Redis is unreachable."""
        return not self._client.exists(MARKER_KEY)

    def set(self, holder: str) -> None:
        """Record that every queued job has a message now; `holder` names the worker that made sure."""
        self._client.set(MARKER_KEY, holder)

    def close(self) -> None:
        self._client.close()


def marker_for(settings: Settings) -> BrokerMarker | None:
    """A marker for a Redis broker; None for the embedded broker, which re-sends queued jobs at start-up."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return BrokerMarker(settings.broker_url)
    return None
