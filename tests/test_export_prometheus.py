"""The Prometheus endpoint, scraped by a real Prometheus (Debian package), and its exposition."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from agent.export.exporters import ExportConfig, Exporters
from agent.export.instruments import INSTRUMENTS, TTFT_BUCKETS
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import GrpcReceiver, free_port
from tests.test_export_canary import make_request, scrape

REPO = Path(__file__).resolve().parent.parent

# The names dashboards and KEDA queries are written against: they must never change.
CONTRACT = {
    "http.server.request.duration": "http_server_request_duration_seconds",
    "http.server.active_requests": "http_server_active_requests",
    "gen_ai.server.request.duration": "gen_ai_server_request_duration_seconds",
    "gen_ai.server.time_to_first_token": "gen_ai_server_time_to_first_token_seconds",
    "gen_ai.server.time_per_output_token": "gen_ai_server_time_per_output_token_seconds",
    "gen_ai.server.token.usage": "gen_ai_server_token_usage",
    "infersight.requests.aborted": "infersight_requests_aborted_total",
    "infersight.up": "infersight_up",
}


def test_exposition_names_are_the_contract() -> None:
    table = {i.name: i.prom_name for i in INSTRUMENTS}
    for otel, prom in CONTRACT.items():
        assert table[otel] == prom
    for inst in INSTRUMENTS:
        if inst.kind == "histogram":
            assert inst.buckets == tuple(sorted(inst.buckets))
    durations = {i.name: i.buckets for i in INSTRUMENTS}
    assert durations["http.server.request.duration"][-1] >= 300
    assert durations["gen_ai.server.request.duration"][-1] >= 300
    assert durations["gen_ai.server.time_to_first_token"][0] <= 0.001


def test_metric_reference_documents_every_instrument() -> None:
    doc = (REPO / "docs/metrics.md").read_text()
    for inst in INSTRUMENTS:
        assert f"`{inst.prom_name}`" in doc, inst.prom_name
        assert f"`{inst.name}`" in doc, inst.name
        for label in inst.label_names:
            assert f"`{label}`" in doc, (inst.name, label)


def test_labels_exemplars_and_formats() -> None:
    port = free_port()
    metrics = SelfMetrics()
    with GrpcReceiver() as rx:
        ex = Exporters(
            ExportConfig(
                otlp_endpoint=f"http://127.0.0.1:{rx.port}",
                prometheus_port=port,
                prometheus_host="127.0.0.1",
                otlp_metrics_interval_s=3600,
            ),
            metrics=metrics,
        )
        try:
            r = make_request(trace_id="0af7651916cd43dd8448eb211c80319c", span_id="00f067aa0ba902b7")
            ex.emit(
                r.with_attributes({"k8s.pod.name": "vllm-0", "k8s.namespace.name": "llm", "gpu.uuid": "G"})
            )
            om = scrape(port, openmetrics=True).decode()
            text = scrape(port, openmetrics=False).decode()
        finally:
            ex.shutdown()
    assert om.rstrip().endswith("# EOF")
    fams = {f.name: f for f in parse_openmetrics(om)}
    ttft = fams["gen_ai_server_time_to_first_token_seconds"]
    buckets = [s for s in ttft.samples if s.name.endswith("_bucket")]
    assert len(buckets) == len(TTFT_BUCKETS) + 1
    hit = [s for s in buckets if s.exemplar is not None]
    assert len(hit) == 1 and hit[0].labels["le"] == "0.25"  # 0.25 s lands in the "<= 0.25" bucket
    assert hit[0].exemplar.labels == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "00f067aa0ba902b7",
    }
    assert hit[0].exemplar.value == pytest.approx(0.25)
    assert hit[0].labels["k8s_pod_name"] == "vllm-0" and hit[0].labels["k8s_namespace_name"] == "llm"
    assert hit[0].labels["gen_ai_request_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "gpu_uuid" not in hit[0].labels  # gpu.* stays on spans
    # The plain text format carries the same series, without exemplars.
    plain = {f.name: f for f in parse_text(text)}
    assert "# {" not in text
    assert plain["http_server_request_duration_seconds"].samples
    assert plain["infersight_up"].samples[0].value == 1.0
    for fam in plain.values():
        for s in fam.samples:
            assert (
                "process_pid" not in s.labels and "url_path" not in s.labels and "client_port" not in s.labels
            )
    # Self metrics: infersight.* -> infersight_*, counters _total.
    assert "infersight_traces_sampled_total" in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text


def test_unsampled_requests_lend_no_exemplar() -> None:
    port = free_port()
    with GrpcReceiver() as rx:
        ex = Exporters(
            ExportConfig(
                otlp_endpoint=f"http://127.0.0.1:{rx.port}",
                prometheus_port=port,
                prometheus_host="127.0.0.1",
                sample_ratio=0.0,
                otlp_metrics_interval_s=3600,
            ),
            metrics=SelfMetrics(),
        )
        try:
            for _ in range(20):
                ex.emit(make_request())  # ordinary: not sampled at ratio 0
            ex.emit(make_request(status_code=500, time_to_first_token_s=3.0))  # error: always kept
            ex.flush()
            om = scrape(port, openmetrics=True).decode()
        finally:
            ex.shutdown()
        assert rx.wait(lambda c: len(c.spans()) == 1)
        kept = {s.trace_id.hex() for _, s in rx.spans()}
    fams = {f.name: f for f in parse_openmetrics(om)}
    ttft = fams["gen_ai_server_time_to_first_token_seconds"]
    exemplars = [s.exemplar for s in ttft.samples if s.exemplar is not None]
    counts = [s.value for s in ttft.samples if s.name.endswith("_count")]
    assert sum(counts) == 21  # metrics count every request regardless of sampling
    assert [e.labels["trace_id"] for e in exemplars] == list(kept)


# -- a real Prometheus -------------------------------------------------------------------------------


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """The Debian ``prometheus`` binary on loopback, scraping ``targets`` every second."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = free_port()
        cfg = tmp / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: infersight\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        binary = prometheus_binary()
        assert binary
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, promql: str, ready: Any, timeout: float = 40.0) -> list[dict[str, Any]]:
        """Poll ``promql`` until ``ready(result)`` (first scrapes take ~6 s to become visible)."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                last = self.query(promql)
            except OSError:
                last = []
            if ready(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{promql} never became ready; last result {last}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture
def exporter_and_prometheus(tmp_path: Path) -> Iterator[tuple[Exporters, PrometheusServer]]:
    if prometheus_binary() is None:
        pytest.skip("prometheus binary missing (apt-get install -y prometheus)")
    port = free_port()
    # OTLP on (to a real receiver) so that sampled requests lend exemplars.
    rx = GrpcReceiver().start()
    ex = Exporters(
        ExportConfig(
            otlp_endpoint=f"http://127.0.0.1:{rx.port}", prometheus_port=port, prometheus_host="127.0.0.1"
        ),
        metrics=SelfMetrics(),
    )
    prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
    try:
        yield ex, prom
    finally:
        prom.stop()
        ex.shutdown()
        rx.stop()


# A TTFT schedule with known quantiles: 50 requests at 30 ms, 40 at 300 ms, 10 at 3 s.
SCHEDULE = [(0.03, 50), (0.3, 40), (3.0, 10)]


@pytest.mark.slow
def test_histogram_quantile_over_ttft_returns_the_schedule(
    exporter_and_prometheus: tuple[Exporters, PrometheusServer],
) -> None:
    ex, prom = exporter_and_prometheus
    for ttft, n in SCHEDULE:
        for _ in range(n):
            ex.emit(make_request(time_to_first_token_s=ttft).with_attributes({"k8s.pod.name": "vllm-0"}))
    prom.wait_for('up{job="infersight"}', lambda r: bool(r) and r[0]["value"][1] == "1")
    count = prom.wait_for(
        "sum(gen_ai_server_time_to_first_token_seconds_count)",
        lambda r: bool(r) and r[0]["value"][1] == "100",
    )
    assert count
    bounds = (0.0, *TTFT_BUCKETS)

    def quantile(q: float) -> float:
        res = prom.query(
            f"histogram_quantile({q}, sum by (le) (gen_ai_server_time_to_first_token_seconds_bucket))"
        )
        return float(res[0]["value"][1])

    def bucket_of(v: float) -> tuple[float, float]:
        i = next(i for i, b in enumerate(TTFT_BUCKETS) if v <= b)
        return bounds[i], TTFT_BUCKETS[i]

    # p25 and p50 fall among the 30 ms requests, p75 among the 300 ms, p95 among the 3 s ones:
    # Prometheus interpolates inside the bucket that holds the true value.
    for q, true in [(0.25, 0.03), (0.5, 0.03), (0.75, 0.3), (0.95, 3.0)]:
        lo, hi = bucket_of(true)
        got = quantile(q)
        assert lo <= got <= hi, (q, got, (lo, hi))
    per_pod = prom.query(
        'sum by (k8s_pod_name) (gen_ai_server_request_duration_seconds_count{k8s_pod_name="vllm-0"})'
    )
    assert per_pod and per_pod[0]["value"][1] == "100"
    assert re.fullmatch(r"1", prom.query("infersight_up")[0]["value"][1])
    # Prometheus stored the exemplars it scraped (OpenMetrics negotiation, exemplar storage on).
    now = time.time()
    url = f"http://127.0.0.1:{prom.port}/api/v1/query_exemplars?" + urllib.parse.urlencode(
        {"query": "gen_ai_server_time_to_first_token_seconds_bucket", "start": now - 300, "end": now + 60}
    )
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.load(resp)["data"]
    stored = {e["labels"]["trace_id"] for series in data for e in series["exemplars"]}
    values = {float(e["value"]) for series in data for e in series["exemplars"]}
    assert stored and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in stored)
    assert values <= {ttft for ttft, _ in SCHEDULE}


def test_busy_port_degrades_to_no_endpoint() -> None:
    m = SelfMetrics()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ex = Exporters(
            ExportConfig(otlp_endpoint="", prometheus_port=port, prometheus_host="127.0.0.1"), metrics=m
        )
        try:
            assert ex.prometheus is None and ex.prometheus_port is None
            ex.emit(make_request())  # the rest works
            assert m.get("infersight.export.prometheus.errors", (("stage", "bind"),)) == 1
        finally:
            ex.shutdown()
