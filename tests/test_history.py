from __future__ import annotations

import threading

import pytest

from agent.selfmetrics import SelfMetrics
from collectors.history import EVICTIONS, History

S = 1_000_000_000


def make(**kw: object) -> tuple[History, SelfMetrics]:
    m = SelfMetrics()
    return History("test", metrics=m, **kw), m  # type: ignore[arg-type]


def test_window_mean_and_max_over_several_samples() -> None:
    h, _ = make()
    for i, util in enumerate([0.2, 0.4, 0.9, 0.1]):
        h.add("gpu", i * S, {"util": util, "mem": 100.0 * i})
    w = h.window("gpu", 1 * S, 2 * S)
    assert w is not None
    assert w.samples == 2
    assert w.mean == pytest.approx({"util": 0.65, "mem": 150.0})
    assert w.max == {"util": 0.9, "mem": 200.0}
    assert (w.first_ns, w.last_ns) == (1 * S, 2 * S)


def test_window_of_named_fields_summarises_those_alone_as_the_whole_window_does() -> None:
    h, _ = make()
    for i, (util, power) in enumerate([(0.2, 300.0), (0.4, 650.0), (0.9, 500.0), (0.1, 100.0)]):
        h.add("gpu", i * S, {"util": util, "power": power, "mem": 100.0 * i, **({"pcie": 7.0} if i == 2 else {})})
    whole = h.window("gpu", 1 * S, 3 * S)
    w = h.window("gpu", 1 * S, 3 * S, ("util", "pcie", "absent"))
    assert whole is not None and w is not None
    # the named fields as the whole window has them; unnamed fields, and named ones no sample has, left out
    assert w.mean == pytest.approx({"util": whole.mean["util"], "pcie": 7.0})
    assert w.mean["util"] == pytest.approx((0.4 + 0.9 + 0.1) / 3)
    assert w.max == {"util": 0.9, "pcie": 7.0}
    assert (w.samples, w.first_ns, w.last_ns) == (whole.samples, whole.first_ns, whole.last_ns) == (3, 1 * S, 3 * S)
    # merged keys too; a window whose samples lack every named field still counts its samples
    h.add("gpu2", 2 * S, {"util": 0.5})
    both = h.window_many(("gpu", "gpu2"), 2 * S, 2 * S, ("util",))
    assert both is not None and both.samples == 2 and both.mean == pytest.approx({"util": 0.7})
    none = h.window("gpu2", 2 * S, 2 * S, ("power",))
    assert none is not None and none.samples == 1 and none.mean == {} and none.max == {}


def test_window_between_two_samples_uses_the_last_sample_before_it() -> None:
    h, _ = make()
    h.add("gpu", 1 * S, {"util": 0.3})
    h.add("gpu", 2 * S, {"util": 0.8})
    w = h.window("gpu", 1 * S + 100, 1 * S + 500)
    assert w is not None
    assert w.samples == 1
    assert w.mean == {"util": 0.3}
    assert w.first_ns == w.last_ns == 1 * S


def test_window_before_any_sample_or_unknown_key_is_none() -> None:
    h, _ = make()
    h.add("gpu", 5 * S, {"util": 0.3})
    assert h.window("gpu", 1 * S, 2 * S) is None
    assert h.window("other", 0, 10 * S) is None
    assert h.window("gpu", 6 * S, 5 * S) is None


def test_fallback_refuses_a_sample_older_than_the_bound() -> None:
    h, _ = make(max_fallback_age_ns=3 * S)
    h.add("gpu", 1 * S, {"util": 0.3})
    assert h.window("gpu", 3 * S, 4 * S) is not None
    assert h.window("gpu", 5 * S, 6 * S) is None


def test_fields_missing_in_some_samples_average_over_those_present() -> None:
    h, _ = make()
    h.add("gpu", 1, {"util": 0.2, "pcie": 10.0})
    h.add("gpu", 2, {"util": 0.4})
    w = h.window("gpu", 0, 10)
    assert w is not None
    assert w.mean == pytest.approx({"util": 0.3, "pcie": 10.0})


def test_out_of_order_samples_are_kept_in_time_order() -> None:
    h, _ = make()
    h.add("p", 30, {"v": 3.0})
    h.add("p", 10, {"v": 1.0})
    h.add("p", 20, {"v": 2.0})
    assert h.latest("p") == (30, {"v": 3.0})
    w = h.window("p", 15, 25)
    assert w is not None and w.mean == {"v": 2.0}


def test_samples_per_key_bound_evicts_oldest_and_counts() -> None:
    h, m = make(max_samples_per_key=3)
    for i in range(5):
        h.add("gpu", i, {"v": float(i)})
    w = h.window("gpu", 0, 10)
    assert w is not None
    assert (w.samples, w.first_ns) == (3, 2)
    assert m.get(EVICTIONS, (("history", "test"), ("reason", "samples"))) == 2


def test_key_bound_evicts_least_recently_written_key_and_counts() -> None:
    h, m = make(max_keys=2)
    h.add("a", 1, {"v": 1.0})
    h.add("b", 2, {"v": 1.0})
    h.add("a", 3, {"v": 1.0})  # "a" is now newer than "b"
    h.add("c", 4, {"v": 1.0})
    assert sorted(map(str, h.keys())) == ["a", "c"]
    assert m.get(EVICTIONS, (("history", "test"), ("reason", "keys"))) == 1


def test_age_bound_expires_old_samples_without_counting_them() -> None:
    h, m = make(max_age_ns=10 * S)
    h.add("gpu", 0, {"v": 1.0})
    h.add("gpu", 5 * S, {"v": 2.0})
    h.add("gpu", 12 * S, {"v": 3.0})
    w = h.window("gpu", 0, 20 * S)
    assert w is not None and w.first_ns == 5 * S
    assert m.total(EVICTIONS) == 0


def test_window_many_merges_keys_into_one_stream() -> None:
    h, _ = make()
    h.add((7, "GPU-a"), 10, {"sm": 0.2})
    h.add((7, "GPU-b"), 12, {"sm": 0.6})
    h.add((7, "GPU-b"), 50, {"sm": 1.0})
    w = h.window_many([(7, "GPU-a"), (7, "GPU-b"), (8, "GPU-a")], 0, 20)
    assert w is not None
    assert w.samples == 2
    assert w.mean == pytest.approx({"sm": 0.4})
    assert w.max == {"sm": 0.6}


def test_bad_bounds_raise() -> None:
    with pytest.raises(ValueError):
        History("x", max_keys=0)


def test_concurrent_writer_and_reader_stay_consistent() -> None:
    h, _ = make(max_samples_per_key=50)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                w = h.window("gpu", 0, 10**12)
                if w is not None:
                    assert w.samples <= 50
                    assert w.first_ns <= w.last_ns
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(5000):
        h.add("gpu", i, {"v": float(i)})
    stop.set()
    t.join(timeout=10)
    assert not errors
    w = h.window("gpu", 0, 10**12)
    assert w is not None and w.samples == 50 and w.last_ns == 4999
