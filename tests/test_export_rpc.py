"""gRPC records (Triton / KServe v2 ``inference.GRPCInferenceService``) through the real exporters.

Records follow the HTTP/2 parser's convention: ``method``/``path``/``status_code``
are ``:method``/``:path``/``:status`` and ``attributes`` carry ``rpc.system``,
``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``. They go through
:class:`Exporters` with the Prometheus endpoint on loopback and OTLP/gRPC to the
real receiver of ``tests/otlp_receiver.py``; the assertions read what came out
of the wire: the Prometheus exposition (text and OpenMetrics, parsed by
``prometheus_client``), the OTLP metrics and the OTLP spans.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample

from agent.export.exporters import ExportConfig, Exporters
from agent.export.instruments import (
    DURATION_BUCKETS,
    INSTRUMENTS,
    RPC_DURATION,
    RPC_DURATION_BUCKETS_MS,
    HistogramPoint,
    MetricSnapshot,
)
from agent.export.rpc import GRPC_STATUS_NAMES, error_type, span_name
from agent.export.sampling import Sampler
from agent.record import ActiveRequest, Request
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import GrpcReceiver, attrs, free_port
from tests.test_export_canary import make_request, scrape

SERVICE = "inference.GRPCInferenceService"
END = 1_763_900_000_000_000_000
PORT = 8001


def grpc_request(rpc_method: str, code: int | None, **overrides: Any) -> Request:
    """A gRPC call as the HTTP/2 parser records it; unary and without model unless overridden."""
    fields: dict[str, Any] = dict(
        end_time_unix_nano=END,
        duration_s=0.012,
        method="POST",
        path=f"/{SERVICE}/{rpc_method}",
        status_code=200,
        server_port=PORT,
        streaming=False,
        output_events=None,
        time_to_first_token_s=None,
        time_per_output_token_s=None,
        operation=None,
        request_model=None,
        response_model=None,
        input_tokens=None,
        output_tokens=None,
        finish_reasons=None,
        first_token_time_unix_nano=None,
    )
    fields.update(overrides)
    rpc: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc_method}
    if code is not None:
        rpc["rpc.grpc.status_code"] = code
    return make_request(**fields).with_attributes(rpc)


# The records of the main scenario; trace ids make span <-> exemplar links checkable.
INFER_OK = grpc_request("ModelInfer", 0, request_model="densenet_onnx", trace_id="1" * 32)
NOT_FOUND = grpc_request("ModelInfer", 5, duration_s=0.003, request_model="no_such_model", trace_id="2" * 32)
STREAM = grpc_request(
    "ModelStreamInfer",
    0,
    duration_s=4.0,
    streaming=True,
    output_events=101,
    time_to_first_token_s=0.12,
    time_per_output_token_s=0.0388,
    request_model="llama-3-8b",
    response_model="llama-3-8b",
    first_token_time_unix_nano=END - 4_000_000_000 + 120_000_000,
    trace_id="3" * 32,
).with_attributes({"k8s.pod.name": "triton-0", "k8s.namespace.name": "infer"})
UNAVAILABLE = grpc_request("ModelInfer", 14, error_type="UNAVAILABLE", trace_id="4" * 32)
RESET = grpc_request("ModelStreamInfer", None, duration_s=0.7, status_code=None, error_type="reset")
HTTP = make_request(end_time_unix_nano=END, trace_id="5" * 32)
RECORDS = (INFER_OK, NOT_FOUND, STREAM, UNAVAILABLE, RESET, HTTP)


@dataclass
class Exported:
    text: str  # Prometheus text format
    om: str  # OpenMetrics, with exemplars
    spans: list[Span]
    metrics: dict[str, Metric]  # latest OTLP push, by name


@pytest.fixture(scope="module")
def exported() -> Iterator[Exported]:
    port = free_port()
    m = SelfMetrics()
    with GrpcReceiver() as rx:
        ex = Exporters(
            ExportConfig(
                otlp_endpoint=f"http://127.0.0.1:{rx.port}",
                prometheus_port=port,
                prometheus_host="127.0.0.1",
                otlp_metrics_interval_s=3600,
            ),
            metrics=m,
        )
        try:
            ex.set_active_source(
                lambda: [
                    ActiveRequest(
                        END,
                        1,
                        "tritonserver",
                        PORT,
                        "POST",
                        f"/{SERVICE}/ModelStreamInfer",
                        None,
                        attributes={"rpc.system": "grpc"},
                    ),
                    ActiveRequest(END, 2, "vllm", 8000, "POST", "/v1/completions", "m"),
                ]
            )
            for r in RECORDS:
                ex.emit(r)
            ex.flush()
            text = scrape(port, openmetrics=False).decode()
            om = scrape(port, openmetrics=True).decode()
        finally:
            ex.shutdown()
        assert rx.wait(lambda c: len(c.spans()) == len(RECORDS))
        assert rx.wait(lambda c: c.latest_metric("rpc.server.duration") is not None)
        names = {mt.name for _, mt in rx.metrics()}
        latest = {n: rx.latest_metric(n) for n in names}
        yield Exported(text, om, [s for _, s in rx.spans()], {k: v for k, v in latest.items() if v})


def samples(text: str, family: str, suffix: str) -> list[Sample]:
    fams = {f.name: f for f in parse_text(text)}
    return [s for s in fams[family].samples if s.name == family + suffix]


RPC_PROM = "rpc_server_duration_milliseconds"


def rpc_labels(method: str, code: str | None, **extra: str) -> dict[str, str]:
    out = {"rpc_system": "grpc", "rpc_service": SERVICE, "rpc_method": method, "server_port": str(PORT)}
    if code is not None:
        out["rpc_grpc_status_code"] = code
    out.update(extra)
    return out


# -- Prometheus --------------------------------------------------------------------------------------


def test_prometheus_rpc_histogram_series_labels_and_buckets(exported: Exported) -> None:
    fams = {f.name: f for f in parse_text(exported.text)}
    assert fams[RPC_PROM].type == "histogram"
    counts = {frozenset(s.labels.items()): s.value for s in samples(exported.text, RPC_PROM, "_count")}
    assert counts == {
        frozenset(rpc_labels("ModelInfer", "0").items()): 1.0,
        frozenset(rpc_labels("ModelInfer", "5").items()): 1.0,  # NOT_FOUND: the client's error, no error_type
        frozenset(rpc_labels("ModelInfer", "14", error_type="UNAVAILABLE").items()): 1.0,
        frozenset(
            rpc_labels("ModelStreamInfer", "0", k8s_pod_name="triton-0", k8s_namespace_name="infer").items()
        ): 1.0,
        frozenset(
            rpc_labels("ModelStreamInfer", None, error_type="reset").items()
        ): 1.0,  # no status: no label
    }
    sums = {
        s.labels["rpc_method"] + s.labels.get("rpc_grpc_status_code", "-"): s.value
        for s in samples(exported.text, RPC_PROM, "_sum")
    }
    # Milliseconds: 12 ms, 3 ms, 4 s, 12 ms, 0.7 s.
    assert sums == pytest.approx(
        {
            "ModelInfer0": 12.0,
            "ModelInfer5": 3.0,
            "ModelInfer14": 12.0,
            "ModelStreamInfer0": 4000.0,
            "ModelStreamInfer-": 700.0,
        }
    )
    ok = [
        s
        for s in samples(exported.text, RPC_PROM, "_bucket")
        if s.labels.get("rpc_grpc_status_code") == "0" and s.labels["rpc_method"] == "ModelInfer"
    ]
    assert [float(s.labels["le"]) for s in ok] == [*RPC_DURATION_BUCKETS_MS, float("inf")]
    cum = {float(s.labels["le"]): s.value for s in ok}
    assert cum[10.0] == 0 and cum[25.0] == 1  # 12 ms lands in "<= 25"


def test_prometheus_grpc_requests_are_not_http_server_requests(exported: Exported) -> None:
    http = samples(exported.text, "http_server_request_duration_seconds", "_count")
    assert [(s.labels["http_route"], s.value) for s in http] == [("/v1/chat/completions", 1.0)]
    assert "GRPCInferenceService" not in "".join(
        line for line in exported.text.splitlines() if line.startswith("http_server_")
    )
    # The in-flight gRPC call is left out of the HTTP gauge; the HTTP one is there.
    active = samples(exported.text, "http_server_active_requests", "")
    assert [(s.labels["http_route"], s.value) for s in active] == [("/v1/completions", 1.0)]


def test_prometheus_genai_metrics_take_grpc_requests_with_a_model(exported: Exported) -> None:
    ttft = samples(exported.text, "gen_ai_server_time_to_first_token_seconds", "_count")
    by_model = {s.labels["gen_ai_request_model"]: s for s in ttft}
    assert set(by_model) == {"llama-3-8b", "meta-llama/Llama-3.1-8B-Instruct"}
    assert by_model["llama-3-8b"].value == 1.0
    assert "gen_ai_operation_name" not in by_model["llama-3-8b"].labels  # gRPC has no operation
    assert by_model["llama-3-8b"].labels["k8s_pod_name"] == "triton-0"
    (tsum,) = [
        s
        for s in samples(exported.text, "gen_ai_server_time_to_first_token_seconds", "_sum")
        if s.labels["gen_ai_request_model"] == "llama-3-8b"
    ]
    assert tsum.value == pytest.approx(0.12)
    tpot = samples(exported.text, "gen_ai_server_time_per_output_token_seconds", "_count")
    assert {s.labels["gen_ai_request_model"] for s in tpot} == {
        "llama-3-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
    }
    dur = {
        (s.labels["gen_ai_request_model"], s.labels.get("error_type", "")): s.value
        for s in samples(exported.text, "gen_ai_server_request_duration_seconds", "_count")
    }
    # Every record with a model: the unary ones (one NOT_FOUND: no error), the stream, the HTTP chat.
    assert dur == {
        ("densenet_onnx", ""): 1.0,
        ("no_such_model", ""): 1.0,
        ("llama-3-8b", ""): 1.0,
        ("meta-llama/Llama-3.1-8B-Instruct", ""): 1.0,
    }


def test_openmetrics_exemplars_on_rpc_buckets_lead_to_the_spans(exported: Exported) -> None:
    fams = {f.name: f for f in parse_openmetrics(exported.om)}
    rpc = fams[RPC_PROM]
    hits = {
        s.exemplar.labels["trace_id"]: (s.labels["le"], s.exemplar.value)
        for s in rpc.samples
        if s.exemplar is not None
    }
    span_traces = {s.trace_id.hex() for s in exported.spans}
    assert set(hits) <= span_traces and len(hits) == 5  # every RPC record was sampled (ratio 1)
    assert hits["1" * 32] == ("25.0", pytest.approx(12.0))  # value in ms, in the bucket it fell in
    assert hits["3" * 32] == ("5000.0", pytest.approx(4000.0))


# -- OTLP metrics ------------------------------------------------------------------------------------


def test_otlp_rpc_server_duration_unit_bounds_and_typed_attributes(exported: Exported) -> None:
    m = exported.metrics["rpc.server.duration"]
    assert m.unit == "ms"
    points = {
        (attrs(p.attributes)["rpc.method"], attrs(p.attributes).get("rpc.grpc.status_code")): p
        for p in m.histogram.data_points
    }
    assert set(points) == {
        ("ModelInfer", 0),
        ("ModelInfer", 5),
        ("ModelInfer", 14),
        ("ModelStreamInfer", 0),
        ("ModelStreamInfer", None),
    }
    ok = points[("ModelInfer", 0)]
    assert attrs(ok.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,  # int, as semconv types it
        "server.port": PORT,  # int
    }
    assert list(ok.explicit_bounds) == list(RPC_DURATION_BUCKETS_MS)
    assert ok.count == 1 and ok.sum == pytest.approx(12.0)
    assert attrs(points[("ModelInfer", 14)].attributes)["error.type"] == "UNAVAILABLE"
    http = exported.metrics["http.server.request.duration"]
    assert [attrs(p.attributes)["http.route"] for p in http.histogram.data_points] == ["/v1/chat/completions"]
    assert sum(p.count for p in http.histogram.data_points) == 1
    ttft = exported.metrics["gen_ai.server.time_to_first_token"]
    assert {attrs(p.attributes)["gen_ai.request.model"] for p in ttft.histogram.data_points} == {
        "llama-3-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
    }


# -- spans -------------------------------------------------------------------------------------------


def test_spans_are_named_and_attributed_by_the_rpc_conventions(exported: Exported) -> None:
    by_trace = {s.trace_id.hex(): s for s in exported.spans}
    names = sorted(s.name for s in exported.spans)
    assert names == sorted(
        [f"{SERVICE}/ModelInfer"] * 3 + [f"{SERVICE}/ModelStreamInfer"] * 2 + ["POST /v1/chat/completions"]
    )
    ok = by_trace["1" * 32]
    assert ok.kind == Span.SPAN_KIND_SERVER
    a = attrs(ok.attributes)
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == SERVICE and a["rpc.method"] == "ModelInfer"
    assert a["rpc.grpc.status_code"] == 0 and a["server.port"] == PORT
    assert a["url.path"] == f"/{SERVICE}/ModelInfer"  # the HTTP/2 transport facts stay
    assert "error.type" not in a and ok.status.code == Status.STATUS_CODE_UNSET
    assert ok.end_time_unix_nano - ok.start_time_unix_nano == 12_000_000
    # NOT_FOUND is not a server error (semconv gRPC server span): status unset.
    nf = by_trace["2" * 32]
    assert attrs(nf.attributes)["rpc.grpc.status_code"] == 5
    assert nf.status.code == Status.STATUS_CODE_UNSET and "error.type" not in attrs(nf.attributes)
    # UNAVAILABLE is: status ERROR, error.type the status name.
    un = by_trace["4" * 32]
    assert un.status.code == Status.STATUS_CODE_ERROR and attrs(un.attributes)["error.type"] == "UNAVAILABLE"
    # The stream keeps the GenAI attributes and the first-token event of HTTP spans.
    st = by_trace["3" * 32]
    a = attrs(st.attributes)
    assert st.name == f"{SERVICE}/ModelStreamInfer"
    assert a["gen_ai.request.model"] == "llama-3-8b" and a["infersight.streaming"] is True
    assert a["gen_ai.server.time_to_first_token"] == pytest.approx(0.12)
    assert a["k8s.pod.name"] == "triton-0"
    assert [(e.name, e.time_unix_nano) for e in st.events] == [
        ("gen_ai.first_token", END - 4_000_000_000 + 120_000_000)
    ]
    (reset,) = [s for s in exported.spans if attrs(s.attributes).get("error.type") == "reset"]
    assert reset.status.code == Status.STATUS_CODE_ERROR and "rpc.grpc.status_code" not in attrs(
        reset.attributes
    )
    (http,) = [s for s in exported.spans if s.name.startswith("POST")]
    assert "rpc.system" not in attrs(http.attributes)


# -- rules, without the network ----------------------------------------------------------------------


def test_error_rule_and_span_name() -> None:
    # A server-error code the parser did not name still makes an error; client codes never do.
    assert error_type(grpc_request("ModelInfer", 13)) == "INTERNAL"
    assert error_type(grpc_request("ModelInfer", 4, error_type="DEADLINE_EXCEEDED")) == "DEADLINE_EXCEEDED"
    for code in (0, 1, 3, 5, 7, 8, 9, 16):
        assert error_type(grpc_request("ModelInfer", code)) is None, GRPC_STATUS_NAMES[code]
    for code in (2, 4, 12, 13, 14, 15):
        assert error_type(grpc_request("ModelInfer", code)) == GRPC_STATUS_NAMES[code]
    assert error_type(make_request(status_code=503)) == "503" and error_type(make_request()) is None
    assert span_name(INFER_OK) == f"{SERVICE}/ModelInfer"
    assert span_name(HTTP) is None
    no_method = make_request(path="/x/y").with_attributes({"rpc.system": "grpc", "rpc.service": "x"})
    assert span_name(no_method) is None  # HTTP naming then
    huge = grpc_request("M" * 10_000, 0)
    assert len(span_name(huge) or "") == 256


def test_sampler_keeps_grpc_server_errors_only() -> None:
    s = Sampler(ratio=0.0, metrics=SelfMetrics(), rng=random.Random(1))
    assert s.decide(grpc_request("ModelInfer", 14, error_type="UNAVAILABLE"), 1).reason == "error"
    assert s.decide(grpc_request("ModelInfer", 12), 1).keep  # UNIMPLEMENTED, code only
    assert not s.decide(grpc_request("ModelInfer", 5), 1).keep  # NOT_FOUND: an ordinary request
    assert not s.decide(grpc_request("ModelInfer", 0), 1).keep


def rpc_points(ex: Exporters) -> tuple[HistogramPoint, ...]:
    (snap,) = [s for s in ex.state.collect() if s.instrument.name == RPC_DURATION.name]
    assert isinstance(snap, MetricSnapshot)
    return snap.points  # type: ignore[return-value]


def test_rpc_labels_are_bounded_and_folds_counted() -> None:
    m = SelfMetrics()
    ex = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0, rpc_cap=3), metrics=m)
    try:
        for i in range(50):
            ex.emit(grpc_request(f"Method{i}", 0, server_port=9000 + i % 2))
        ex.emit(grpc_request("ModelInfer", 99))  # not a gRPC code
        points = rpc_points(ex)
        keys = RPC_DURATION.attributes
        methods = {p.labels[keys.index("rpc.method")] for p in points}
        assert methods == {"Method0", "Method1", "Method2", "other"}
        ports = {p.labels[keys.index("server.port")] for p in points}
        assert ports == {"9000", "9001", str(PORT)}  # three ports: within the cap
        codes = {p.labels[keys.index("rpc.grpc.status_code")] for p in points}
        assert codes == {"0", "other"}
        assert sum(p.count for p in points) == 51
        assert m.get("infersight.attributes.folded", (("attribute", "rpc.method"), ("reason", "cap"))) == 48
        assert (
            m.get(
                "infersight.attributes.folded", (("attribute", "rpc.grpc.status_code"), ("reason", "unknown"))
            )
            == 1
        )
    finally:
        ex.shutdown()


def test_client_records_count_in_no_metric_and_buckets_line_up() -> None:
    ex = Exporters(ExportConfig(otlp_endpoint="", prometheus_port=0), metrics=SelfMetrics())
    try:
        ex.emit(grpc_request("ModelInfer", 0, span_kind="client"))
        assert rpc_points(ex) == ()
    finally:
        ex.shutdown()
    # Above 1 and 2.5 ms the RPC bounds are the HTTP/GenAI duration bounds in ms.
    assert RPC_DURATION_BUCKETS_MS[2:] == pytest.approx(tuple(b * 1000 for b in DURATION_BUCKETS))
    assert RPC_DURATION_BUCKETS_MS[-1] >= 300_000
    assert RPC_DURATION in INSTRUMENTS and RPC_DURATION.prom_name == "rpc_server_duration_milliseconds"
