"""Every metric instrument, defined once, and the one aggregation both exporters read.

The instrument table (:data:`INSTRUMENTS`) is data: OTel name, kind, unit,
description, Prometheus name, attribute keys and default buckets. Dashboards,
KEDA queries and ``docs/metrics.md`` know metric names only through it, and a
test checks the document against it.

:class:`MetricState` records each :class:`~agent.record.Request` into
cumulative series (histogram buckets with one exemplar per bucket, counters),
and :meth:`MetricState.collect` returns an immutable snapshot of everything the
agent exports as metrics: the request instruments, the in-flight gauge (computed
from the active-request source at collection time), ``infersight.up``, every
``SELF_METRICS`` sample, the process CPU and RSS, and the points of registered
collector sources (GPU, CUDA). The Prometheus collector and the OTLP metric
exporter both render that snapshot, so the two paths cannot disagree.

Why our own aggregation rather than the OTel SDK ``MeterProvider``: the SDK's
Prometheus reader writes no exemplars, and its exemplar reservoir takes the
trace from the *current context*, while here spans are built after the fact
and only sampled requests may lend their trace id. Owning the buckets also
makes the memory bound explicit (series caps below) and avoids the SDK's
double export on ``force_flush`` + ``shutdown``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from agent.export.routes import K8S_LABEL_KEYS, OTHER, AttributeBounds, label_name, point_labels
from agent.export.rpc import (
    RPC_METHOD,
    RPC_SERVICE,
    RPC_SYSTEM,
    error_type,
    grpc_status_code,
    rpc_system,
)
from agent.record import ActiveRequest, Request
from agent.selfmetrics import SELF_METRICS, SelfMetrics

log = logging.getLogger(__name__)
_bisect_left: Final = bisect.bisect_left  # Final: compiled, no module attribute lookup per call

# Buckets fit LLM serving. Request durations reach minutes (long generations,
# reasoning models); vLLM's own e2e buckets go to 7680 s. TTFT starts at 1 ms
# (prefix-cache hits on small prompts) and, as vLLM's, reaches far past 60 s for
# queued requests. Token counts are powers of 4, as the GenAI semconv advises.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
    1280.0,
)  # fmt: skip
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
TPOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# rpc.server.duration is in milliseconds (semconv RPC metrics up to v1.37; see RPC_DURATION). Its
# bounds are the request-duration bounds in ms, so HTTP and gRPC latencies line up bucket for bucket,
# plus 1 and 2.5 ms below them: classic (non-LLM) models served over Triton's gRPC answer in a few ms.
RPC_DURATION_BUCKETS_MS: tuple[float, ...] = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0, 40000.0,
    80000.0, 160000.0, 320000.0, 640000.0, 1280000.0,
)  # fmt: skip
TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
)  # fmt: skip

_K8S = K8S_LABEL_KEYS


@dataclass(frozen=True, slots=True)
class Instrument:
    """One metric: how it is named, typed and labelled on both export paths."""

    name: str  # OTel name, e.g. "gen_ai.server.time_to_first_token"
    kind: str  # "histogram", "counter", "updowncounter" or "gauge"
    unit: str  # UCUM, as OTel wants it ("s", "{token}", "By", "1")
    description: str
    prom_name: str  # the exposition name (counters with "_total", histograms without "_bucket")
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label_name(a) for a in self.attributes)


HTTP_DURATION = Instrument(
    "http.server.request.duration", "histogram", "s", "Duration of HTTP server requests, from the wire.",
    "http_server_request_duration_seconds",
    ("http.request.method", "http.route", "http.response.status_code", "error.type", *_K8S), DURATION_BUCKETS,
)  # fmt: skip
# The RPC server duration as OTel semconv defined it up to v1.37 (unit ms, attributes rpc.system,
# rpc.service, rpc.method, rpc.grpc.status_code, server.port), the form OBI/Beyla and most RPC
# instrumentations emit. error.type is added (as on the HTTP duration, and as the later
# rpc.server.call.duration has it): a reset or GOAWAY ends a call with no gRPC status at all.
RPC_DURATION = Instrument(
    "rpc.server.duration", "histogram", "ms", "Duration of RPC server calls (gRPC), from the wire.",
    "rpc_server_duration_milliseconds",
    ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code", "server.port", "error.type", *_K8S),
    RPC_DURATION_BUCKETS_MS,
)  # fmt: skip
HTTP_ACTIVE = Instrument(
    "http.server.active_requests", "updowncounter", "{request}",
    "HTTP server requests whose head was seen and whose response has not ended.",
    "http_server_active_requests", ("http.request.method", "http.route", "gen_ai.request.model", *_K8S),
)  # fmt: skip
GENAI_DURATION = Instrument(
    "gen_ai.server.request.duration", "histogram", "s", "Duration of generative AI server requests.",
    "gen_ai_server_request_duration_seconds",
    ("gen_ai.operation.name", "gen_ai.request.model", "error.type", *_K8S), DURATION_BUCKETS,
)  # fmt: skip
GENAI_TTFT = Instrument(
    "gen_ai.server.time_to_first_token", "histogram", "s",
    "Time from the start of the request to the first response event that carries output.",
    "gen_ai_server_time_to_first_token_seconds", ("gen_ai.operation.name", "gen_ai.request.model", *_K8S),
    TTFT_BUCKETS,
)  # fmt: skip
GENAI_TPOT = Instrument(
    "gen_ai.server.time_per_output_token", "histogram", "s",
    "Mean time per output token after the first one.",
    "gen_ai_server_time_per_output_token_seconds", ("gen_ai.operation.name", "gen_ai.request.model", *_K8S),
    TPOT_BUCKETS,
)  # fmt: skip
GENAI_TOKENS = Instrument(
    "gen_ai.server.token.usage", "histogram", "{token}", "Tokens per request, by gen_ai.token.type (input/output).",
    "gen_ai_server_token_usage",
    ("gen_ai.operation.name", "gen_ai.request.model", "gen_ai.token.type", *_K8S), TOKEN_BUCKETS,
)  # fmt: skip
ABORTED = Instrument(
    "infersight.requests.aborted", "counter", "{request}",
    "Requests the client abandoned before the response ended.", "infersight_requests_aborted_total",
    ("http.request.method", "http.route", "gen_ai.operation.name", "gen_ai.request.model", *_K8S),
)  # fmt: skip
UP = Instrument(
    "infersight.up", "gauge", "1", "1 while the agent runs (KEDA: set ignoreNullValues=false and alert on absence).",
    "infersight_up",
)  # fmt: skip
PROCESS_CPU = Instrument(
    "process.cpu.time", "counter", "s", "CPU seconds used by the agent process (user + system).",
    "process_cpu_seconds_total",
)  # fmt: skip
PROCESS_RSS = Instrument(
    "process.memory.usage", "gauge", "By", "Resident set size of the agent process.",
    "process_resident_memory_bytes",
)  # fmt: skip

#: The fixed instruments, in exposition order. Self metrics and collector points are added at collection.
INSTRUMENTS: tuple[Instrument, ...] = (
    HTTP_DURATION, RPC_DURATION, HTTP_ACTIVE, GENAI_DURATION, GENAI_TTFT, GENAI_TPOT, GENAI_TOKENS, ABORTED, UP,
    PROCESS_CPU, PROCESS_RSS,
)  # fmt: skip

SERIES_FOLDED = "infersight.attributes.folded"
SOURCE_ERRORS = "infersight.export.source.errors"


@dataclass(frozen=True, slots=True)
class ExemplarData:
    """The last sampled measurement that fell into a bucket."""

    value: float
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    time_unix_nano: int


@dataclass(frozen=True, slots=True)
class HistogramPoint:
    labels: tuple[str, ...]  # values, in Instrument.attributes order ("" = absent)
    bucket_counts: tuple[int, ...]  # per bucket, not cumulative; len(buckets) + 1 (the last is +Inf)
    count: int
    sum: float
    min: float
    max: float
    exemplars: tuple[ExemplarData | None, ...]  # one slot per bucket_counts entry


@dataclass(frozen=True, slots=True)
class ScalarPoint:
    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True, slots=True)
class MetricSnapshot:
    instrument: Instrument
    points: tuple[HistogramPoint, ...] | tuple[ScalarPoint, ...]
    start_time_unix_nano: int


class MetricPointLike(Protocol):
    """What a collector source yields (``collectors/*`` build these; a frozen dataclass fits)."""

    @property
    def name(self) -> str: ...  # OTel name
    @property
    def prom_name(self) -> str: ...  # exposition name (counters ending in "_total")
    @property
    def unit(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "gauge" or "counter"
    @property
    def help(self) -> str: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...
    @property
    def value(self) -> float: ...


PointSource = Callable[[], Iterable[MetricPointLike]]
ActiveSource = Callable[[], Sequence[ActiveRequest]]


class _Histogram:
    __slots__ = ("count", "counts", "exemplars", "max", "min", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)
        self.exemplars: list[ExemplarData | None] = [None] * (n + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


@dataclass(frozen=True, slots=True)
class SpanRef:
    """The trace and span of a sampled request (hex), for exemplars."""

    trace_id: str
    span_id: str


@dataclass(slots=True)
class _Series:
    instrument: Instrument
    buckets: tuple[float, ...]
    hist: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)
    scalar: dict[tuple[str, ...], float] = field(default_factory=dict)


class MetricState:
    """Cumulative metric state fed by request records.

    Thread-safe: :meth:`record` runs on the pipeline thread, :meth:`collect` on
    the Prometheus server's threads and the OTLP metric thread; one lock guards
    the series. Neither method raises on bad input or failing sources: a failing
    source is skipped, counted in ``infersight.export.source.errors`` and logged once.

    Memory is bounded by ``max_series`` label sets per instrument (past it, new
    label sets fold into one series whose labels are all ``other``), on top of the
    per-attribute caps of :class:`~agent.export.routes.AttributeBounds`.
    """

    def __init__(
        self,
        bounds: AttributeBounds,
        buckets: Mapping[str, Sequence[float]] | None = None,
        max_series: int = 4096,
        metrics: SelfMetrics = SELF_METRICS,
        process_collector: Any = None,
    ) -> None:
        self.bounds = bounds
        self.max_series = max_series
        self._metrics = metrics
        self._lock = threading.Lock()
        self._start_ns = time.time_ns()
        #: bumped by every recorded request (OTLP skips a final push that would repeat the last one)
        self.generation = 0
        overrides = dict(buckets or {})
        self._series: dict[str, _Series] = {}
        for inst in INSTRUMENTS:
            b = tuple(sorted(float(x) for x in overrides.get(inst.name, inst.buckets)))
            self._series[inst.name] = _Series(replace(inst, buckets=b), b)
        # the series each record counts in, looked up once
        self._rpc = self._series[RPC_DURATION.name]
        self._http = self._series[HTTP_DURATION.name]
        self._aborted = self._series[ABORTED.name]
        self._genai = self._series[GENAI_DURATION.name]
        self._ttft = self._series[GENAI_TTFT.name]
        self._tpot = self._series[GENAI_TPOT.name]
        self._tokens = self._series[GENAI_TOKENS.name]
        self._active_source: ActiveSource | None = None
        self._point_sources: list[PointSource] = []
        self._source_failed: set[str] = set()
        if process_collector is None:
            from prometheus_client import ProcessCollector

            # registry=None: we render its samples ourselves, on both paths.
            process_collector = ProcessCollector(registry=None)
        self._process = process_collector
        metrics.describe(
            SOURCE_ERRORS, "counter", "Metric sources (active requests, collector points) that raised"
        )

    # -- configuration ---------------------------------------------------------------------------

    def buckets(self, instrument: str) -> tuple[float, ...]:
        return self._series[instrument].buckets

    def set_active_source(self, fn: ActiveSource | None) -> None:
        self._active_source = fn

    def add_point_source(self, fn: PointSource) -> None:
        with self._lock:
            self._point_sources.append(fn)

    # -- recording -------------------------------------------------------------------------------

    def record(self, r: Request, exemplar: SpanRef | None = None) -> None:
        """Count ``r`` in every instrument it has a value for.

        Server records only: a client record (``span_kind == "client"``) is a
        span, not a served request. An RPC record (``rpc.system`` set) counts in
        ``rpc.server.duration`` instead of ``http.server.request.duration``; the
        GenAI instruments take any record with an operation or a model, RPC or
        HTTP. ``exemplar`` is the sampled span, or None.
        """
        if r.span_kind != "server":
            return
        b = self.bounds
        kv = b.k8s_values(r.attributes)
        method = b.method(r.method)
        route = b.route(r.path)
        error = error_type(r) or ""
        system = rpc_system(r)
        if system is not None:
            a = r.attributes
            labels = (
                b.rpc(RPC_SYSTEM, system),
                b.rpc(RPC_SERVICE, a.get(RPC_SERVICE)),
                b.rpc(RPC_METHOD, a.get(RPC_METHOD)),
                b.grpc_status(grpc_status_code(r)),
                b.rpc("server.port", r.server_port),
                error,
            ) + kv
        else:
            status = str(r.status_code) if r.status_code is not None else ""
            labels = (method, route, status, error) + kv
        is_genai = r.operation is not None or r.request_model is not None
        model = b.model(r.request_model) if is_genai else ""
        op = (r.operation or "")[:64]
        t = r.end_time_unix_nano
        dur = r.duration_s
        with self._lock:
            self.generation += 1
            if system is not None:
                self._observe(self._rpc, labels, dur * 1000.0, exemplar, t)
            else:
                self._observe(self._http, labels, dur, exemplar, t)
            if r.aborted:
                self._add(self._aborted, (method, route, op, model) + kv, 1.0)
            if not is_genai:
                return
            self._observe(self._genai, (op, model, error) + kv, dur, exemplar, t)
            om = (op, model) + kv
            if r.time_to_first_token_s is not None:
                self._observe(self._ttft, om, r.time_to_first_token_s, exemplar, t)
            if r.time_per_output_token_s is not None:
                self._observe(self._tpot, om, r.time_per_output_token_s, exemplar, t)
            if r.input_tokens is not None:
                self._observe(self._tokens, (op, model, "input") + kv, float(r.input_tokens), exemplar, t)
            if r.output_tokens is not None:
                self._observe(self._tokens, (op, model, "output") + kv, float(r.output_tokens), exemplar, t)

    def _key(
        self, s: _Series, table: Mapping[tuple[str, ...], object], labels: tuple[str, ...]
    ) -> tuple[str, ...]:
        if labels in table or len(table) < self.max_series:
            return labels
        self._metrics.inc(SERIES_FOLDED, labels=(("attribute", s.instrument.name), ("reason", "series_cap")))
        return tuple(OTHER if v else "" for v in labels)

    def _observe(
        self, s: _Series, labels: tuple[str, ...], value: float, ex: SpanRef | None, t_ns: int
    ) -> None:
        h = s.hist.get(labels)
        if h is None:  # a new series, unless the cap folds it into one that exists
            labels = self._key(s, s.hist, labels)
            h = s.hist.get(labels)
            if h is None:
                h = s.hist[labels] = _Histogram(len(s.buckets))
        # Prometheus buckets are upper-inclusive (le): a value equal to a bound belongs to it.
        i = _bisect_left(s.buckets, value)
        h.counts[i] += 1
        h.count += 1
        h.sum += value
        if value < h.min:  # compared as floats, where min() and max() are generic calls
            h.min = value
        if value > h.max:
            h.max = value
        if ex is not None:
            h.exemplars[i] = ExemplarData(value, ex.trace_id, ex.span_id, t_ns)

    def _add(self, s: _Series, labels: tuple[str, ...], n: float) -> None:
        v = s.scalar.get(labels)
        if v is None:  # a new series, unless the cap folds it into one that exists
            labels = self._key(s, s.scalar, labels)
            v = s.scalar.get(labels, 0.0)
        s.scalar[labels] = v + n

    # -- collection ------------------------------------------------------------------------------

    def collect(self) -> list[MetricSnapshot]:
        """A consistent snapshot of every exported metric. Never raises."""
        start = self._start_ns
        out: list[MetricSnapshot] = []
        with self._lock:
            for s in self._series.values():
                inst = s.instrument
                if inst.kind == "histogram":
                    hpoints = tuple(
                        HistogramPoint(k, tuple(h.counts), h.count, h.sum, h.min, h.max, tuple(h.exemplars))
                        for k, h in sorted(s.hist.items())
                    )
                    out.append(MetricSnapshot(inst, hpoints, start))
                elif inst.name == ABORTED.name:
                    out.append(
                        MetricSnapshot(
                            inst, tuple(ScalarPoint(k, v) for k, v in sorted(s.scalar.items())), start
                        )
                    )
            sources = list(self._point_sources)
        out.append(MetricSnapshot(HTTP_ACTIVE, self._active_points(), start))
        out.append(MetricSnapshot(UP, (ScalarPoint((), 1.0),), start))
        out.extend(self._process_points(start))
        out.extend(self._self_points(start))
        out.extend(self._source_points(sources, start))
        return out

    def _failed(self, source: str, exc: BaseException) -> None:
        self._metrics.inc(SOURCE_ERRORS, labels=(("source", source),))
        if source not in self._source_failed:
            self._source_failed.add(source)
            log.warning("metric source %s failed (logged once): %r", source, exc)

    def _active_points(self) -> tuple[ScalarPoint, ...]:
        fn = self._active_source
        if fn is None:
            return ()
        try:
            active = list(fn())
        except Exception as exc:
            self._failed("active_requests", exc)
            return ()
        b = self.bounds
        counts: dict[tuple[str, ...], float] = {}
        for a in active:
            if a.attributes.get(RPC_SYSTEM):
                continue  # an RPC in flight is no HTTP server request (no RPC gauge in semconv)
            key = (b.method(a.method), b.route(a.path), b.model(a.request_model), *b.k8s_values(a.attributes))
            counts[key] = counts.get(key, 0.0) + 1.0
            if len(counts) > self.max_series:
                break
        return tuple(ScalarPoint(k, v) for k, v in sorted(counts.items()))

    def _process_points(self, start: int) -> list[MetricSnapshot]:
        cpu: tuple[ScalarPoint, ...] = ()
        rss: tuple[ScalarPoint, ...] = ()
        try:
            for fam in self._process.collect():
                for smp in fam.samples:
                    if smp.name == "process_cpu_seconds_total":
                        cpu = (ScalarPoint((), smp.value),)
                    elif smp.name == "process_resident_memory_bytes":
                        rss = (ScalarPoint((), smp.value),)
        except Exception as exc:  # /proc unreadable: lose these two, keep the rest
            self._failed("process", exc)
        return [MetricSnapshot(PROCESS_CPU, cpu, start), MetricSnapshot(PROCESS_RSS, rss, start)]

    def _self_points(self, start: int) -> list[MetricSnapshot]:
        by_name: dict[str, list[Any]] = {}
        for smp in self._metrics.snapshot():
            by_name.setdefault(smp.name, []).append(smp)
        out = []
        for name, samples in sorted(by_name.items()):
            kind = "counter" if samples[0].kind == "counter" else "gauge"
            keys = tuple(sorted({k for smp in samples for k, _ in smp.labels}))
            base = label_name(name)
            inst = Instrument(
                name, kind, "1", samples[0].help or name, base + "_total" if kind == "counter" else base, keys
            )
            points = []
            for smp in samples:
                d = dict(smp.labels)
                points.append(ScalarPoint(tuple(str(d.get(k, "")) for k in keys), float(smp.value)))
            out.append(MetricSnapshot(inst, tuple(points), start))
        return out

    def _source_points(self, sources: list[PointSource], start: int) -> list[MetricSnapshot]:
        grouped: dict[str, tuple[Instrument, dict[tuple[tuple[str, str], ...], float]]] = {}
        for fn in sources:
            name = getattr(fn, "__qualname__", repr(fn))
            try:
                points = list(fn())
            except Exception as exc:
                self._failed(name, exc)
                continue
            for p in points:
                try:
                    labels = point_labels(p.attributes, self.bounds)
                    entry = grouped.get(p.name)
                    if entry is None:
                        kind = "counter" if p.kind == "counter" else "gauge"
                        inst = Instrument(p.name, kind, p.unit or "1", p.help or p.name, p.prom_name)
                        entry = grouped[p.name] = (inst, {})
                    if self.bounds.series(p.name, labels):
                        entry[1][labels] = float(p.value)
                except Exception as exc:  # a malformed point loses itself only
                    self._failed(name, exc)
        out = []
        for inst, series in grouped.values():
            keys = tuple(sorted({k for labels in series for k, _ in labels}))
            with_keys = Instrument(inst.name, inst.kind, inst.unit, inst.description, inst.prom_name, keys)
            pts = []
            for labels, v in sorted(series.items()):
                d = dict(labels)
                pts.append(ScalarPoint(tuple(d.get(k, "") for k in keys), v))
            out.append(MetricSnapshot(with_keys, tuple(pts), start))
        return out
