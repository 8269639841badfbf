"""Bounded, time-indexed sample histories that the join queries by window.

A :class:`History` keeps, per key (a GPU UUID, a ``(pid, uuid)`` pair, ...),
the most recent samples: a wall-clock time in nanoseconds and a mapping of
field name to value. The join asks :meth:`History.window` what a key looked
like during ``[t0_ns, t1_ns]`` and gets a :class:`WindowStats` back.

Bounds, each counted in ``infersight.history.evictions`` (labels ``history``
and ``reason``) when it drops something:

- ``max_samples_per_key``: the oldest sample of a key goes (reason ``samples``);
- ``max_keys``: the least recently *written* key goes whole (reason ``keys``).
  Writes, not reads, set recency so that a key that stopped being sampled (a
  process that exited) leaves before one that is still live;
- ``max_age_ns``: samples older than the key's newest sample by more than this
  are expired on write. That is the configured retention, not a loss, so it
  is not counted.

Thread-safe: one lock guards everything; a sampling thread writes while the
join reads. No method does I/O or blocks on anything but that lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from agent.selfmetrics import SELF_METRICS, SelfMetrics

EVICTIONS = "infersight.history.evictions"


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Summary of the samples a window used.

    ``mean`` and ``max`` hold one entry per field present in at least one of
    those samples (a field a sample lacks does not count towards its mean),
    or, where the query named its fields, per named field present.
    ``first_ns`` / ``last_ns`` are the times of the first and last sample used,
    which may lie before ``t0_ns`` (see :meth:`History.window`).
    """

    samples: int
    mean: dict[str, float]
    max: dict[str, float]
    first_ns: int
    last_ns: int


class _Series:
    """Samples of one key, sorted by time (parallel lists so bisect works)."""

    __slots__ = ("times", "values")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.values: list[Mapping[str, float]] = []


class History:
    """Per-key rings of ``(t_ns, {field: value})`` samples. See the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        max_samples_per_key: int = 2400,
        max_keys: int = 4096,
        max_age_ns: int | None = None,
        max_fallback_age_ns: int | None = None,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        """``name`` labels this history's eviction counts. ``max_fallback_age_ns``
        bounds how old the "last sample before ``t0``" may be (see :meth:`window`);
        None means any age. Raises ValueError on a bound below 1."""
        if max_samples_per_key < 1 or max_keys < 1:
            raise ValueError("history bounds must be at least 1")
        self.name = name
        self._max_samples = max_samples_per_key
        self._max_keys = max_keys
        self._max_age_ns = max_age_ns
        self._max_fallback_age_ns = max_fallback_age_ns
        self._metrics = metrics
        self._lock = threading.Lock()
        self._series: OrderedDict[Hashable, _Series] = OrderedDict()
        metrics.describe(EVICTIONS, "counter", "Samples or whole keys dropped from a bounded time-indexed history")

    def add(self, key: Hashable, t_ns: int, values: Mapping[str, float]) -> None:
        """Record ``values`` for ``key`` at wall-clock time ``t_ns``.

        Samples may arrive out of order (they are inserted in time order). The
        mapping is kept as given; callers must not mutate it afterwards.
        """
        evicted_samples = 0
        evicted_keys = 0
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series()
                while len(self._series) > self._max_keys:
                    self._series.popitem(last=False)
                    evicted_keys += 1
            else:
                self._series.move_to_end(key)
            if not series.times or t_ns >= series.times[-1]:
                series.times.append(t_ns)
                series.values.append(values)
            else:
                i = bisect.bisect_right(series.times, t_ns)
                series.times.insert(i, t_ns)
                series.values.insert(i, values)
            drop = len(series.times) - self._max_samples
            if drop > 0:
                evicted_samples = drop
            if self._max_age_ns is not None:
                cutoff = series.times[-1] - self._max_age_ns
                drop = max(drop, bisect.bisect_left(series.times, cutoff))
            if drop > 0:
                del series.times[:drop]
                del series.values[:drop]
        if evicted_samples:
            self._metrics.inc(EVICTIONS, evicted_samples, (("history", self.name), ("reason", "samples")))
        if evicted_keys:
            self._metrics.inc(EVICTIONS, evicted_keys, (("history", self.name), ("reason", "keys")))

    def window(
        self, key: Hashable, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """Statistics of ``key`` over ``[t0_ns, t1_ns]`` (both ends included).

        Uses every sample whose time falls inside the window. When none does
        (a window shorter than the sampling period, lying between two samples),
        it uses the last sample before ``t0_ns`` instead: the state that held
        when the window opened. That fallback is refused (None) when the sample
        is older than ``max_fallback_age_ns`` before ``t0_ns``, so a source that
        stopped sampling is not reported as current. Returns None when nothing
        qualifies or the key is unknown. A sample at or after ``t1_ns`` that
        follows an empty window is never used: it describes later time.

        ``fields`` names the fields to summarise (None: all of them). The cost
        of a window is its samples times the fields summarised, and a reader
        on the per-request path wants two or three of a GPU's dozen or more.
        """
        return self.window_many((key,), t0_ns, t1_ns, fields)

    def window_many(
        self, keys: Iterable[Hashable], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """:meth:`window` over several keys merged into one sample stream
        (each key's samples chosen by the same rule; means weighted by sample)."""
        if t1_ns < t0_ns:
            return None
        chosen: list[tuple[int, Mapping[str, float]]] = []
        with self._lock:
            for key in keys:
                series = self._series.get(key)
                if series is None:
                    continue
                lo = bisect.bisect_left(series.times, t0_ns)
                hi = bisect.bisect_right(series.times, t1_ns)
                if hi > lo:
                    chosen.extend(zip(series.times[lo:hi], series.values[lo:hi], strict=True))
                elif lo > 0:
                    t = series.times[lo - 1]
                    if self._max_fallback_age_ns is None or t0_ns - t <= self._max_fallback_age_ns:
                        chosen.append((t, series.values[lo - 1]))
        return _summarise(chosen, fields)

    def latest(self, key: Hashable) -> tuple[int, Mapping[str, float]] | None:
        """The newest sample of ``key`` as ``(t_ns, values)``, or None."""
        with self._lock:
            series = self._series.get(key)
            if series is None or not series.times:
                return None
            return series.times[-1], series.values[-1]

    def keys(self) -> list[Hashable]:
        """Every key held, least recently written first."""
        with self._lock:
            return list(self._series)

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (not counted as an eviction: the caller chose it)."""
        with self._lock:
            self._series.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)


def _summarise(chosen: list[tuple[int, Mapping[str, float]]], fields: tuple[str, ...] | None) -> WindowStats | None:
    if not chosen:
        return None
    if fields is None:  # every field any of the samples has
        fields = tuple(dict.fromkeys(field for _, values in chosen for field in values))
    means: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for field in fields:
        present = [x for _, values in chosen if (x := values.get(field)) is not None]
        if present:
            means[field] = sum(present) / len(present)
            maxima[field] = max(present)
    times = [t for t, _ in chosen]
    return WindowStats(
        samples=len(chosen),
        mean=means,
        max=maxima,
        first_ns=min(times),
        last_ns=max(times),
    )
