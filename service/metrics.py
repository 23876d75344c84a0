"""Prometheus metrics and the health check, served over HTTP on `metrics.host:metrics.port`.

- ``GET /metrics``: Prometheus text format. Counters and histograms are kept by the process
  that does the work (instances received by the listener, job durations by the worker,
  deliveries by the dispatcher); jobs by state and queue depths are read from the database
  and the broker when scraped, so every process reports the same site-wide figures.
- ``GET /healthz``: JSON with the state of the database and the broker; HTTP 200 when both
  answer, 503 otherwise (for load balancers, Kubernetes probes, monitoring).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["METRICS", "HealthCheck", "MetricsServer", "ServiceMetrics", "SiteCollector"]

LOG = logging.getLogger(__name__)

# Job steps run from under a second (writing files) to many minutes (CPU inference, SyN).
_DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class ServiceMetrics:
    """The process's own counters and histograms, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "lesionwatch_instances_received",
            "DICOM instances received by C-STORE, by outcome (stored, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "lesionwatch_job_attempts_finished",
            "Job attempts finished by this process, by pipeline and outcome",
            ["pipeline", "outcome"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "lesionwatch_job_duration_seconds",
            "Wall time of successful jobs by pipeline and step ('total' is the whole job)",
            ["pipeline", "step"],
            buckets=_DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "lesionwatch_deliveries",
            "Result instances sent to destinations, by destination and outcome",
            ["destination", "outcome"],
            registry=self.registry,
        )

    def job_finished(
        self,
        pipeline: str,
        outcome: str,
        seconds: float | None,
        steps_s: Mapping[str, float],
    ) -> None:
        self.jobs_finished.labels(pipeline, outcome).inc()
        if seconds is not None:
            self.job_duration.labels(pipeline, "total").observe(seconds)
        for step, step_s in steps_s.items():
            self.job_duration.labels(pipeline, step).observe(step_s)


METRICS = ServiceMetrics()


class SiteCollector(Collector):
    """Jobs by state and queue depths, read at scrape time (site-wide, from DB and broker)."""

    def __init__(
        self,
        job_counts: Callable[[], Mapping[str, int]],
        queue_depths: Callable[[], Iterable[Any]],
        delivery_counts: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._job_counts = job_counts
        self._queue_depths = queue_depths
        self._delivery_counts = delivery_counts

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("lesionwatch_jobs", "Jobs by state", labels=["state"])
        try:
            for state, count in sorted(self._job_counts().items()):
                jobs.add_metric([state], count)
        except Exception as exc:  # a scrape must not fail because the database is away
            LOG.debug("job counts unavailable: %s", exc)
        yield jobs
        depth = GaugeMetricFamily(
            "lesionwatch_queue_depth", "Messages in each queue by state", labels=["queue", "state"]
        )
        try:
            for item in self._queue_depths():
                for state in ("ready", "in_flight", "delayed", "dead"):
                    value = getattr(item, state)
                    if value >= 0:
                        depth.add_metric([item.queue, state], value)
        except Exception as exc:
            LOG.debug("queue depths unavailable: %s", exc)
        yield depth
        if self._delivery_counts is not None:
            outbox = GaugeMetricFamily(
                "lesionwatch_delivery_rows", "Result deliveries by state", labels=["state"]
            )
            try:
                for state, count in sorted(self._delivery_counts().items()):
                    outbox.add_metric([state], count)
            except Exception as exc:
                LOG.debug("delivery counts unavailable: %s", exc)
            yield outbox


class HealthCheck:
    """Named checks; each raises when its dependency does not answer."""

    def __init__(self, checks: Mapping[str, Callable[[], None]]) -> None:
        self._checks = dict(checks)

    def run(self) -> tuple[bool, dict[str, Any]]:
        report: dict[str, Any] = {}
        healthy = True
        for name, check in self._checks.items():
            try:
                check()
                report[name] = {"ok": True}
            except Exception as exc:
                healthy = False
                report[name] = {"ok": False, "error": str(exc)[:300]}
        return healthy, {"status": "ok" if healthy else "unavailable", "checks": report}


class MetricsServer:
    """`/metrics` and `/healthz` on a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        health: HealthCheck,
        collectors: Sequence[Collector] = (),
        metrics: ServiceMetrics = METRICS,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Forward(metrics.registry))
        for collector in collectors:
            registry.register(collector)
        self._registry = registry
        self._health = health
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server._registry), "text/plain; version=0.0.4")
                elif path == "/healthz":
                    healthy, report = server._health.run()
                    body = json.dumps(report).encode()
                    self._send(200 if healthy else 503, body, "application/json")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                LOG.debug("metrics http: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _Forward(Collector):
    """Exposes another registry's metrics (the process counters) in the served registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()
