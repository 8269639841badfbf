"""OTLP export against a real receiver (gRPC and HTTP/protobuf) and through a real collector (rotel)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from agent.export.exporters import ExportConfig, Exporters
from agent.export.instruments import TTFT_BUCKETS
from agent.record import ActiveRequest
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import Collected, GrpcReceiver, HttpReceiver, attrs, free_port
from tests.test_export_canary import make_request, scrape

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SPAN = "00f067aa0ba902b7"


@pytest.fixture
def rx() -> Iterator[GrpcReceiver]:
    with GrpcReceiver() as r:
        yield r


def exporters(endpoint: str, metrics: SelfMetrics, **kw: Any) -> Exporters:
    cfg: dict[str, Any] = dict(otlp_endpoint=endpoint, prometheus_port=0, otlp_metrics_interval_s=3600)
    cfg.update(kw)
    return Exporters(ExportConfig(**cfg), metrics=metrics)


def spans_by_name(c: Collected) -> dict[str, list[tuple[dict[str, Any], Span]]]:
    out: dict[str, list[tuple[dict[str, Any], Span]]] = {}
    for res, s in c.spans():
        out.setdefault(s.name, []).append((res, s))
    return out


def test_server_span_is_a_child_of_the_client_traceparent(rx: GrpcReceiver) -> None:
    end = 1_763_900_000_000_000_000
    r = make_request(
        end_time_unix_nano=end,
        duration_s=3.0,
        path="/v1/chat/completions?stream=true",
        trace_id=TRACE,
        parent_span_id=PARENT,
        span_id=SPAN,
        first_token_time_unix_nano=end - 2_750_000_000,
    ).with_attributes({"k8s.pod.name": "vllm-0", "k8s.namespace.name": "llm", "gpu.uuid": "GPU-1234"})
    ex = exporters(f"http://127.0.0.1:{rx.port}", SelfMetrics())
    try:
        ex.emit(r)
        ex.flush()
    finally:
        ex.shutdown()
    assert rx.wait(lambda c: len(c.spans()) == 1)
    res, s = rx.spans()[0]
    assert s.name == "POST /v1/chat/completions"
    assert s.kind == Span.SPAN_KIND_SERVER
    assert s.trace_id.hex() == TRACE
    assert s.parent_span_id.hex() == PARENT
    assert s.span_id.hex() == SPAN
    assert s.start_time_unix_nano == end - 3_000_000_000
    assert s.end_time_unix_nano == end
    a = attrs(s.attributes)
    assert a["http.request.method"] == "POST"
    assert a["http.route"] == "/v1/chat/completions"
    assert a["url.path"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["server.port"] == 8000
    assert a["client.address"] == "10.0.0.7"
    assert a["client.port"] == 51234
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert a["gen_ai.usage.input_tokens"] == 42
    assert a["gen_ai.usage.output_tokens"] == 30
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.server.time_to_first_token"] == pytest.approx(0.25)
    assert a["gen_ai.server.time_per_output_token"] == pytest.approx(0.02)
    assert a["infersight.output_events"] == 31
    # Later stages' attributes flow through unchanged.
    assert a["k8s.pod.name"] == "vllm-0" and a["k8s.namespace.name"] == "llm" and a["gpu.uuid"] == "GPU-1234"
    assert [(e.name, e.time_unix_nano) for e in s.events] == [("gen_ai.first_token", end - 2_750_000_000)]
    assert s.status.code != Status.STATUS_CODE_ERROR
    assert res["service.name"] == "infersight"
    assert res["host.name"] == os.uname().nodename


def test_root_spans_errors_templated_names_and_client_kind(rx: GrpcReceiver) -> None:
    ex = exporters(f"http://127.0.0.1:{rx.port}", SelfMetrics())
    try:
        ex.emit(make_request(path="/v2/models/llama/versions/3/infer", status_code=503, operation=None))
        ex.emit(
            make_request(
                method="BREW", path="/pot/12345", status_code=200, operation=None, request_model=None
            )
        )
        ex.emit(make_request(span_kind="client", path="/v1/embeddings", trace_id=TRACE))
        ex.flush()
    finally:
        ex.shutdown()
    assert rx.wait(lambda c: len(c.spans()) == 3)
    by = spans_by_name(rx)
    ((_, err),) = by["POST /v2/models/{model}/versions/{version}/infer"]
    assert err.status.code == Status.STATUS_CODE_ERROR
    assert attrs(err.attributes)["error.type"] == "503"
    assert err.parent_span_id == b""  # no traceparent: a root span with a fresh trace id
    assert len(err.trace_id) == 16 and err.trace_id != b"\0" * 16
    ((_, brew),) = by["HTTP /pot/{id}"]
    a = attrs(brew.attributes)
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "BREW"
    ((_, client),) = by["POST /v1/embeddings"]
    assert client.kind == Span.SPAN_KIND_CLIENT
    assert client.trace_id.hex() == TRACE and client.parent_span_id == b""


def point(metric: Any) -> list[Any]:
    kind = metric.WhichOneof("data")
    return list(getattr(metric, kind).data_points)


def test_metrics_histograms_counts_exemplars_and_self_metrics(rx: GrpcReceiver) -> None:
    metrics = SelfMetrics()
    metrics.inc("infersight.events.lost", 3, labels=(("probe", "sockets"),))
    ex = exporters(f"http://127.0.0.1:{rx.port}", metrics)
    ttfts = [0.0005, 0.001, 0.003, 0.05, 0.3, 700.0]
    try:
        for i, t in enumerate(ttfts):
            ex.emit(
                make_request(time_to_first_token_s=t, aborted=(i == 0), input_tokens=100, output_tokens=5)
            )
        ex.emit(make_request(path="/health", method="GET", operation=None, request_model=None))
        ex.set_active_source(
            lambda: [ActiveRequest(time.time_ns(), 1, "vllm", 8000, "POST", "/v1/completions", "m")]
        )
        ex.flush()
    finally:
        ex.shutdown()
    assert rx.wait(lambda c: c.latest_metric("gen_ai.server.time_to_first_token") is not None)
    ttft = rx.latest_metric("gen_ai.server.time_to_first_token")
    assert ttft is not None and ttft.unit == "s"
    assert ttft.histogram.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    (dp,) = ttft.histogram.data_points
    assert list(dp.explicit_bounds) == list(TTFT_BUCKETS)
    expected = [0] * (len(TTFT_BUCKETS) + 1)
    # le-inclusive: 0.0005 and 0.001 in "<= 0.001", 0.003 in "<= 0.005", 0.05 in "<= 0.06",
    # 0.3 in "<= 0.5", 700 in +Inf.
    expected[0], expected[1], expected[5], expected[9], expected[len(TTFT_BUCKETS)] = 2, 1, 1, 1, 1
    assert list(dp.bucket_counts) == expected
    assert dp.count == 6 and dp.sum == pytest.approx(sum(ttfts))
    assert attrs(dp.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": make_request().request_model,
    }
    # Every request was sampled (ratio 1), so exemplars carry real trace ids.
    sent = {s.trace_id for _, s in rx.spans()}
    assert dp.exemplars and all(e.trace_id in sent for e in dp.exemplars)

    tokens = rx.latest_metric("gen_ai.server.token.usage")
    assert tokens is not None
    by_type = {attrs(p.attributes)["gen_ai.token.type"]: p for p in point(tokens)}
    assert by_type["input"].count == 6 and by_type["input"].sum == 600
    assert by_type["output"].sum == 30
    http = rx.latest_metric("http.server.request.duration")
    assert http is not None
    routes = {attrs(p.attributes)["http.route"]: p.count for p in point(http)}
    assert routes == {"/v1/chat/completions": 6, "/health": 1}
    aborted = rx.latest_metric("infersight.requests.aborted")
    assert aborted is not None and aborted.sum.is_monotonic and [p.as_double for p in point(aborted)] == [1.0]
    active = rx.latest_metric("http.server.active_requests")
    assert active is not None and not active.sum.is_monotonic
    assert [(attrs(p.attributes)["http.route"], p.as_double) for p in point(active)] == [
        ("/v1/completions", 1.0)
    ]
    up = rx.latest_metric("infersight.up")
    assert up is not None and [p.as_double for p in point(up)] == [1.0]
    lost = rx.latest_metric("infersight.events.lost")
    assert lost is not None and [(attrs(p.attributes), p.as_double) for p in point(lost)] == [
        ({"probe": "sockets"}, 3.0)
    ]
    rss = rx.latest_metric("process.memory.usage")
    assert rss is not None and point(rss)[0].as_double > 1e6
    assert metrics.get("infersight.export.spans", (("outcome", "exported"),)) == 7
    assert metrics.get("infersight.export.metrics", (("outcome", "exported"),)) >= 1


def test_buckets_are_configurable(rx: GrpcReceiver) -> None:
    ex = exporters(
        f"http://127.0.0.1:{rx.port}",
        SelfMetrics(),
        buckets={"gen_ai.server.time_to_first_token": (0.1, 1.0)},
    )
    try:
        ex.emit(make_request(time_to_first_token_s=0.5))
        ex.flush()
    finally:
        ex.shutdown()
    assert rx.wait(lambda c: c.latest_metric("gen_ai.server.time_to_first_token") is not None)
    m = rx.latest_metric("gen_ai.server.time_to_first_token")
    assert m is not None
    (dp,) = m.histogram.data_points
    assert list(dp.explicit_bounds) == [0.1, 1.0] and list(dp.bucket_counts) == [0, 1, 0]


def test_resource_and_endpoint_from_the_standard_environment(
    rx: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{rx.port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agent-on-node-7")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,k8s.cluster.name=east%2C1")
    monkeypatch.setenv("NODE_NAME", "node-7")
    ex = Exporters(ExportConfig(prometheus_port=0, otlp_metrics_interval_s=3600), metrics=SelfMetrics())
    try:
        ex.emit(make_request())
        ex.flush()
    finally:
        ex.shutdown()
    assert rx.wait(lambda c: bool(c.spans()) and bool(c.metrics()))
    for res in [rx.spans()[0][0], rx.metrics()[0][0]]:
        assert res["service.name"] == "agent-on-node-7"
        assert res["k8s.node.name"] == "node-7"
        assert res["deployment.environment"] == "staging" and res["k8s.cluster.name"] == "east,1"
        assert res["host.name"] == os.uname().nodename


def test_empty_endpoint_turns_otlp_off_despite_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    ex = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0), metrics=SelfMetrics())
    try:
        assert ex.spans is None and ex.metric_pusher is None
        ex.emit(make_request())  # metrics still count it
        (snap,) = [s for s in ex.state.collect() if s.instrument.name == "http.server.request.duration"]
        assert [p.count for p in snap.points] == [1]  # type: ignore[union-attr]
    finally:
        ex.shutdown()
    with pytest.raises(ValueError, match="protocol"):
        Exporters(ExportConfig(otlp_endpoint="http://x:1", otlp_protocol="thrift", prometheus_port=0))


def test_http_protobuf_export() -> None:
    with HttpReceiver() as rx:
        metrics = SelfMetrics()
        ex = exporters(f"http://127.0.0.1:{rx.port}", metrics, otlp_protocol="http/protobuf")
        try:
            ex.emit(make_request(trace_id=TRACE, parent_span_id=PARENT))
            ex.flush()
        finally:
            ex.shutdown()
        assert rx.wait(
            lambda c: bool(c.spans()) and c.latest_metric("gen_ai.server.request.duration") is not None
        )
        ((_, s),) = rx.spans()
        assert s.name == "POST /v1/chat/completions" and s.parent_span_id.hex() == PARENT
        assert set(rx.content_types) == {"application/x-protobuf"}
        assert metrics.get("infersight.export.spans", (("outcome", "exported"),)) == 1


class _Point:
    def __init__(self, name: str, prom: str, kind: str, value: float, **attributes: Any) -> None:
        self.name, self.prom_name, self.kind, self.value = name, prom, kind, value
        self.unit, self.help, self.attributes = "1", f"{name} from a collector", attributes


def test_point_sources_export_on_both_paths_without_pid(rx: GrpcReceiver) -> None:
    metrics = SelfMetrics()
    port = free_port()
    ex = exporters(f"http://127.0.0.1:{rx.port}", metrics, prometheus_port=port, prometheus_host="127.0.0.1")

    def gpu() -> list[_Point]:
        return [
            _Point("gpu.utilization", "infersight_gpu_utilization_ratio", "gauge", 0.75, **{
                "gpu.uuid": "GPU-1", "k8s.pod.name": "vllm-0", "process.pid": 4242}),
            _Point("cuda.kernel.launches", "infersight_cuda_kernel_launches_total", "counter", 12.0, **{
                "gpu.uuid": "GPU-1", "process.pid": 4242}),
        ]  # fmt: skip

    def broken() -> list[_Point]:
        raise RuntimeError("NVML gone")

    ex.add_point_source(gpu)
    ex.add_point_source(broken)
    try:
        ex.flush()
        text = scrape(port, openmetrics=False).decode()
    finally:
        ex.shutdown()
    assert 'infersight_gpu_utilization_ratio{gpu_uuid="GPU-1",k8s_pod_name="vllm-0"} 0.75' in text
    assert 'infersight_cuda_kernel_launches_total{gpu_uuid="GPU-1"} 12.0' in text
    assert "4242" not in text
    assert "infersight_up 1.0" in text
    assert (
        metrics.get(
            "infersight.export.source.errors",
            (("source", "test_point_sources_export_on_both_paths_without_pid.<locals>.broken"),),
        )
        >= 1
    )
    assert rx.wait(lambda c: c.latest_metric("gpu.utilization") is not None)
    util = rx.latest_metric("gpu.utilization")
    launches = rx.latest_metric("cuda.kernel.launches")
    assert util is not None and launches is not None
    assert [attrs(p.attributes) for p in point(util)] == [{"gpu.uuid": "GPU-1", "k8s.pod.name": "vllm-0"}]
    assert launches.sum.is_monotonic and point(launches)[0].as_double == 12.0


ROTEL = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/rotel/rotel-agent"


def rotel_binary() -> str | None:
    try:
        import rotel

        candidate = Path(rotel.__file__).parent / "rotel-agent"
    except ImportError:
        candidate = ROTEL
    return str(candidate) if candidate.exists() else shutil.which("rotel-agent")


def wait_port(port: int, timeout: float) -> bool:
    """Poll until something accepts on 127.0.0.1:port (the collector is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def test_through_a_real_collector(rx: GrpcReceiver, tmp_path: Path) -> None:
    binary = rotel_binary()
    if binary is None:
        pytest.skip("rotel (PyPI) not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{port}", "--otlp-http-endpoint", f"127.0.0.1:{free_port()}",
         "--exporter", "otlp", "--otlp-exporter-endpoint", f"http://127.0.0.1:{rx.port}",
         "--otlp-exporter-protocol", "grpc", "--pid-file", str(tmp_path / "rotel.pid"), "--batch-timeout", "200ms"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "rotel.log", "wb"),
    )  # fmt: skip
    metrics = SelfMetrics()
    try:
        assert wait_port(port, 30), (tmp_path / "rotel.log").read_text()[-2000:]
        ex = exporters(f"http://127.0.0.1:{port}", metrics)
        try:
            ex.emit(make_request(trace_id=TRACE, parent_span_id=PARENT, span_id=SPAN))
            ex.flush()
        finally:
            ex.shutdown()
        assert metrics.get("infersight.export.spans", (("outcome", "exported"),)) == 1
        assert rx.wait(
            lambda c: bool(c.spans()) and c.latest_metric("gen_ai.server.time_to_first_token") is not None, 30
        )
        ((res, s),) = rx.spans()
        assert (
            s.name == "POST /v1/chat/completions"
            and s.span_id.hex() == SPAN
            and s.parent_span_id.hex() == PARENT
        )
        assert res["service.name"] == "infersight"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
