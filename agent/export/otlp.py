"""OTLP export: one SERVER span per request, and the shared metric state, over gRPC or HTTP/protobuf.

An HTTP request's span is named ``"{METHOD} {route}"``; an RPC's (``rpc.system``
set, see ``rpc.py``) ``"{rpc.service}/{rpc.method}"``, with its ``rpc.*``
attributes and ERROR status for the gRPC codes semconv calls server errors.

Spans are built after the fact with the OpenTelemetry SDK:
``tracer.start_span(name, start_time=ns)`` then ``span.end(end_time=ns)``, with
the record's trace and span ids (a client ``traceparent`` makes the span a child
in the client's trace). Sampling is decided before (``sampling.py``), so the
SDK samples everything it is given.

Delivery is ours, not the SDK's ``BatchSpanProcessor``: that one drops silently
when its queue is full and cannot say how many spans failed.
:class:`BoundedSpanProcessor` keeps a bounded queue, exports batches from one
thread, backs off exponentially while the backend is down and counts every span
in ``infersight.export.spans`` by outcome (``exported``, ``failed``,
``dropped``). Metrics are pushed by :class:`MetricPusher` every interval as
cumulative OTLP data; a failed push is counted in ``infersight.export.metrics``
and the next push carries the totals, so nothing is lost but resolution.

Configuration follows the OTel environment: ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or ``http/protobuf``),
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT`` (read by the SDK
exporters), ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from agent.export.instruments import HistogramPoint, MetricSnapshot, MetricState, ScalarPoint
from agent.export.routes import REFUSED, bound_method, is_body_attribute, strip_query, template_route
from agent.export.rpc import error_type, span_name
from agent.record import Request, parse_hex_id
from agent.selfmetrics import SELF_METRICS, SelfMetrics

log = logging.getLogger(__name__)

SPANS = "infersight.export.spans"
METRICS = "infersight.export.metrics"
QUEUED = "infersight.export.spans.queued"
RETRIES = "infersight.export.spans.attempts.failed"
SCOPE = "infersight"
PROTOCOLS = ("grpc", "http/protobuf")

# The SDK exporters log every failed attempt; under a long outage that is one
# error line per batch. We log state changes (down, back) ourselves.
_SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http",
)


def resolve_endpoint(
    endpoint: str | None, protocol: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[str, str] | None:
    """``(base endpoint, protocol)`` from the flags, else the environment; None when OTLP is off.

    An empty ``endpoint`` turns OTLP off even when the environment names one.
    Raises ValueError for an unknown protocol.
    """
    ep = endpoint if endpoint is not None else environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not ep:
        return None
    proto = protocol or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if proto not in PROTOCOLS:
        raise ValueError(f"OTLP protocol must be one of {PROTOCOLS}, got {proto!r}")
    if "://" not in ep:
        ep = "http://" + ep
    return ep.rstrip("/"), proto


def build_resource(service_name: str | None = None, environ: Mapping[str, str] = os.environ) -> Resource:
    """``service.name`` (default "infersight"), ``host.name``, ``k8s.node.name`` (``NODE_NAME``),
    overridden by ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``; ``service_name`` wins over all.
    """
    attrs: dict[str, Any] = {"service.name": "infersight", "host.name": socket.gethostname()}
    node = environ.get("NODE_NAME")
    if node:
        attrs["k8s.node.name"] = node
    res = Resource(attrs).merge(_env_resource(environ))
    if service_name:
        res = res.merge(Resource({"service.name": service_name}))
    return res


def _env_resource(environ: Mapping[str, str]) -> Resource:
    # OTEL_RESOURCE_ATTRIBUTES is "k=v,k2=v2" with percent-encoded values (OTel SDK environment spec).
    attrs: dict[str, Any] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attrs[key.strip()] = urllib.parse.unquote(value.strip())
    if environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = environ["OTEL_SERVICE_NAME"]
    return Resource(attrs)


def make_exporters(endpoint: str, protocol: str, timeout_s: float) -> tuple[SpanExporter, MetricExporter]:
    """SDK OTLP exporters for ``endpoint`` (a base URL). Headers come from the environment."""
    for name in _SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        insecure = not endpoint.startswith("https://")
        return (
            GrpcSpans(endpoint=endpoint, insecure=insecure, timeout=timeout_s),
            GrpcMetrics(endpoint=endpoint, insecure=insecure, timeout=timeout_s),
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return (
        HttpSpans(endpoint=endpoint + "/v1/traces", timeout=timeout_s),
        HttpMetrics(endpoint=endpoint + "/v1/metrics", timeout=timeout_s),
    )


class _Outage:
    """Logs "backend down" once per outage and "back" once when it ends. Thread-compatible."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.down = False

    def failed(self, detail: str) -> None:
        if not self.down:
            self.down = True
            log.warning(
                "OTLP %s export failing, retrying with backoff (logged once per outage): %s",
                self._what,
                detail,
            )

    def ok(self) -> None:
        if self.down:
            self.down = False
            log.info("OTLP %s export resumed", self._what)


class BoundedSpanProcessor(SpanProcessor):
    """Queues ended spans (at most ``queue_size``) and exports them in batches from one thread.

    ``on_end`` never blocks: a full queue drops the span and counts it. A batch
    whose export fails (after the SDK exporter's own retries within its timeout)
    is held and tried again after a backoff (doubling up to ``backoff_max_s``),
    at most ``attempts`` times, then counted as failed; new spans queue meanwhile.
    Memory is therefore bounded by ``queue_size + batch_size`` spans. An outage
    costs little CPU; the first success resets the backoff.

    Every span ends in exactly one outcome of ``infersight.export.spans``:
    ``exported``, ``failed`` (gave up) or ``dropped`` (queue full, or shutdown
    while the backend is down); ``infersight.export.spans.queued`` counts those
    not yet decided. ``force_flush`` and ``shutdown`` may block up to their timeouts.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        queue_size: int = 2048,
        batch_size: int = 512,
        interval_s: float = 1.0,
        backoff_max_s: float = 30.0,
        metrics: SelfMetrics = SELF_METRICS,
        attempts: int = 3,
    ) -> None:
        self._exporter = exporter
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._backoff_max_s = backoff_max_s
        self._attempts = max(1, attempts)
        self._metrics = metrics
        self._cond = threading.Condition()
        self._stop = False
        self._flush_requests = 0
        self._flushed = 0
        self._outage = _Outage("span")
        self._inflight = 0
        metrics.describe(
            SPANS,
            "counter",
            "Spans by export outcome: exported, failed (gave up after retries), dropped (queue full)",
        )
        metrics.gauge_callback(
            QUEUED, self._queued, "Spans waiting for export, the batch being retried included"
        )
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
        self._thread.start()

    def _queued(self) -> dict[tuple[tuple[str, str], ...], float]:
        # Queued plus the batch being exported or retried: spans not yet counted by outcome.
        return {(): float(len(self._queue) + self._inflight)}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            if self._stop or len(self._queue) >= self._queue_size:
                self._metrics.inc(SPANS, labels=(("outcome", "dropped"),))
                return
            self._queue.append(span)
            if len(self._queue) >= self._batch_size:
                self._cond.notify()

    def _run(self) -> None:
        backoff = 0.0
        batch: list[ReadableSpan] = []  # a failed batch waiting for its next attempt
        tries = 0
        while True:
            with self._cond:
                if backoff:
                    # Wait out the backoff unless shutting down; new spans do not wake us.
                    self._cond.wait_for(lambda: self._stop, timeout=backoff)
                else:
                    self._cond.wait_for(
                        lambda: (
                            self._stop
                            or len(self._queue) >= self._batch_size
                            or self._flush_requests > self._flushed
                        ),
                        timeout=self._interval_s,
                    )
                if self._stop and not self._queue and not batch:
                    self._flushed = self._flush_requests
                    self._cond.notify_all()
                    return
                if not batch:
                    batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                    tries = 0
                self._inflight = len(batch)
                flush_target = self._flush_requests
            if batch:
                tries += 1
                if self._export(batch):
                    batch, backoff = [], 0.0
                else:
                    backoff = min(self._backoff_max_s, max(0.5, backoff * 2))
                    if tries >= self._attempts or self._stop:
                        self._metrics.inc(SPANS, len(batch), labels=(("outcome", "failed"),))
                        batch = []
                        if self._stop:
                            # Shutting down with the backend down: the rest is dropped, counted.
                            with self._cond:
                                rest = len(self._queue)
                                self._queue.clear()
                            if rest:
                                self._metrics.inc(SPANS, rest, labels=(("outcome", "dropped"),))
            with self._cond:
                self._inflight = len(batch)
                if (not self._queue and not batch) or backoff:
                    self._flushed = max(self._flushed, flush_target)
                    self._cond.notify_all()

    def _export(self, batch: Sequence[ReadableSpan]) -> bool:
        """One export attempt; counts ``exported`` on success. Never raises."""
        try:
            result = self._exporter.export(batch)
        except Exception as exc:  # an exporter bug must not kill the worker
            result = SpanExportResult.FAILURE
            detail = repr(exc)
        else:
            detail = "backend unavailable"
        if result == SpanExportResult.SUCCESS:
            self._metrics.inc(SPANS, len(batch), labels=(("outcome", "exported"),))
            self._outage.ok()
            return True
        self._metrics.inc(RETRIES)
        self._outage.failed(detail)
        return False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._cond:
            self._flush_requests += 1
            target = self._flush_requests
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._flushed >= target, timeout=timeout_millis / 1000)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._exporter.shutdown()


class _PresetIds(IdGenerator):
    """Hands the SDK the ids chosen before the span exists (the record's, or fresh ones).

    Only used under :class:`SpanBuilder`'s lock, so a preset id is consumed by
    the span it was set for.
    """

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0
        self._random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        return self.trace_id or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        return self.span_id or self._random.generate_span_id()


def span_attributes(r: Request, metrics: SelfMetrics = SELF_METRICS) -> dict[str, Any]:
    """The span attributes of a record, per OTel HTTP, RPC and GenAI semconv.

    An RPC record's ``rpc.*`` attributes come from ``r.attributes`` as the parser
    set them; its ``:method``, ``:path`` and ``:status`` stay as the HTTP
    transport attributes.

    Bodies are never read; a content-carrying attribute added by a later stage
    (``gen_ai.prompt``, ``http.request.body.*``, ...) is refused and counted in
    ``infersight.export.attributes.refused``.
    """
    a: dict[str, Any] = {}
    method, other = bound_method(r.method)
    if method:
        a["http.request.method"] = method
        if other:
            a["http.request.method_original"] = r.method
    route = template_route(r.path)
    if route:
        a["http.route"] = route
    if r.path:
        # url.path excludes the query (semconv); query strings may carry secrets and are never exported.
        a["url.path"] = strip_query(r.path)
    _put(a, "http.response.status_code", r.status_code)
    _put(a, "server.port", r.server_port)
    _put(a, "client.address", r.client_address)
    _put(a, "client.port", r.client_port)
    _put(a, "process.pid", r.pid)
    _put(a, "process.command", r.command or None)
    _put(a, "gen_ai.operation.name", r.operation)
    _put(a, "gen_ai.request.model", r.request_model)
    _put(a, "gen_ai.response.model", r.response_model)
    _put(a, "gen_ai.usage.input_tokens", r.input_tokens)
    _put(a, "gen_ai.usage.output_tokens", r.output_tokens)
    if r.finish_reasons:
        a["gen_ai.response.finish_reasons"] = list(r.finish_reasons)
    _put(a, "gen_ai.server.time_to_first_token", r.time_to_first_token_s)
    _put(a, "gen_ai.server.time_per_output_token", r.time_per_output_token_s)
    _put(a, "infersight.output_events", r.output_events)
    a["infersight.streaming"] = r.streaming
    if r.aborted:
        a["infersight.aborted"] = True
    _put(a, "error.type", error_type(r))
    for k, v in r.attributes.items():
        if is_body_attribute(k):
            metrics.inc(REFUSED, labels=(("attribute", k[:64]),))
            continue
        a[k] = _attr_value(v)
    return a


def _put(a: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        a[key] = value


def _attr_value(v: Any) -> Any:
    if isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple) and all(isinstance(x, bool | int | float | str) for x in v):
        return list(v)
    return str(v)


class SpanBuilder:
    """Turns records into SDK spans on a :class:`TracerProvider` whose processor exports them.

    Thread-safe (one lock around span creation, which is CPU only). ``emit`` does
    not block on I/O: ending a span only enqueues it.
    """

    def __init__(
        self, resource: Resource, processor: SpanProcessor, metrics: SelfMetrics = SELF_METRICS
    ) -> None:
        self._metrics = metrics
        self._ids = _PresetIds()
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=self._ids)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer(SCOPE)
        self._lock = threading.Lock()

    def emit(self, r: Request, trace_id: int, span_id: int) -> None:
        name = span_name(r)
        if name is None:
            method, other = bound_method(r.method)
            route = template_route(r.path)
            name_method = "HTTP" if other or not method else method
            name = f"{name_method} {route}" if route else name_method
        kind = SpanKind.CLIENT if r.span_kind == "client" else SpanKind.SERVER
        parent_id = parse_hex_id(r.parent_span_id, 8)
        ctx = None
        if parent_id and parse_hex_id(r.trace_id, 16):
            parent = SpanContext(
                trace_id, parent_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
            )
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        with self._lock:
            self._ids.trace_id, self._ids.span_id = trace_id, span_id
            try:
                span = self._tracer.start_span(
                    name,
                    context=ctx,
                    kind=kind,
                    attributes=span_attributes(r),
                    start_time=r.start_time_unix_nano,
                )
            finally:
                self._ids.trace_id = self._ids.span_id = 0
        if r.first_token_time_unix_nano is not None:
            span.add_event("gen_ai.first_token", timestamp=r.first_token_time_unix_nano)
        if error_type(r) is not None:
            span.set_status(Status(StatusCode.ERROR, r.error_type or None))
        span.end(end_time=max(r.end_time_unix_nano, r.start_time_unix_nano))

    def shutdown(self) -> None:
        self.provider.shutdown()


# -- metrics ---------------------------------------------------------------------------------------


def metrics_data(
    snapshots: list[MetricSnapshot], resource: Resource, now_ns: int | None = None
) -> MetricsData:
    """The SDK ``MetricsData`` (cumulative) for ``snapshots``; the OTLP exporters encode it."""
    now = now_ns or time.time_ns()
    out: list[Metric] = []
    seen: set[str] = set()
    for snap in snapshots:
        inst = snap.instrument
        if inst.name in seen:
            continue
        seen.add(inst.name)
        data: Any
        if inst.kind == "histogram":
            hpoints = []
            for p in snap.points:
                assert isinstance(p, HistogramPoint)
                exemplars = [
                    Exemplar(
                        {},
                        e.value,
                        e.time_unix_nano,
                        span_id=int(e.span_id, 16),
                        trace_id=int(e.trace_id, 16),
                    )
                    for e in p.exemplars
                    if e is not None
                ]
                hpoints.append(
                    HistogramDataPoint(
                        attributes=_otel_attrs(inst.attributes, p.labels),
                        start_time_unix_nano=snap.start_time_unix_nano,
                        time_unix_nano=now,
                        count=p.count,
                        sum=p.sum,
                        bucket_counts=list(p.bucket_counts),
                        explicit_bounds=list(inst.buckets),
                        min=p.min,
                        max=p.max,
                        exemplars=exemplars,
                    )
                )
            data = Histogram(data_points=hpoints, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        else:
            npoints = []
            for sp in snap.points:
                assert isinstance(sp, ScalarPoint)
                npoints.append(
                    NumberDataPoint(
                        attributes=_otel_attrs(inst.attributes, sp.labels),
                        start_time_unix_nano=snap.start_time_unix_nano,
                        time_unix_nano=now,
                        value=sp.value,
                    )
                )
            if inst.kind == "counter":
                data = Sum(npoints, AggregationTemporality.CUMULATIVE, is_monotonic=True)
            elif inst.kind == "updowncounter":
                data = Sum(npoints, AggregationTemporality.CUMULATIVE, is_monotonic=False)
            else:
                data = Gauge(npoints)
        out.append(Metric(name=inst.name, description=inst.description, unit=inst.unit, data=data))
    scope = ScopeMetrics(scope=InstrumentationScope(SCOPE), metrics=out, schema_url="")
    return MetricsData([ResourceMetrics(resource=resource, scope_metrics=[scope], schema_url="")])


# Attributes semconv types as int; metric labels hold them as strings ("other" when folded stays one).
_INT_ATTRIBUTES = frozenset({"http.response.status_code", "rpc.grpc.status_code", "server.port"})


def _otel_attrs(keys: tuple[str, ...], values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in zip(keys, values, strict=True):
        if v == "":
            continue
        if k in _INT_ATTRIBUTES and v.isdigit():
            out[k] = int(v)
        else:
            out[k] = v
    return out


class MetricPusher:
    """Pushes the metric state to OTLP every ``interval_s`` from its own thread.

    A failed push is counted (``infersight.export.metrics`` outcome=failed) and
    logged once per outage; the next push carries the cumulative totals. ``push``
    may block up to the exporter timeout; ``shutdown`` pushes once more only if
    records arrived since the last successful push (a repeat adds nothing).
    """

    def __init__(
        self,
        state: MetricState,
        exporter: MetricExporter,
        resource: Resource,
        interval_s: float = 15.0,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        self._state = state
        self._exporter = exporter
        self._resource = resource
        self._interval_s = interval_s
        self._metrics = metrics
        self._stop = threading.Event()
        self._push_lock = threading.Lock()
        self._pushed_generation = -1
        self._outage = _Outage("metric")
        metrics.describe(METRICS, "counter", "OTLP metric pushes by outcome: exported, failed")
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.push()

    def push(self) -> bool:
        with self._push_lock:
            generation = self._state.generation
            try:
                data = metrics_data(self._state.collect(), self._resource)
                result = self._exporter.export(data, timeout_millis=self._interval_s * 1000)
                ok = result == MetricExportResult.SUCCESS
                detail = "backend unavailable"
            except Exception as exc:
                ok, detail = False, repr(exc)
            self._metrics.inc(METRICS, labels=(("outcome", "exported" if ok else "failed"),))
            if ok:
                self._pushed_generation = generation
                self._outage.ok()
            else:
                self._outage.failed(detail)
            return ok

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._state.generation != self._pushed_generation:
            self.push()
        self._exporter.shutdown()
