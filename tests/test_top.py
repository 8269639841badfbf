"""``infersight top`` against a live exporter, and its exposition arithmetic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rich.console import Console

from agent import top
from agent.export.exporters import ExportConfig, Exporters
from agent.record import ActiveRequest
from agent.selfmetrics import SelfMetrics
from tests.otlp_receiver import free_port
from tests.test_export_canary import make_request
from tests.test_export_rpc import grpc_request


class _Gpu:
    def __init__(self, name: str, prom: str, value: float) -> None:
        self.name, self.prom_name, self.kind, self.value = name, prom, "gauge", value
        self.unit, self.help = "1", name
        self.attributes = {"gpu.uuid": "GPU-abc", "k8s.pod.name": "vllm-0"}


@pytest.fixture
def live() -> Iterator[tuple[Exporters, str]]:
    port = free_port()
    ex = Exporters(
        ExportConfig(otlp_endpoint="", prometheus_port=port, prometheus_host="127.0.0.1"),
        metrics=SelfMetrics(),
    )
    try:
        yield ex, f"http://127.0.0.1:{port}/metrics"
    finally:
        ex.shutdown()


def rows(out: str, first: str) -> list[list[str]]:
    """Table rows (cells split on the box-drawing bar) whose first cell is ``first``."""
    found = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        cells = [c for c in cells if c != ""]
        if cells and cells[0] == first:
            found.append(cells)
    return found


def test_once_shows_the_model_row_with_the_right_count(
    live: tuple[Exporters, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    ex, url = live
    pod = {"k8s.pod.name": "vllm-0", "k8s.namespace.name": "llm"}
    for i in range(7):
        ex.emit(make_request(request_model="llama", aborted=(i == 0)).with_attributes(pod))
    for _ in range(3):
        ex.emit(make_request(request_model="qwen", time_to_first_token_s=1.5).with_attributes(pod))
    ex.set_active_source(lambda: [ActiveRequest(0, 1, "vllm", 8000, "POST", "/v1/completions", "llama", pod)])
    ex.add_point_source(
        lambda: [_Gpu("gpu.utilization", "infersight_gpu_utilization_ratio", 0.5),
                 _Gpu("gpu.memory.used", "infersight_gpu_memory_used_bytes", 2 * 2**30)]
    )  # fmt: skip
    assert top.main(["--url", url, "--once"]) == 0
    out = capsys.readouterr().out
    (llama,) = rows(out, "llama")
    # model, requests, req/s, p50, p99, TTFT p50, TTFT p99, tok/s, in-flight, aborted
    assert llama[1] == "7" and llama[8] == "1" and llama[9] == "1"
    assert llama[5].endswith("ms")  # TTFT 250 ms lands in the (0.1, 0.25] bucket
    (qwen,) = rows(out, "qwen")
    assert qwen[1] == "3" and qwen[5].endswith(" s")
    (pod_row,) = rows(out, "llm/vllm-0")
    assert pod_row[1] == "10"
    (gpu,) = rows(out, "GPU-abc (vllm-0)")
    assert gpu[1] == "50.0" and gpu[2] == "2048.0"


def test_rates_and_window_quantiles_between_two_scrapes(live: tuple[Exporters, str]) -> None:
    ex, url = live
    for _ in range(4):
        ex.emit(make_request(request_model="m", duration_s=0.3))
    first = top.parse(top.fetch(url), at=100.0)
    for _ in range(10):
        ex.emit(make_request(request_model="m", duration_s=30.0))
    second = top.parse(top.fetch(url), at=102.0)
    console = Console(width=200, record=True)
    console.print(top.render(second, first, url))
    (row,) = rows(console.export_text(), "m")
    assert row[1] == "14"  # total since start
    assert row[2] == "5.0"  # 10 requests in 2 s
    assert row[3].endswith(" s") and float(row[3].split()[0]) > 20  # the window holds only the 30 s requests
    assert row[7] == "150.0"  # 10 x 30 output tokens in 2 s


def test_quantile_matches_promql_interpolation() -> None:
    h = top.Hist({0.1: 50.0, 1.0: 90.0, float("inf"): 100.0}, 100.0, 0.0)
    assert h.quantile(0.5) == pytest.approx(0.1)
    assert h.quantile(0.7) == pytest.approx(0.1 + 0.9 * 20 / 40)
    assert h.quantile(0.99) == 1.0  # in +Inf: the highest finite bound
    assert top.Hist().quantile(0.5) is None


def test_agent_drops_are_shown(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    m = SelfMetrics()
    m.inc("infersight.events.lost", 12, labels=(("probe", "sockets"),))
    port = free_port()
    ex = Exporters(
        ExportConfig(otlp_endpoint="", prometheus_port=port, prometheus_host="127.0.0.1"), metrics=m
    )
    try:
        assert top.main(["--url", f"http://127.0.0.1:{port}/metrics", "--once"]) == 0
    finally:
        ex.shutdown()
    out = capsys.readouterr().out
    assert "no requests seen yet" in out
    (lost,) = rows(out, "infersight_events_lost_total{probe=sockets}")
    assert lost[1] == "12"


class _Garbage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'metric{label="unterminated 1\n\x00\xff{{{'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_unreachable_or_garbage_endpoints_are_messages(capsys: pytest.CaptureFixture[str]) -> None:
    assert top.main(["--url", f"http://127.0.0.1:{free_port()}/metrics", "--once"]) == 1
    assert "cannot read" in capsys.readouterr().out
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        assert top.main(["--url", f"http://127.0.0.1:{server.server_address[1]}/metrics", "--once"]) == 1
        assert "cannot parse" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()


TRITON = {"k8s.pod.name": "triton-0", "k8s.namespace.name": "vision"}
INFER = ("llm/triton-0", "GRPCInferenceService/ModelInfer")


def test_grpc_calls_have_their_own_table(
    live: tuple[Exporters, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Triton pod that serves only gRPC is not idle: its calls are counted per method, with
    their latency (the exporter's milliseconds shown as such), errors and status codes."""
    monkeypatch.setenv("COLUMNS", "220")
    ex, url = live
    pod = {"k8s.pod.name": "triton-0", "k8s.namespace.name": "llm"}
    calls = [
        *(grpc_request("ModelInfer", 0, duration_s=0.012, request_model="densenet") for _ in range(5)),
        grpc_request("ModelInfer", 5, duration_s=0.003, request_model="missing"),  # NOT_FOUND: no error
        *(grpc_request("ModelInfer", 14, duration_s=0.040, request_model="densenet") for _ in range(2)),
        grpc_request("ModelStreamInfer", 0, duration_s=0.5, streaming=True),
        grpc_request("ModelStreamInfer", None, duration_s=0.2, streaming=True, error_type="reset"),
    ]
    for r in calls:
        ex.emit(r.with_attributes(pod))
    assert top.main(["--url", url, "--once"]) == 0
    out = capsys.readouterr().out
    assert "gRPC calls" in out and "no requests seen yet" not in out
    # pod, rpc, calls, calls/s, p50, p99, errors, status codes
    by_rpc = {r[1]: r for r in rows(out, "llm/triton-0")}
    assert set(by_rpc) == {"GRPCInferenceService/ModelInfer", "GRPCInferenceService/ModelStreamInfer"}
    infer = by_rpc["GRPCInferenceService/ModelInfer"]
    assert infer[2] == "8" and infer[3] == "-"  # a single scrape has no rate
    # {3, 12 x5, 40 x2} ms: the median is rank 4 of 8, in (10, 25] ms, which holds 5 after 1 below.
    assert infer[4] == "19 ms"
    assert infer[5].endswith(" ms") and 25 < float(infer[5].split()[0]) <= 50
    assert infer[6] == "2"  # UNAVAILABLE x2; NOT_FOUND is the client's error
    assert infer[7] == "0:5 5:1 14:2"
    stream = by_rpc["GRPCInferenceService/ModelStreamInfer"]
    # a reset stream has no status code, and is an error
    assert (stream[2], stream[6], stream[7]) == ("2", "1", "0:1 -:1")
    assert stream[4] == "250 ms"  # {200, 500} ms: rank 1 of 2 ends the (100, 250] bucket
    # The model rows count the calls that name a model (as the gen_ai histograms do).
    (densenet,) = rows(out, "densenet")
    assert densenet[1] == "7"


def test_grpc_rates_and_window_quantiles_between_two_scrapes(live: tuple[Exporters, str]) -> None:
    ex, url = live
    for _ in range(4):
        ex.emit(grpc_request("ModelInfer", 0, duration_s=0.002).with_attributes(TRITON))
    first = top.parse(top.fetch(url), at=100.0)
    for _ in range(10):
        ex.emit(grpc_request("ModelInfer", 0, duration_s=0.8).with_attributes(TRITON))
    second = top.parse(top.fetch(url), at=102.0)
    assert second.rpc[("vision/triton-0", INFER[1])].count == 14
    console = Console(width=200, record=True)
    console.print(top.render(second, first, url))
    text = console.export_text()
    # Calls that name no model, on a pod with no HTTP traffic: only the gRPC table shows them.
    assert "no requests seen yet" not in text and "Per pod" not in text and "Per model" not in text
    (row,) = rows(text, "vision/triton-0")
    assert row[2] == "14"  # total since start
    assert row[3] == "5.0"  # 10 calls in 2 s
    # the window holds only the 800 ms calls: (500, 1000] ms
    assert row[4].endswith(" ms") and 500 < float(row[4].split()[0]) <= 1000
    # and the first frame, over everything since start, saw the 2 ms ones in ms too
    console = Console(width=200, record=True)
    console.print(top.render(first, None, url))
    (row,) = rows(console.export_text(), "vision/triton-0")
    assert row[4] == "1.8 ms"  # 4 calls of 2 ms, in (1, 2.5] ms: 1 + 1.5 x 2/4


def test_rpc_histogram_in_ms_becomes_seconds() -> None:
    text = (
        "# TYPE rpc_server_duration_milliseconds histogram\n"
        'rpc_server_duration_milliseconds_bucket{rpc_service="a.B",rpc_method="M",le="10.0"} 1\n'
        'rpc_server_duration_milliseconds_bucket{rpc_service="a.B",rpc_method="M",le="100.0"} 3\n'
        'rpc_server_duration_milliseconds_bucket{rpc_service="a.B",rpc_method="M",le="+Inf"} 4\n'
        'rpc_server_duration_milliseconds_count{rpc_service="a.B",rpc_method="M"} 4\n'
        'rpc_server_duration_milliseconds_sum{rpc_service="a.B",rpc_method="M"} 250\n'
    )
    snap = top.parse(text, at=0.0)
    h = snap.rpc[("", "B/M")]
    assert h.buckets == {0.01: 1.0, 0.1: 3.0, float("inf"): 4.0}
    assert h.count == 4 and h.sum == pytest.approx(0.25)
    assert h.quantile(0.5) == pytest.approx(0.01 + 0.09 * 1 / 2)
    assert snap.rpc_codes[("", "B/M")] == {"-": 4.0}
    assert snap.requests == {}  # not an HTTP request
