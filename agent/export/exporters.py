"""``Exporters``: the metric state, the Prometheus endpoint and OTLP, behind one ``Sink``.

The pipeline builds one :class:`Exporters` from an :class:`ExportConfig` and
calls :meth:`Exporters.emit` for every completed record. Per record: pick the
trace and span ids (the record's, from a client ``traceparent``, else fresh),
decide sampling, build the span if kept, then count the record in every metric
instrument, lending the span's ids to exemplars only when the span was kept.

Threading: ``emit`` is called from one pipeline thread and never blocks on I/O
(spans are queued; the metric state is in memory). The Prometheus server,
the span exporter and the metric pusher run on their own daemon threads.
``flush`` and ``shutdown`` may block up to the OTLP timeout.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.export.instruments import ActiveSource, MetricState, PointSource, SpanRef
from agent.export.otlp import (
    BoundedSpanProcessor,
    MetricPusher,
    SpanBuilder,
    build_resource,
    make_exporters,
    resolve_endpoint,
)
from agent.export.prometheus import PrometheusServer
from agent.export.routes import AttributeBounds, BoundsConfig
from agent.export.sampling import Sampler
from agent.record import Request, parse_hex_id
from agent.selfmetrics import SELF_METRICS, SelfMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """Export settings; validated by :meth:`validate` (called by ``Exporters``)."""

    #: OTLP base URL (``http://collector:4317``); None reads OTEL_EXPORTER_OTLP_ENDPOINT; "" turns OTLP off.
    otlp_endpoint: str | None = None
    #: "grpc" or "http/protobuf"; None reads OTEL_EXPORTER_OTLP_PROTOCOL, else "grpc".
    otlp_protocol: str | None = None
    #: per-export deadline, retries within it included (seconds).
    otlp_timeout_s: float = 10.0
    #: how often metrics are pushed over OTLP (seconds).
    otlp_metrics_interval_s: float = 15.0
    #: spans waiting for export at most; more are dropped and counted.
    span_queue_size: int = 2048
    #: spans per OTLP export request at most.
    span_batch_size: int = 512
    #: longest a span waits in the queue before a partial batch is sent (seconds).
    span_flush_interval_s: float = 1.0
    #: longest pause between export attempts while the backend is down (seconds).
    retry_backoff_max_s: float = 30.0
    #: attempts per span batch before its spans count as failed.
    span_export_attempts: int = 3
    #: Prometheus endpoint port; 0 disables it.
    prometheus_port: int = 9464
    #: address the Prometheus endpoint binds.
    prometheus_host: str = "0.0.0.0"
    #: share of ordinary requests kept as spans; errors, aborts and slow requests are always kept.
    sample_ratio: float = 1.0
    #: a request at least this long is always kept as a span (seconds).
    slow_threshold_s: float = 30.0
    #: histogram bounds by OTel instrument name, replacing the defaults in ``instruments.py``.
    buckets: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    #: distinct model names on metrics; later ones become "other".
    model_cap: int = 64
    #: distinct routes on metrics; later ones become "other".
    route_cap: int = 128
    #: distinct values per k8s.* metric label.
    k8s_cap: int = 512
    #: label sets per collector (GPU/CUDA) metric.
    point_series_cap: int = 2048
    #: distinct rpc.system, rpc.service, rpc.method and server.port values each on RPC metrics.
    rpc_cap: int = 128
    #: label sets per request instrument; later ones fold into one "other" series.
    max_series: int = 4096
    #: service.name; None reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else "infersight".
    service_name: str | None = None

    def validate(self) -> None:
        """Raises ValueError on a setting that cannot work."""
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {self.sample_ratio}")
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port out of range: {self.prometheus_port}")
        for name, value in (
            ("span_queue_size", self.span_queue_size),
            ("span_batch_size", self.span_batch_size),
            ("model_cap", self.model_cap),
            ("route_cap", self.route_cap),
            ("k8s_cap", self.k8s_cap),
            ("point_series_cap", self.point_series_cap),
            ("rpc_cap", self.rpc_cap),
            ("max_series", self.max_series),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, bounds in self.buckets.items():
            if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
                raise ValueError(f"buckets for {name} must be non-empty and increasing: {bounds}")
        resolve_endpoint(self.otlp_endpoint, self.otlp_protocol)


class Exporters:
    """Every metric and trace exporter, fed by :meth:`emit`. Implements ``agent.export.Sink``.

    Construction starts the Prometheus endpoint (if ``prometheus_port``) and the
    OTLP threads (if an endpoint is configured); it raises ValueError on a bad
    config, never on an unreachable backend or a busy port (those degrade, counted).
    """

    def __init__(
        self,
        config: ExportConfig = ExportConfig(),
        metrics: SelfMetrics = SELF_METRICS,
        rng: random.Random | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._metrics = metrics
        self._rng = rng or random.Random()
        self.bounds = AttributeBounds(
            BoundsConfig(
                config.model_cap, config.route_cap, config.k8s_cap, config.point_series_cap, config.rpc_cap
            ),
            metrics,
        )
        self.state = MetricState(self.bounds, config.buckets, config.max_series, metrics)
        self.sampler = Sampler(config.sample_ratio, config.slow_threshold_s, metrics, self._rng)
        self.resource = build_resource(config.service_name)
        self.prometheus: PrometheusServer | None = None
        if config.prometheus_port:
            self.prometheus = PrometheusServer(self.state, config.prometheus_host, metrics)
            if not self.prometheus.start(config.prometheus_port):
                self.prometheus = None
        self.spans: SpanBuilder | None = None
        self.span_processor: BoundedSpanProcessor | None = None
        self.metric_pusher: MetricPusher | None = None
        target = resolve_endpoint(config.otlp_endpoint, config.otlp_protocol)
        if target is not None:
            endpoint, protocol = target
            span_exporter, metric_exporter = make_exporters(endpoint, protocol, config.otlp_timeout_s)
            self.span_processor = BoundedSpanProcessor(
                span_exporter,
                config.span_queue_size,
                config.span_batch_size,
                config.span_flush_interval_s,
                config.retry_backoff_max_s,
                metrics,
                config.span_export_attempts,
            )
            self.spans = SpanBuilder(self.resource, self.span_processor, metrics)
            self.metric_pusher = MetricPusher(
                self.state, metric_exporter, self.resource, config.otlp_metrics_interval_s, metrics
            )
            log.info("OTLP export to %s over %s", endpoint, protocol)

    @property
    def prometheus_port(self) -> int | None:
        """The bound Prometheus port (useful with port 0 in tests), or None."""
        return self.prometheus.port if self.prometheus else None

    def set_active_source(self, fn: ActiveSource | None) -> None:
        """``fn()`` lists in-flight requests; called at each collection, from exporter threads."""
        self.state.set_active_source(fn)

    def add_point_source(self, fn: PointSource) -> None:
        """``fn()`` yields ``MetricPointLike`` objects (GPU, CUDA); called at each collection."""
        self.state.add_point_source(fn)

    def emit(self, record: Request) -> None:
        """Export ``record``: a span if sampled, and every metric. Never raises, never blocks on I/O."""
        try:
            exemplar = None
            if self.spans is not None:  # with no span export, there is nothing to sample
                trace_id = parse_hex_id(record.trace_id, 16) or self._rng.getrandbits(128) or 1
                span_id = parse_hex_id(record.span_id, 8) or self._rng.getrandbits(64) or 1
                if self.sampler.decide(record, trace_id).keep:
                    self.spans.emit(record, trace_id, span_id)
                    # Only an exported span lends its ids: an exemplar must lead to a trace that exists.
                    exemplar = SpanRef(f"{trace_id:032x}", f"{span_id:016x}")
            self.state.record(record, exemplar)
        except Exception:  # a bad record loses itself, never the pipeline
            self._metrics.inc("infersight.export.record.errors")
            log.exception("exporting a record failed")

    def flush(self) -> None:
        """Send queued spans and push metrics now (blocks up to the OTLP timeout)."""
        if self.span_processor is not None:
            self.span_processor.force_flush(int(self.config.otlp_timeout_s * 1000) + 1000)
        if self.metric_pusher is not None:
            self.metric_pusher.push()

    def shutdown(self) -> None:
        """Stop every thread and the endpoint; pending spans get one last export attempt."""
        if self.spans is not None:
            self.spans.shutdown()  # shuts the span processor down too
        if self.metric_pusher is not None:
            self.metric_pusher.shutdown()
        if self.prometheus is not None:
            self.prometheus.stop()
