"""/metrics and /healthz over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from lesionwatch.service.broker import QueueDepth
from lesionwatch.service.metrics import HealthCheck, MetricsServer, ServiceMetrics, SiteCollector


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health_are_served() -> None:
    metrics = ServiceMetrics()
    metrics.instances_received.labels("stored").inc(3)
    metrics.job_finished("flair", "succeeded", 42.0, {"inference": 30.0})
    metrics.deliveries.labels("PACS", "success").inc()
    broker_up = [True]

    def broker_ping() -> None:
        if not broker_up[0]:
            raise ConnectionError("connection refused")

    server = MetricsServer(
        "127.0.0.1",
        0,
        HealthCheck({"database": lambda: None, "broker": broker_ping}),
        [
            SiteCollector(
                lambda: {"pending": 2, "succeeded": 5},
                lambda: [QueueDepth("jobs", ready=2, in_flight=1, delayed=0, dead=1)],
            )
        ],
        metrics,
    )
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, text = _get(f"{base}/metrics")
        assert status == 200
        for line in (
            'lesionwatch_instances_received_total{outcome="stored"} 3.0',
            'lesionwatch_job_duration_seconds_count{pipeline="flair",step="total"} 1.0',
            'lesionwatch_job_duration_seconds_sum{pipeline="flair",step="inference"} 30.0',
            'lesionwatch_deliveries_total{destination="PACS",outcome="success"} 1.0',
            'lesionwatch_jobs{state="pending"} 2.0',
            'lesionwatch_queue_depth{queue="jobs",state="dead"} 1.0',
        ):
            assert line in text, line
        status, text = _get(f"{base}/healthz")
        assert status == 200 and json.loads(text)["status"] == "ok"
        broker_up[0] = False
        status, text = _get(f"{base}/healthz")
        report = json.loads(text)
        assert status == 503 and report["checks"]["broker"] == {
            "ok": False,
            "error": "connection refused",
        }
        assert report["checks"]["database"]["ok"] is True
        assert _get(f"{base}/other")[0] == 404
    finally:
        server.stop()


@pytest.mark.parametrize("failing", ["jobs", "queues"])
def test_a_scrape_survives_an_unreachable_database_or_broker(failing: str) -> None:
    def broken() -> dict[str, int]:
        raise ConnectionError("down")

    collector = SiteCollector(
        broken if failing == "jobs" else (lambda: {"pending": 1}),
        broken if failing == "queues" else (lambda: []),  # type: ignore[arg-type,return-value]
    )
    names = [family.name for family in collector.collect()]
    assert names == ["lesionwatch_jobs", "lesionwatch_queue_depth"]
