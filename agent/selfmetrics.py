"""The agent's own counters and gauges: what a reader needs to trust the data.

Every bound in the agent (a BPF map, a queue, a label cap) and every failure
(a parse error, a lost event, an export failure) counts here by name, so that
"requests seen = records emitted + counted drops" can be checked.

Names follow OpenTelemetry style (``infersight.events.lost``); labels are a
small, fixed set per name. The exporters turn a :meth:`SelfMetrics.snapshot`
into Prometheus and OTLP metrics; nothing here knows about either.

Thread-safe: every method may be called from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

Labels = tuple[tuple[str, str], ...]

#: Compiled (``agent.native``), adding to a float field is a few C statements, and no other
#: thread runs until they are done: the GIL changes hands between bytecodes, and compiled code
#: has none. As plain Python it is three bytecodes another thread may fall between.
_ADD_IS_ATOMIC: Final = __file__.endswith(".so")


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    kind: str  # "counter" or "gauge"
    labels: Labels
    value: float
    help: str


class BoundCounter:
    """One series of a counter, bound once by :meth:`SelfMetrics.counter` for a call site
    that counts it per record: :meth:`inc` adds to the series' own cell, with no key built or
    looked up; compiled, without the registry's lock (whose acquire reads the clock), which
    plain Python takes."""

    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        if _ADD_IS_ATOMIC:
            self.value += n
            return
        lock = self._lock
        lock.acquire()
        self.value += n
        lock.release()


class SelfMetrics:
    """A registry of named counters and gauges.

    Counters only go up. Gauges are set, or computed on demand by a callback
    registered with :meth:`gauge_callback` (for values that are cheaper to read
    than to track, such as queue sizes).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = {}
        self._kinds: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._callbacks: dict[str, Callable[[], dict[Labels, float]]] = {}
        self._bound: dict[tuple[str, Labels], BoundCounter] = {}

    def describe(self, name: str, kind: str, help: str) -> None:
        with self._lock:
            self._kinds[name] = kind
            self._help[name] = help

    def inc(self, name: str, n: float = 1, labels: Labels = ()) -> None:
        # Called several times per request: acquire/release and one lookup cost less,
        # compiled, than a `with` block and setdefault on every call.
        key = (name, labels)
        lock = self._lock
        lock.acquire()
        try:
            values = self._values
            v = values.get(key)
            if v is None:
                self._kinds.setdefault(name, "counter")
                values[key] = n
            else:
                values[key] = v + n
        finally:
            lock.release()

    def counter(self, name: str, labels: Labels = ()) -> BoundCounter:
        """The series ``name{labels}`` as a :class:`BoundCounter` (the same one for every call):
        ``c.inc(n)`` counts as ``inc(name, n, labels)`` does, for less; the series shows once
        it is not zero."""
        key = (name, labels)
        with self._lock:
            c = self._bound.get(key)
            if c is None:
                c = self._bound[key] = BoundCounter(self._lock)
                self._kinds.setdefault(name, "counter")
            return c

    def _merged(self) -> dict[tuple[str, Labels], float]:
        """Every series' value, bound counters included. Holds ``_lock``."""
        values = dict(self._values)
        for key, c in self._bound.items():
            if c.value:  # a series exists once counted, as with inc()
                values[key] = values.get(key, 0) + c.value
        return values

    def set(self, name: str, value: float, labels: Labels = ()) -> None:
        with self._lock:
            self._kinds.setdefault(name, "gauge")
            self._values[(name, labels)] = value

    def gauge_callback(self, name: str, fn: Callable[[], dict[Labels, float]], help: str = "") -> None:
        """Register ``fn`` to compute gauge ``name`` at each snapshot."""
        with self._lock:
            self._kinds[name] = "gauge"
            if help:
                self._help[name] = help
            self._callbacks[name] = fn

    def get(self, name: str, labels: Labels = ()) -> float:
        key = (name, labels)
        with self._lock:
            bound = self._bound.get(key)
            return self._values.get(key, 0) + (bound.value if bound is not None else 0)

    def total(self, name: str) -> float:
        """Sum of ``name`` over all label sets."""
        with self._lock:
            return sum(v for (n, _), v in self._merged().items() if n == name)

    def snapshot(self) -> list[Sample]:
        with self._lock:
            values = self._merged()
            kinds = dict(self._kinds)
            helps = dict(self._help)
            callbacks = dict(self._callbacks)
        out = [
            Sample(n, kinds.get(n, "counter"), labels, v, helps.get(n, ""))
            for (n, labels), v in sorted(values.items())
        ]
        for name, fn in sorted(callbacks.items()):
            try:
                computed = fn()
            except Exception:  # a failing gauge must not break the snapshot
                self.inc("infersight.selfmetrics.callback.errors", labels=(("metric", name),))
                continue
            out.extend(Sample(name, "gauge", labels, v, helps.get(name, "")) for labels, v in computed.items())
        return out


#: The process-wide registry; components take a ``metrics`` parameter defaulting to it.
SELF_METRICS = SelfMetrics()
