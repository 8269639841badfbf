"""The Prometheus endpoint: renders :meth:`MetricState.collect` snapshots, with exemplars.

:class:`StateCollector` is a ``prometheus_client`` custom collector, in the
manner of its ``ProcessCollector``: each ``collect()`` yields fresh metric
families built from one snapshot. Histogram buckets carry the exemplar of the
last *sampled* request that fell into them (``trace_id``, ``span_id``); they
appear when the scraper asks for OpenMetrics (``Accept:
application/openmetrics-text``), which Prometheus does by default.

Names: OTel ``a.b.c`` becomes ``a_b_c``; counters end in ``_total``; labels are
attribute keys with ``.`` replaced by ``_``. An empty label value means the
attribute is absent (Prometheus treats the two the same).

Threading: ``prometheus_client``'s server calls ``collect`` on its own threads;
the state is thread-safe. A scrape never raises on account of a bad source.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from agent.export.instruments import HistogramPoint, MetricSnapshot, MetricState, ScalarPoint
from agent.selfmetrics import SELF_METRICS, SelfMetrics

log = logging.getLogger(__name__)

PROM_ERRORS = "infersight.export.prometheus.errors"


def families(snapshots: list[MetricSnapshot]) -> Iterator[Metric]:
    """Prometheus metric families for ``snapshots``; a duplicate exposition name keeps the first.

    Samples carry only their non-empty labels: an absent attribute is no label
    at all, which is what Prometheus would store anyway, at a fraction of the
    exposition size.
    """
    seen: set[str] = set()
    for snap in snapshots:
        inst = snap.instrument
        base = inst.prom_name[:-6] if inst.prom_name.endswith("_total") else inst.prom_name
        if base in seen:
            continue
        seen.add(base)
        names = inst.label_names
        fam: Metric
        if inst.kind == "histogram":
            fam = HistogramMetricFamily(base, inst.description)
            bounds = [floatToGoString(b) for b in inst.buckets] + ["+Inf"]
            for p in snap.points:
                assert isinstance(p, HistogramPoint)
                labels = _labels(names, p.labels)
                cum = 0
                for le, n, ex in zip(bounds, p.bucket_counts, p.exemplars, strict=True):
                    cum += n
                    exemplar = None
                    if ex is not None:
                        exemplar = Exemplar(
                            {"trace_id": ex.trace_id, "span_id": ex.span_id},
                            ex.value,
                            ex.time_unix_nano / 1e9,
                        )
                    fam.add_sample(base + "_bucket", {**labels, "le": le}, cum, None, exemplar)
                fam.add_sample(base + "_count", labels, p.count)
                fam.add_sample(base + "_sum", labels, p.sum)
        elif inst.kind == "counter":
            fam = CounterMetricFamily(base, inst.description)
            for sp in snap.points:
                assert isinstance(sp, ScalarPoint)
                fam.add_sample(base + "_total", _labels(names, sp.labels), sp.value)
        else:
            fam = GaugeMetricFamily(base, inst.description)
            for sp in snap.points:
                assert isinstance(sp, ScalarPoint)
                fam.add_sample(base, _labels(names, sp.labels), sp.value)
        yield fam


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in zip(names, values, strict=True) if v != ""}


class StateCollector:
    """A ``prometheus_client`` collector over a :class:`MetricState`. Never raises from ``collect``."""

    def __init__(self, state: MetricState, metrics: SelfMetrics = SELF_METRICS) -> None:
        self._state = state
        self._metrics = metrics
        self._logged = False

    def describe(self) -> list[Metric]:
        # An empty describe keeps registration from running a full collection.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            fams = list(families(self._state.collect()))
        except Exception as exc:
            self._metrics.inc(PROM_ERRORS)
            if not self._logged:
                self._logged = True
                log.exception("building the Prometheus exposition failed (logged once): %r", exc)
            return iter(())
        return iter(fams)


class PrometheusServer:
    """Serves ``/metrics`` on ``host:port`` from a daemon thread.

    ``start`` returns False (logged, counted in ``infersight.export.prometheus.errors``)
    when the port cannot be bound: the agent runs on without the endpoint.
    ``port`` 0 in :meth:`start` means "any free port" (tests); read :attr:`port` after.
    """

    def __init__(
        self, state: MetricState, host: str = "0.0.0.0", metrics: SelfMetrics = SELF_METRICS
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(state, metrics))
        self.host = host
        self.port: int | None = None
        self._metrics = metrics
        self._server: Any = None
        self._thread: threading.Thread | None = None
        metrics.describe(PROM_ERRORS, "counter", "Prometheus endpoint failures (bind, exposition)")

    def start(self, port: int) -> bool:
        try:
            self._server, self._thread = start_http_server(port, addr=self.host, registry=self.registry)
        except OSError as exc:
            self._metrics.inc(PROM_ERRORS, labels=(("stage", "bind"),))
            log.error(
                "Prometheus endpoint %s:%d unavailable, metrics stay on OTLP only: %s", self.host, port, exc
            )
            return False
        self.port = self._server.server_address[1]
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
