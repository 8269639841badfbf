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

A window's cost does not grow with its length. For each field a window has
summarised, a key keeps running aggregates aligned with its samples: prefix
sums and counts (a window's mean from two subtractions) and tables of the
maximum of 1, 2, 4 and 8 samples from each index (a window's maximum from two
entries, or from every eighth entry of the last table for a longer window).
They are built when a window first asks for the field and extended as later
windows ask, cut back to where a sample arrived out of order, and rebuilt once
as many samples have left the front as the key holds, which bounds the
prefix sums' size and so their rounding. Per key and summarised field they
take 48 bytes a sample, against a few hundred for the sample itself.

Thread-safe: one lock guards everything; a sampling thread writes while the
join reads. No method does I/O or blocks on anything but that lock.
"""

from __future__ import annotations

import bisect
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from math import inf, isfinite
from typing import Final

from agent.selfmetrics import SELF_METRICS, SelfMetrics

EVICTIONS = "infersight.history.evictions"


class WindowStats:
    """Summary of the samples a window used.

    ``mean`` and ``max`` hold one entry per field present in at least one of
    those samples (a field a sample lacks, or holds as NaN or an infinity, does
    not count towards its mean),
    or, where the query named its fields, per named field present.
    ``first_ns`` / ``last_ns`` are the times of the first and last sample used,
    which may lie before ``t0_ns`` (see :meth:`History.window`). ``max_sum`` holds,
    per field of ``max``, each key's own maximum added over the window's keys: a
    process's memory peak over all its GPUs, where ``max`` is its largest on one
    (for a one-key window, ``max`` again).

    Immutable: every field is ``Final``. A plain class rather than a frozen dataclass, as
    :class:`agent.record.Request` is: the join builds one per GPU and per process for every
    record, and a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (0.66 µs for five fields), where compiled this constructor is a
    few stores.
    """

    __slots__ = ("first_ns", "last_ns", "max", "max_sum", "mean", "samples")

    def __init__(self, samples: int, mean: dict[str, float], max: dict[str, float], first_ns: int,
                 last_ns: int, max_sum: dict[str, float]) -> None:
        self.samples: Final = samples
        self.mean: Final = mean
        self.max: Final = max
        self.first_ns: Final = first_ns
        self.last_ns: Final = last_ns
        self.max_sum: Final = max_sum

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowStats):
            return NotImplemented
        return (self.samples, self.mean, self.max, self.first_ns, self.last_ns, self.max_sum) == (
            other.samples, other.mean, other.max, other.first_ns, other.last_ns, other.max_sum)

    def __repr__(self) -> str:
        return (f"WindowStats(samples={self.samples!r}, mean={self.mean!r}, max={self.max!r}, "
                f"first_ns={self.first_ns!r}, last_ns={self.last_ns!r}, max_sum={self.max_sum!r})")


#: the maxima tables kept per field: level k holds the maximum of 2**k samples from each index
TOP_LEVEL: Final = 3


class _Field:
    """Running aggregates of one field over a key's samples, index for index: ``sums[i]`` and
    ``counts[i]`` add up the samples before ``i`` that have the field, and ``maxima[k][i]`` is
    the field's maximum over samples ``i`` to ``i + 2**k - 1`` (-inf where none has it). They
    cover the key's first ``len(counts) - 1`` samples; :meth:`_Series.field` extends them."""

    __slots__ = ("counts", "maxima", "shifted", "sums")

    def __init__(self) -> None:
        self.sums = array("d", (0.0,))
        self.counts = array("q", (0,))
        self.maxima = [array("d") for _ in range(TOP_LEVEL + 1)]
        self.shifted = 0  # samples dropped from the front since these were built

    def cut(self, i: int) -> None:
        """Forget everything that covers sample ``i`` or later (a sample was inserted there)."""
        del self.sums[i + 1:]
        del self.counts[i + 1:]
        for k, table in enumerate(self.maxima):
            del table[max(0, i - (1 << k) + 1):]

    def drop_front(self, n: int) -> None:
        """The key's first ``n`` samples left (the caller checked that these cover them)."""
        del self.sums[:n]
        del self.counts[:n]
        for table in self.maxima:
            del table[:n]
        self.shifted += n

    def peak(self, lo: int, hi: int) -> float:
        """The field's maximum over samples ``lo`` to ``hi - 1`` (``hi > lo``)."""
        span = hi - lo
        if span < 2 << TOP_LEVEL:
            k = span.bit_length() - 1
            table = self.maxima[k]
            a, b = table[lo], table[hi - (1 << k)]
            return a if a >= b else b
        table = self.maxima[TOP_LEVEL]
        w = 1 << TOP_LEVEL
        return max(max(table[lo:hi - w + 1:w]), table[hi - w])


class _Series:
    """Samples of one key, sorted by time (parallel lists so bisect works), and the running
    aggregates of the fields that windows have summarised."""

    __slots__ = ("fields", "times", "values")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.values: list[Mapping[str, float]] = []
        self.fields: dict[str, _Field] = {}

    def field(self, name: str) -> _Field:
        """The aggregates of ``name``, extended over every sample held."""
        agg = self.fields.get(name)
        if agg is None:
            agg = self.fields[name] = _Field()
        n = len(self.times)
        done = len(agg.counts) - 1
        if done < n:
            sums, counts, level0 = agg.sums, agg.counts, agg.maxima[0]
            total, count = sums[-1], counts[-1]
            for values in self.values[done:n]:
                x = values.get(name)
                if x is None or not isfinite(x):  # NaN or infinity: not a measurement
                    level0.append(-inf)
                else:
                    total += x
                    count += 1
                    level0.append(x)
                sums.append(total)
                counts.append(count)
            for k in range(1, TOP_LEVEL + 1):
                below, table, half = agg.maxima[k - 1], agg.maxima[k], 1 << (k - 1)
                for i in range(len(table), n - (1 << k) + 1):
                    a, b = below[i], below[i + half]
                    table.append(a if a >= b else b)
        return agg

    def insert(self, t_ns: int, values: Mapping[str, float]) -> None:
        if not self.times or t_ns >= self.times[-1]:
            self.times.append(t_ns)
            self.values.append(values)
            return
        i = bisect.bisect_right(self.times, t_ns)
        self.times.insert(i, t_ns)
        self.values.insert(i, values)
        for agg in self.fields.values():
            agg.cut(i)

    def drop_front(self, n: int) -> None:
        del self.times[:n]
        del self.values[:n]
        for name, agg in list(self.fields.items()):
            # aggregates that do not reach past the dropped samples, or whose prefix sums have
            # carried as many dropped samples as the key holds, are built afresh when next asked
            if len(agg.counts) - 1 < n or agg.shifted + n > len(self.times):
                del self.fields[name]
            else:
                agg.drop_front(n)


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
        group_of: Callable[[Hashable], Hashable] | None = None,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        """``name`` labels this history's eviction counts. ``max_fallback_age_ns``
        bounds how old the "last sample before ``t0``" may be (see :meth:`window`);
        None means any age. ``group_of`` puts each key in a group (a process's
        ``(pid, uuid)`` keys under its pid) that :meth:`window_group` reads
        without walking every key. Raises ValueError on a bound below 1."""
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
        self._group_of = group_of
        self._groups: dict[Hashable, dict[Hashable, None]] = {}  # group -> its keys, in insertion order
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
                self._grouped(key, True)
                while len(self._series) > self._max_keys:
                    self._grouped(self._series.popitem(last=False)[0], False)
                    evicted_keys += 1
            else:
                self._series.move_to_end(key)
            series.insert(t_ns, values)
            drop = len(series.times) - self._max_samples
            if drop > 0:
                evicted_samples = drop
            if self._max_age_ns is not None:
                cutoff = series.times[-1] - self._max_age_ns
                drop = max(drop, bisect.bisect_left(series.times, cutoff))
            if drop > 0:
                series.drop_front(drop)
        if evicted_samples:
            self._metrics.inc(EVICTIONS, evicted_samples, (("history", self.name), ("reason", "samples")))
        if evicted_keys:
            self._metrics.inc(EVICTIONS, evicted_keys, (("history", self.name), ("reason", "keys")))

    def window(
        self, key: Hashable, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """Statistics of ``key`` over ``[t0_ns, t1_ns]`` (both ends included).

        Field by field: every sample inside the window that holds the field.
        When none does (a window shorter than the sampling period, lying between
        two samples, or one holding only samples of other fields), the last
        sample before ``t0_ns`` that holds it: the state that held when the
        window opened. A source whose samples carry different fields at
        different times (a GPU's utilisation read more often than its
        temperature; a process's memory and its utilisation, which NVML stamps
        itself) so gets every field, each as fresh as it was read. A sample
        older than ``max_fallback_age_ns`` before ``t0_ns`` is refused, so a
        source that stopped sampling is not reported as current. ``samples``
        counts the samples inside and those used from before. Returns None when
        nothing qualifies or the key is unknown. A sample at or after ``t1_ns``
        that follows the window is never used: it describes later time.

        ``fields`` names the fields to summarise (None: all of them, found by
        walking the window's samples and those it may use from before it, back to
        ``max_fallback_age_ns``). A window costs the same whatever its
        length, per field summarised (module docstring), and a reader on the
        per-request path wants two or three of a GPU's dozen or more.
        """
        return self.window_many((key,), t0_ns, t1_ns, fields)

    def window_many(
        self, keys: Iterable[Hashable], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """:meth:`window` over several keys merged into one sample stream
        (each key's samples chosen by the same rule; means weighted by sample)."""
        if t1_ns < t0_ns:
            return None
        with self._lock:
            return self._summary(keys, t0_ns, t1_ns, fields)

    def window_each(
        self, keys: Iterable[Hashable], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]:
        """:meth:`window` of each key in turn, under one acquisition of the lock (the join
        asks for every GPU of a record at once)."""
        return self._windows(keys, False, t0_ns, t1_ns, fields)

    def window_group(
        self, group: Hashable, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> WindowStats | None:
        """:meth:`window_many` over the keys that ``group_of`` puts in ``group``
        (None when the history has no ``group_of``, or the group no key)."""
        if t1_ns < t0_ns:
            return None
        with self._lock:
            keys = self._groups.get(group)
            return self._summary(keys, t0_ns, t1_ns, fields) if keys else None

    def window_groups(
        self, groups: Iterable[Hashable], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None = None
    ) -> list[WindowStats | None]:
        """:meth:`window_group` of each group in turn, under one acquisition of the lock (the
        join asks for every process of a record's pod at once)."""
        return self._windows(groups, True, t0_ns, t1_ns, fields)

    def _windows(
        self, items: Iterable[Hashable], grouped: bool, t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None
    ) -> list[WindowStats | None]:
        """The window of each item (a key, or with ``grouped`` a group's keys), in order, under
        one acquisition of the lock."""
        if t1_ns < t0_ns:
            return [None for _ in items]
        out: list[WindowStats | None] = []
        with self._lock:
            for item in items:
                keys = self._groups.get(item) if grouped else (item,)
                out.append(self._summary(keys, t0_ns, t1_ns, fields) if keys else None)
        return out

    def _summary(
        self, keys: Iterable[Hashable], t0_ns: int, t1_ns: int, fields: tuple[str, ...] | None
    ) -> WindowStats | None:
        """The window's statistics over ``keys``; under the lock."""
        # each key's samples inside the window, [lo, hi) (empty when none is), and before it
        spans: list[tuple[_Series, int, int]] = []
        samples = 0
        first_ns = last_ns = 0
        for key in keys:
            series = self._series.get(key)
            if series is None:
                continue
            times = series.times
            lo = bisect.bisect_left(times, t0_ns)
            hi = bisect.bisect_right(times, t1_ns)
            if hi > lo:
                if not samples or times[lo] < first_ns:
                    first_ns = times[lo]
                if not samples or times[hi - 1] > last_ns:
                    last_ns = times[hi - 1]
                samples += hi - lo
            elif not lo:
                continue  # nothing inside and nothing before
            spans.append((series, lo, hi))
        if not spans:
            return None
        oldest = None if self._max_fallback_age_ns is None else t0_ns - self._max_fallback_age_ns
        if fields is None:  # every field any sample inside has, or any sample it may stand in for
            named: list[str] = []
            for series, lo, hi in spans:
                start = 0 if oldest is None else bisect.bisect_left(series.times, oldest)
                named.extend(f for v in series.values[min(start, lo):hi] for f in v)
            fields = tuple(dict.fromkeys(named))
        means: dict[str, float] = {}
        maxima: dict[str, float] = {}
        several = len(spans) > 1
        added: dict[str, float] = {} if several else maxima  # one key: its maximum is the sum
        stood_in: dict[tuple[int, int], int] = {}  # (key's series, sample) used from before -> time
        for name in fields:
            total = 0.0
            count = 0
            peak = -inf
            peaks = 0.0
            for series, lo, hi in spans:
                agg = series.field(name)
                counts = agg.counts
                n = counts[hi] - counts[lo]
                if n:
                    count += n
                    if hi - lo == 1:  # one sample (a short window's usual lot): its value as it came
                        m = agg.maxima[0][lo]
                        total += m
                    else:
                        total += agg.sums[hi] - agg.sums[lo]
                        m = agg.peak(lo, hi)
                else:
                    # none inside holds it: the state when the window opened, the last sample
                    # before it that does (counts[0] counts the holders dropped from the front)
                    held = counts[lo]
                    if held == counts[0]:
                        continue
                    j = lo - 1 if counts[lo - 1] != held else bisect.bisect_left(counts, held) - 1
                    t = series.times[j]
                    if oldest is not None and t < oldest:
                        continue
                    stood_in[(id(series), j)] = t
                    m = agg.maxima[0][j]
                    count += 1
                    total += m
                if m > peak:
                    peak = m
                peaks += m
            if count:
                means[name] = total / count
                maxima[name] = peak
                if several:
                    added[name] = peaks
        for t in stood_in.values():
            if not samples or t < first_ns:
                first_ns = t
            if not samples or t > last_ns:
                last_ns = t
            samples += 1
        if not samples:
            return None
        return WindowStats(samples=samples, mean=means, max=maxima, first_ns=first_ns, last_ns=last_ns,
                           max_sum=added)

    def _grouped(self, key: Hashable, present: bool) -> None:
        """Keep ``_groups`` in step with a key added (``present``) or gone; under the lock."""
        if self._group_of is None:
            return
        group = self._group_of(key)
        if present:
            self._groups.setdefault(group, {})[key] = None
            return
        keys = self._groups.get(group)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._groups[group]

    def latest(self, key: Hashable) -> tuple[int, Mapping[str, float]] | None:
        """The newest sample of ``key`` as ``(t_ns, values)``, or None."""
        with self._lock:
            series = self._series.get(key)
            if series is None or not series.times:
                return None
            return series.times[-1], series.values[-1]

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (not counted as an eviction: the caller chose it)."""
        with self._lock:
            if self._series.pop(key, None) is not None:
                self._grouped(key, False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)

