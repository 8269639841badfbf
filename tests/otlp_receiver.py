"""A real OTLP receiver for tests: gRPC (TraceService, MetricsService) and HTTP/protobuf.

Built from ``opentelemetry-proto``'s generated messages and grpcio stubs; it
keeps every request it receives so tests can assert on the wire data, exactly
as a collector would see it. It runs in the test process on its own threads
(a process boundary in all but name: the exporter reaches it over a socket).

    with GrpcReceiver() as rx:
        ... export to f"http://127.0.0.1:{rx.port}" ...
        spans = rx.wait_spans(lambda s: len(s) >= 3)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attrs(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    """Protobuf ``KeyValue`` list -> plain dict."""
    return {kv.key: any_value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


class Collected:
    """What a receiver has seen. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def add_traces(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._cond:
            self.trace_requests.append(req)
            self._cond.notify_all()

    def add_metrics(self, req: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._cond:
            self.metric_requests.append(req)
            self._cond.notify_all()

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every span received, with its resource attributes."""
        with self._cond:
            reqs = list(self.trace_requests)
        out: list[tuple[dict[str, Any], Span]] = []
        for req in reqs:
            for rs in req.resource_spans:
                res = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out.extend((res, s) for s in ss.spans)
        return out

    def metrics(self) -> list[tuple[dict[str, Any], Metric]]:
        """Every metric of every export request, oldest first, with its resource attributes."""
        with self._cond:
            reqs = list(self.metric_requests)
        out: list[tuple[dict[str, Any], Metric]] = []
        for req in reqs:
            for rm in req.resource_metrics:
                res = attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    out.extend((res, m) for m in sm.metrics)
        return out

    def latest_metric(self, name: str) -> Metric | None:
        found = [m for _, m in self.metrics() if m.name == name]
        return found[-1] if found else None

    def wait(self, ready: Callable[[Collected], bool], timeout: float = 20.0) -> bool:
        """Block until ``ready(self)`` or the timeout; polls on every arrival (no blind sleep)."""
        deadline = time.monotonic() + timeout
        while not ready(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                # An arrival wakes us; the short cap covers one landing between check and wait.
                self._cond.wait(timeout=min(left, 0.5))
        return True


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Collected) -> None:
        self._sink = sink

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self._sink.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: Collected) -> None:
        self._sink = sink

    def Export(self, request: Any, context: Any) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._sink.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcReceiver(Collected):
    """OTLP/gRPC receiver on 127.0.0.1:``port`` (a free one by default). ``stop``/``start`` may repeat."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self._server: grpc.Server | None = None

    def start(self) -> GrpcReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        bound = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if bound != self.port:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> GrpcReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HttpReceiver(Collected):
    """OTLP/HTTP receiver (protobuf bodies at ``/v1/traces`` and ``/v1/metrics``)."""

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
        self.content_types: list[str] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.content_types.append(self.headers.get("Content-Type", ""))
                if self.path == "/v1/traces":
                    tr = trace_service_pb2.ExportTraceServiceRequest()
                    tr.ParseFromString(body)
                    sink.add_traces(tr)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    mr = metrics_service_pb2.ExportMetricsServiceRequest()
                    mr.ParseFromString(body)
                    sink.add_metrics(mr)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
