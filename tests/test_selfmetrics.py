"""The agent's own metrics registry: bound counters count exactly as ``inc`` does."""

from __future__ import annotations

import sys
import threading

from agent.selfmetrics import SelfMetrics


def test_a_bound_counter_is_the_series_inc_counts() -> None:
    m = SelfMetrics()
    labels = (("reason", "x"),)
    c = m.counter("t.requests", labels)
    assert m.counter("t.requests", labels) is c  # one cell per series
    # like a series inc() has not touched yet: absent until counted
    assert [s for s in m.snapshot() if s.name == "t.requests"] == []
    c.inc()
    c.inc(2)
    m.inc("t.requests", 4, labels)  # the unbound way adds to the same series
    m.inc("t.requests", 1, (("reason", "y"),))
    assert m.get("t.requests", labels) == 7
    assert m.total("t.requests") == 8
    series = {s.labels: (s.kind, s.value) for s in m.snapshot() if s.name == "t.requests"}
    assert series == {labels: ("counter", 7), (("reason", "y"),): ("counter", 1)}


def test_bound_counters_lose_nothing_across_threads() -> None:
    m = SelfMetrics()
    c = m.counter("t.hits")

    def hit() -> None:
        for _ in range(20_000):
            c.inc()
            m.inc("t.hits")

    threads = [threading.Thread(target=hit) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change hands as often as the interpreter allows
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert m.get("t.hits") == 4 * 2 * 20_000
