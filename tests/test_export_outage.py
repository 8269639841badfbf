"""Collector down: memory stays bounded, drops are counted, Prometheus serves, export resumes."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.export.exporters import ExportConfig, Exporters
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import GrpcReceiver, free_port
from tests.test_export_canary import make_request, scrape

QUEUE = 256
BATCH = 64
OUTAGE_RECORDS = 20_000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def poll(ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def spans(metrics: SelfMetrics, outcome: str) -> float:
    return metrics.get("infersight.export.spans", (("outcome", outcome),))


@pytest.mark.slow
def test_collector_down_then_back() -> None:
    metrics = SelfMetrics()
    prom_port = free_port()
    rx = GrpcReceiver().start()
    ex = Exporters(
        ExportConfig(
            otlp_endpoint=f"http://127.0.0.1:{rx.port}",
            otlp_timeout_s=1.0,
            otlp_metrics_interval_s=0.5,
            span_queue_size=QUEUE,
            span_batch_size=BATCH,
            span_flush_interval_s=0.2,
            retry_backoff_max_s=0.5,
            prometheus_port=prom_port,
            prometheus_host="127.0.0.1",
        ),
        metrics=metrics,
    )
    try:
        # Healthy: spans and metrics flow.
        for _ in range(10):
            ex.emit(make_request(path="/v1/before"))
        ex.flush()
        assert rx.wait(lambda c: len(c.spans()) == 10)
        assert spans(metrics, "exported") == 10

        # Down: a bounded stream of records while nothing listens.
        rx.stop()
        gc.collect()
        before = rss_bytes()
        for i in range(OUTAGE_RECORDS):
            ex.emit(make_request(path=f"/v1/during/{i}", trace_id=f"{i + 1:032x}"))
        gc.collect()
        grown = rss_bytes() - before
        # Unbounded, 20k SDK spans would hold well over 50 MB; the queue holds 256.
        assert grown < 25 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB during the outage"
        assert spans(metrics, "dropped") > 0
        # Prometheus keeps serving, and counts every request.
        fams = {f.name: f for f in text_string_to_metric_families(scrape(prom_port, False).decode())}
        count = sum(
            s.value for s in fams["http_server_request_duration_seconds"].samples if s.name.endswith("_count")
        )
        assert count == 10 + OUTAGE_RECORDS

        # Every span is accounted for: exported, failed or dropped, once the queue has drained
        # (failing batch by batch, with backoff between attempts).
        def accounted() -> bool:
            waiting = sum(s.value for s in metrics.snapshot() if s.name == "infersight.export.spans.queued")
            assert waiting <= QUEUE + BATCH  # the queue, plus the batch on the wire
            done = sum(spans(metrics, o) for o in ("exported", "failed", "dropped"))
            return waiting == 0 and done == 10 + OUTAGE_RECORDS

        assert poll(accounted, 30)
        assert spans(metrics, "failed") > 0
        failed_pushes = metrics.get("infersight.export.metrics", (("outcome", "failed"),))
        pushes_ok_before = metrics.get("infersight.export.metrics", (("outcome", "exported"),))

        # Back: the same port answers again, and export resumes by itself.
        rx = GrpcReceiver(port=rx.port).start()
        ex.emit(make_request(path="/v1/after"))
        assert rx.wait(lambda c: any(s.name == "POST /v1/after" for _, s in c.spans()), 30)
        assert rx.wait(lambda c: c.latest_metric("http.server.request.duration") is not None, 30)
        assert failed_pushes >= 1
        # (the receiver can hold the push a moment before the exporter has counted it)
        assert poll(
            lambda: metrics.get("infersight.export.metrics", (("outcome", "exported"),)) > pushes_ok_before,
            10,
        )
        m = rx.latest_metric("http.server.request.duration")
        assert m is not None
        # Cumulative metrics lose nothing across the outage.
        assert sum(p.count for p in m.histogram.data_points) >= 10 + OUTAGE_RECORDS
    finally:
        ex.shutdown()
        rx.stop()
