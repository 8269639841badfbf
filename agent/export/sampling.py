"""Trace sampling, decided in the agent before a span exists.

Metrics count every request; only spans are sampled. A request is always kept
when it is interesting on its own: an error (a recorded ``error_type``, a gRPC
server-error code or a 5xx: :func:`agent.export.rpc.error_type`), an abort, or
slower than ``slow_threshold_s``. Ordinary requests are kept with probability
``ratio``.

When the record carries a client trace id (from ``traceparent``) the ratio
decision is a function of the trace id, as in OpenTelemetry's
``TraceIdRatioBased`` (the low 64 bits compared with ``ratio * 2**64``), so that
every agent on the path keeps or drops the same traces. Otherwise it is random.

Exemplars on metrics carry the trace id only when the span was kept, so that an
exemplar always leads to a trace that exists.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.export.rpc import error_type
from agent.record import Request
from agent.selfmetrics import SELF_METRICS, SelfMetrics

SAMPLED = "infersight.traces.sampled"
_BOUND = 1 << 64


@dataclass(frozen=True, slots=True)
class Decision:
    keep: bool
    #: why: "error", "aborted", "slow", "ratio" (kept) or "ratio" (dropped)
    reason: str
    #: the labels it counts under in ``infersight.traces.sampled``
    labels: tuple[tuple[str, str], ...]
    #: its place in DECISIONS
    index: int


def _decision(keep: bool, reason: str, index: int) -> Decision:
    return Decision(keep, reason, (("decision", "keep" if keep else "drop"), ("reason", reason)), index)


# Every decision is one of these: none is built per request.
KEEP_ERROR = _decision(True, "error", 0)
KEEP_ABORTED = _decision(True, "aborted", 1)
KEEP_SLOW = _decision(True, "slow", 2)
KEEP_RATIO = _decision(True, "ratio", 3)
DROP_RATIO = _decision(False, "ratio", 4)
DECISIONS = (KEEP_ERROR, KEEP_ABORTED, KEEP_SLOW, KEEP_RATIO, DROP_RATIO)


class Sampler:
    """Decides which requests become spans.

    Thread-safe (no shared mutable state besides the counters). Never raises.
    """

    def __init__(
        self,
        ratio: float = 1.0,
        slow_threshold_s: float = 30.0,
        metrics: SelfMetrics = SELF_METRICS,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sample ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.slow_threshold_s = slow_threshold_s
        self._bound = round(ratio * _BOUND)
        self._metrics = metrics
        self._rng = rng or random.Random()
        metrics.describe(SAMPLED, "counter", "Sampling decisions for request spans, by decision and reason")
        self._counted = [metrics.counter(SAMPLED, d.labels) for d in DECISIONS]

    def decide(self, record: Request, trace_id: int) -> Decision:
        """Keep or drop the span of ``record`` whose trace id is ``trace_id``."""
        d = self._decide(record, trace_id)
        self._counted[d.index].inc()
        return d

    def _decide(self, record: Request, trace_id: int) -> Decision:
        if error_type(record) is not None:
            return KEEP_ERROR
        if record.aborted:
            return KEEP_ABORTED
        if record.duration_s >= self.slow_threshold_s:
            return KEEP_SLOW
        if self.ratio >= 1.0:
            return KEEP_RATIO
        if self.ratio <= 0.0:
            return DROP_RATIO
        if record.trace_id:
            keep = (trace_id & (_BOUND - 1)) < self._bound
        else:
            keep = self._rng.random() < self.ratio
        return KEEP_RATIO if keep else DROP_RATIO
