"""Prometheus metrics: request counts and latency per route template, job
and queue gauges from the database.

Request metrics are recorded by a plain ASGI middleware (cheap enough for the hot path); job gauges
are read from the database at scrape time, so they are right whichever API process is scraped.
Each app has its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fd2_config.settings import Settings
from store.db import session_scope
from store.jobs import count_jobs_by_status, oldest_queued_at, queue_depths
from store.models import JobStatus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class JobGauges(Collector):
    """Jobs by status, queue depth (queued jobs per queue) and the age of the oldest queued job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with session_scope(self.settings) as session:
            by_status = count_jobs_by_status(session)
            depth = queue_depths(session)
            oldest = oldest_queued_at(session)
        jobs = GaugeMetricFamily("fd2_jobs", "Jobs by status.", labels=["status"])
        for status in map(str, JobStatus):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        queue = GaugeMetricFamily("fd2_queue_depth", "Queued jobs waiting for a worker.", labels=["queue"])
        for name in sorted({"fd2.gpu", "fd2.cpu", *depth}):
            queue.add_metric([name], depth.get(name, 0))
        yield queue
        age = 0.0
        if oldest is not None:
            age = max(0.0, (datetime.now(timezone.utc) - oldest).total_seconds())
        yield GaugeMetricFamily("fd2_oldest_queued_job_age_seconds", "Age of the oldest queued job.", value=age)


class ApiMetrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fd2_http_requests", "HTTP requests by route template and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "fd2_http_request_duration_seconds", "HTTP request latency by route template.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(JobGauges(settings))


class MetricsMiddleware:
    """Times each HTTP request and labels it with the matched route's
    template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
