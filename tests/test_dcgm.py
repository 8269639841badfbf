"""DCGM collector against a real local HTTP server serving dcgm-exporter text."""

from __future__ import annotations

import logging
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.selfmetrics import SelfMetrics
from collectors.dcgm import (
    MIG_UNRESOLVED,
    PARSE_FAILURES,
    SCRAPE_FAILURES,
    TRUNCATED,
    DcgmCollector,
    DcgmConfig,
    parse_exposition,
)
from collectors.nvml import COLLECTOR_UP, RETRIES, GpuDevice
from tests.harness import wait_for

DATA = Path(__file__).parent / "data" / "dcgm"
H100_0 = "GPU-8f6c5b1e-3a0d-4c1b-9e2f-7a1d2c3b4e50"
H100_1 = "GPU-0d2a7c9e-51b4-4f86-a3d1-6e8b9f0c1a27"
A100 = "GPU-4e2b9d61-7c3a-4f0e-b815-2d9c6a7e1f33"
DCGM_UP = (("source", "dcgm"),)
S = 1_000_000_000


class Exporter:
    """A dcgm-exporter stand-in: serves ``body`` on /metrics with ``status``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.body = b""
        self.status = 200
        self.hold = threading.Event()  # when cleared, requests wait (a hung exporter)
        self.hold.set()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                outer.hold.wait(timeout=30)
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(outer.body)))
                    self.end_headers()
                    self.wfile.write(outer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the timeout test)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, fixture: str) -> None:
        self.body = (DATA / fixture).read_bytes()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    e = Exporter()
    yield e
    e.close()


class ManualClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000 * S

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[DcgmCollector, SelfMetrics]]]:
    made: list[DcgmCollector] = []

    def _make(devices: Callable[[], list[GpuDevice]] | None = None, clock: Callable[[], int] = time.time_ns,
              environ: dict[str, str] | None = None, **cfg: object) -> tuple[DcgmCollector, SelfMetrics]:
        settings: dict[str, object] = {"period_s": 3600, "timeout_s": 2.0, "retry_initial_s": 0.02,
                                       "retry_max_s": 0.1}
        settings.update(cfg)
        m = SelfMetrics()
        c = DcgmCollector(DcgmConfig(**settings), devices=devices, metrics=m, clock=clock,  # type: ignore[arg-type]
                          environ=environ or {})
        made.append(c)
        return c, m

    yield _make
    for c in made:
        c.stop()


def test_profiling_fields_are_read_per_gpu(make, exporter: Exporter) -> None:
    exporter.serve("h100x2.prom")
    c, m = make(url=exporter.url)
    assert c.sample_now()
    assert m.get(COLLECTOR_UP, DCGM_UP) == 1
    w = c.device_window(H100_0, 0, 2**62)
    assert w is not None and w.samples == 1
    assert w.mean["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.873210)
    assert w.mean["DCGM_FI_PROF_SM_OCCUPANCY"] == pytest.approx(0.291874)
    assert w.mean["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == pytest.approx(0.412007)
    assert w.mean["DCGM_FI_PROF_DRAM_ACTIVE"] == pytest.approx(0.634518)
    assert w.mean["DCGM_FI_PROF_GR_ENGINE_ACTIVE"] == pytest.approx(0.981543)
    # whatever else the exporter serves is kept too
    assert w.mean["DCGM_FI_DEV_GPU_UTIL"] == 97
    assert w.mean["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 8911230981
    idle = c.device_window(H100_1, 0, 2**62)
    assert idle is not None and idle.mean["DCGM_FI_PROF_SM_ACTIVE"] == 0


def test_points_use_the_metric_set_and_label_gpus_not_pods(make, exporter: Exporter) -> None:
    exporter.serve("h100x2.prom")
    c, _ = make(url=exporter.url)
    c.sample_now()
    pts = c.points()
    sm = [p for p in pts if p.name == "hw.gpu.sm.active" and p.attributes["gpu.uuid"] == H100_0]
    assert len(sm) == 1
    assert sm[0].value == pytest.approx(0.873210)
    assert sm[0].prom_name == "hw_gpu_sm_active_ratio"
    assert sm[0].attributes == {
        "gpu.uuid": H100_0, "hw.id": H100_0, "gpu.index": "0", "gpu.name": "NVIDIA H100 80GB HBM3",
        "gpu.pci_bus_id": "00000000:18:00.0",
    }
    tensor = [p for p in pts if p.name == "hw.gpu.pipe.active" and p.attributes["gpu.uuid"] == H100_0]
    assert [(p.attributes["hw.gpu.pipe"], p.value) for p in tensor] == [("tensor", pytest.approx(0.412007))]
    names = {p.name for p in pts}
    assert names == {"hw.gpu.graphics_engine.active", "hw.gpu.sm.active", "hw.gpu.sm.occupancy",
                     "hw.gpu.pipe.active", "hw.gpu.dram.active"}
    assert all("k8s.pod.name" not in p.attributes and "pod" not in p.attributes for p in pts)


def test_mig_lines_join_to_mig_devices_through_nvml(make, exporter: Exporter) -> None:
    exporter.serve("a100_mig.prom")
    devices = [
        GpuDevice(A100, 0, "NVIDIA A100-SXM4-40GB", "00000000:07:00.0", True),
        GpuDevice("MIG-1", 0, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "00000000:07:00.0", False, A100, 1, 0),
        GpuDevice("MIG-5", 0, "NVIDIA A100-SXM4-40GB MIG 2g.10gb", "00000000:07:00.0", False, A100, 5, 0),
        # GPU instance 13 is not known to NVML: its lines cannot be joined
    ]
    c, m = make(devices=lambda: devices, url=exporter.url)
    c.sample_now()
    w1 = c.device_window("MIG-1", 0, 2**62)
    w5 = c.device_window("MIG-5", 0, 2**62)
    assert w1 is not None and w1.mean["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.7023)
    assert w5 is not None and w5.mean["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == 0
    assert c.device_window(A100, 0, 2**62) is None  # values belong to instances, not the parent
    assert m.get(MIG_UNRESOLVED) == 6  # six fields of GPU instance 13
    mig_points = [p for p in c.points() if p.attributes["gpu.uuid"] == "MIG-1"]
    assert mig_points and all(p.attributes["gpu.mig.gi_id"] == "1" for p in mig_points)


def test_malformed_lines_are_counted_and_good_lines_kept(make, exporter: Exporter) -> None:
    exporter.serve("malformed.prom")
    c, m = make(url=exporter.url)
    assert c.sample_now()
    assert m.get(PARSE_FAILURES, (("reason", "dcgm_exposition"),)) == 4
    w = c.device_window(H100_0, 0, 2**62)
    assert w is not None
    assert set(w.mean) == {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE"}
    assert c.device_window(H100_1, 0, 2**62) is not None


@pytest.mark.parametrize("text", [
    "", "\n\n", "# only a comment\n", "\x00\x01\x02", "DCGM_FI_PROF_SM_ACTIVE{UUID=\"GPU-x\"",
    "DCGM_FI_PROF_SM_ACTIVE{UUID=\"GPU-x\"} one\n", "{{{{}}}}\n", "# TYPE\n# HELP\n", "a" * 10000,
])
def test_parser_never_raises_on_hostile_text(text: str) -> None:
    m = SelfMetrics()
    assert parse_exposition(text, m) == []


def test_parser_survives_every_truncation_of_a_real_response() -> None:
    text = (DATA / "h100x2.prom").read_text()
    m = SelfMetrics()
    full = parse_exposition(text, m)
    assert len(full) == 2 * 17
    for cut in range(0, len(text), 97):
        got = parse_exposition(text[:cut], m)
        assert len(got) <= len(full)


def test_oversized_response_is_cut_at_a_line_boundary_and_counted(make, exporter: Exporter) -> None:
    exporter.serve("h100x2.prom")
    body = exporter.body
    limit = body.index(b"DCGM_FI_DEV_MEM_CLOCK{gpu=\"1\"") + 20  # mid-line
    c, m = make(url=exporter.url, max_response_bytes=limit)
    assert c.sample_now()
    assert m.get(TRUNCATED) == 1
    assert m.get(PARSE_FAILURES, (("reason", "dcgm_exposition"),)) == 0  # the cut line was dropped whole
    w = c.device_window(H100_0, 0, 2**62)
    assert w is not None and set(w.mean) == {"DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK"}
    w1 = c.device_window(H100_1, 0, 2**62)
    assert w1 is not None and set(w1.mean) == {"DCGM_FI_DEV_SM_CLOCK"}


def test_window_mean_and_max_over_scrapes_and_staleness(make, exporter: Exporter) -> None:
    clock = ManualClock()
    c, _ = make(url=exporter.url, clock=clock, period_s=10)
    t0 = clock.t
    for i, v in enumerate(["0.2", "0.4", "0.9"]):
        exporter.body = f'DCGM_FI_PROF_SM_ACTIVE{{gpu="0",UUID="{H100_0}"}} {v}\n'.encode()
        clock.t = t0 + i * 10 * S
        assert c.sample_now()
    w = c.device_window(H100_0, t0, t0 + 20 * S)
    assert w is not None and w.samples == 3
    assert w.mean["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.5)
    assert w.max["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.9)
    assert c.points()
    clock.t = t0 + 20 * S + 31 * S  # more than 3 periods after the last scrape
    assert c.points() == []


def test_unreachable_exporter_degrades_logs_once_and_recovers(make, exporter: Exporter,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collectors.dcgm")
    exporter.serve("h100x2.prom")
    exporter.status = 503
    c, m = make(url=exporter.url, period_s=0.05)
    c.start()
    wait_for(lambda: m.get(RETRIES, DCGM_UP) >= 3)
    assert m.get(COLLECTOR_UP, DCGM_UP) == 0
    assert c.points() == []
    logged = [r for r in caplog.records if r.name == "collectors.dcgm" and r.levelno >= logging.WARNING]
    assert len(logged) == 1 and "503" in logged[0].getMessage()
    exporter.status = 200
    wait_for(lambda: m.get(COLLECTOR_UP, DCGM_UP) == 1)
    wait_for(lambda: bool(c.points()))
    assert len([r for r in caplog.records if r.name == "collectors.dcgm" and r.levelno >= logging.WARNING]) == 1


def test_hung_exporter_times_out(make, exporter: Exporter) -> None:
    exporter.serve("h100x2.prom")
    exporter.hold.clear()
    c, m = make(url=exporter.url, timeout_s=0.2)
    started = time.monotonic()
    assert not c.sample_now()
    assert time.monotonic() - started < 5
    assert m.get(COLLECTOR_UP, DCGM_UP) == 0
    exporter.hold.set()


def test_non_http_answer_is_a_counted_failure(make) -> None:
    class Garbage(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(4096)
            self.request.sendall(b"\x15\x03\x01\x00\x02\x02\x28 not http at all\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Garbage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        c, m = make(url=f"http://127.0.0.1:{server.server_address[1]}/metrics")
        assert not c.sample_now()
        assert m.get(COLLECTOR_UP, DCGM_UP) == 0
        assert m.total(SCRAPE_FAILURES) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_discovery_tries_localhost_then_node_ip() -> None:
    # The exporter listens on 127.0.0.2 only: 127.0.0.1 refuses, $NODE_IP answers.
    exporter = Exporter(host="127.0.0.2")
    try:
        exporter.serve("h100x2.prom")
        m = SelfMetrics()
        c = DcgmCollector(DcgmConfig(port=exporter.port), metrics=m, environ={"NODE_IP": "127.0.0.2"})
        assert c.candidate_urls() == [f"http://127.0.0.1:{exporter.port}/metrics", exporter.url]
        assert c.sample_now()
        assert c.url == exporter.url
        assert c.device_window(H100_0, 0, 2**62) is not None
        assert DcgmCollector(DcgmConfig(), environ={}).candidate_urls() == ["http://127.0.0.1:9400/metrics"]
        assert DcgmCollector(DcgmConfig(url="http://x:1/m"), environ={"NODE_IP": "10.0.0.1"}).candidate_urls() == [
            "http://x:1/m"]
    finally:
        exporter.close()
