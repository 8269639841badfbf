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


def test_each_field_falls_back_on_its_own() -> None:
    """A field that no sample inside the window holds is taken from the last sample before it
    that holds it: a GPU read every 0.2 s for utilisation and every second for the rest."""
    h, _ = make(max_fallback_age_ns=10 * S)
    h.add("gpu", 1 * S, {"temp": 55.0, "util": 0.3})
    h.add("gpu", 2 * S, {"util": 0.9})
    h.add("gpu", 3 * S, {"util": 0.8})
    w = h.window("gpu", 2 * S + 5, 2 * S + 6)  # none inside
    assert w is not None
    assert (w.mean, w.samples, w.first_ns, w.last_ns) == ({"util": 0.9, "temp": 55.0}, 2, 1 * S, 2 * S)
    w = h.window("gpu", 2 * S + 5, 3 * S + 5, ("util", "temp"))  # one inside, holding util alone
    assert w is not None
    assert (w.mean, w.samples, w.first_ns, w.last_ns) == ({"util": 0.8, "temp": 55.0}, 2, 1 * S, 3 * S)
    # a holder older than the bound stands in for nothing
    w = h.window("gpu", 11 * S + 5, 12 * S, ("util", "temp"))
    assert w is not None and w.mean == {"util": 0.8} and w.samples == 1


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
    assert len(h) == 2 and h.latest("b") is None
    assert h.latest("a") == (3, {"v": 1.0}) and h.latest("c") == (4, {"v": 1.0})
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
    assert w.max_sum == pytest.approx({"sm": 0.8})  # each key's maximum, added


def test_window_each_gives_each_keys_own_window_in_order() -> None:
    h, _ = make()
    h.add("a", 10, {"util": 0.2})
    h.add("a", 12, {"util": 0.6})
    h.add("b", 11, {"util": 1.0, "power": 300.0})
    wa, none, wb = h.window_each(["a", "unknown", "b"], 0, 20, ("util", "power"))
    assert none is None
    assert wa is not None and wb is not None
    assert (wa.samples, wa.mean, wa.max) == (2, pytest.approx({"util": 0.4}), {"util": 0.6})
    assert (wb.samples, wb.mean, wb.max, wb.first_ns) == (1, {"util": 1.0, "power": 300.0},
                                                          {"util": 1.0, "power": 300.0}, 11)
    assert wa == h.window("a", 0, 20, ("util", "power")) and wa != wb
    assert h.window_each(["a", "b"], 20, 0) == [None, None]  # an inverted window holds nothing
    assert repr(wb) == ("WindowStats(samples=1, mean={'util': 1.0, 'power': 300.0}, "
                        "max={'util': 1.0, 'power': 300.0}, first_ns=11, last_ns=11, "
                        "max_sum={'util': 1.0, 'power': 300.0})")


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


def reference(samples: list[tuple[int, dict[str, float]]], t0: int, t1: int, fallback_age: int | None,
              fields: tuple[str, ...] | None) -> list[tuple[int, dict[str, float]]]:
    """The samples a window over [t0, t1] uses, by the rule in History.window, from a plain sorted
    list: those inside, and for each field none of them holds, the last one before t0 holding it
    (with only the fields it stands in for)."""
    inside = [(t, v) for t, v in samples if t0 <= t <= t1]
    before = [(t, v) for t, v in samples if t < t0 and (fallback_age is None or t0 - t <= fallback_age)]
    names = fields if fields is not None else tuple(dict.fromkeys(f for _, v in inside + before for f in v))
    used: dict[int, tuple[int, dict[str, float]]] = {}  # position in before -> (time, fields used)
    for name in names:
        if any(name in v for _, v in inside):
            continue
        holders = [i for i, (_, v) in enumerate(before) if name in v]
        if holders:
            t, v = before[holders[-1]]
            used.setdefault(holders[-1], (t, {}))[1][name] = v[name]
    return [used[i] for i in sorted(used)] + inside


def test_running_aggregates_match_a_walk_of_the_samples_through_inserts_evictions_and_rebuilds() -> None:
    import random

    rng = random.Random(20261205)
    cap, age = 40, 300
    h, _ = make(max_samples_per_key=cap, max_age_ns=age, max_fallback_age_ns=25)
    kept: dict[str, list[tuple[int, dict[str, float]]]] = {"a": [], "b": []}
    now = 0
    checked = strided = 0
    for step in range(1500):
        key = rng.choice("ab")
        now += rng.randint(1, 6)
        t = now - rng.randint(1, 40) if rng.random() < 0.15 else now  # some arrive out of order
        values: dict[str, float] = {}
        if rng.random() < 0.8:
            values["util"] = rng.choice([0.0, 0.25, 0.5, 1.0]) * rng.randint(0, 4)
        if rng.random() < 0.5:
            values["mem"] = float(rng.randint(-5, 1 << 40))
        h.add(key, t, values)
        series = kept[key]
        series.insert(sum(1 for st, _ in series if st <= t), (t, values))
        del series[:max(0, len(series) - cap)]
        newest = series[-1][0]
        series[:] = [(st, v) for st, v in series if st >= newest - age]
        if step % 3:
            continue
        for _ in range(4):
            t0 = rng.randint(now - 350, now + 5)
            t1 = t0 + rng.choice([0, 1, 3, 10, 30, 80, 200, 400])
            fields = rng.choice([("util",), ("util", "mem"), ("mem", "absent"), None])
            keys = rng.choice([("a",), ("b",), ("a", "b")])
            by_key = {k: reference(kept[k], t0, t1, 25, fields) for k in keys}
            used = [s for k in keys for s in by_key[k]]
            w = h.window_many(keys, t0, t1, fields)
            # each key's own window, under one lock, is the window of that key alone
            assert h.window_each(keys, t0, t1, fields) == [h.window(k, t0, t1, fields) for k in keys]
            if not used:
                assert w is None
                continue
            assert w is not None
            checked += 1
            strided += len(used) > 16
            assert w.samples == len(used)
            assert (w.first_ns, w.last_ns) == (min(t for t, _ in used), max(t for t, _ in used))
            names = fields if fields is not None else tuple(dict.fromkeys(f for _, v in used for f in v))
            want_mean, want_max = {}, {}
            for name in names:
                present = [v[name] for _, v in used if name in v]
                if present:
                    want_mean[name] = sum(present) / len(present)
                    want_max[name] = max(present)
            assert w.max == want_max
            # each key's own maximum, added over the keys (a process's peaks on each of its GPUs)
            want_sum = {name: sum(max(v[name] for _, v in by_key[k] if name in v)
                                  for k in keys if any(name in v for _, v in by_key[k]))
                        for name in want_max}
            assert w.max_sum.keys() == want_sum.keys()
            for name, total in want_sum.items():
                assert w.max_sum[name] == pytest.approx(total, rel=1e-12)
            assert w.mean.keys() == want_mean.keys()
            for name, mean in want_mean.items():
                assert w.mean[name] == pytest.approx(mean, rel=1e-9, abs=1e-9)
    # the walk reached windows of both kinds: two table entries and the strided walk
    assert checked > 1000 and strided > 100


def test_a_small_mean_after_many_large_samples_keeps_its_precision() -> None:
    # the prefix sums are rebuilt as samples leave, so they never carry more than about twice
    # what the key holds: large values long gone cannot swamp a window of small ones
    h, _ = make(max_samples_per_key=40)
    t = 0
    for value in [1e13] * 2000 + [0.001] * 100:
        t += 1
        h.add("gpu", t, {"x": value})
        w = h.window("gpu", t - 2, t, ("x",))  # asked after every sample, as a busy join does
        assert w is not None and w.samples == min(t, 3)
    w = h.window("gpu", t - 9, t, ("x",))
    assert w is not None and w.samples == 10
    assert w.mean["x"] == pytest.approx(0.001, rel=1e-9)
    assert w.max["x"] == 0.001


def test_window_group_reads_the_keys_of_a_group_as_keys_come_and_go() -> None:
    h, _ = make(max_keys=3, group_of=lambda key: key[0])
    h.add((7, "GPU-a"), 10, {"sm": 0.2})
    h.add((7, "GPU-b"), 12, {"sm": 0.6})
    h.add((8, "GPU-a"), 11, {"sm": 0.9})
    w = h.window_group(7, 0, 20)
    assert w is not None and w.samples == 2 and w.mean == pytest.approx({"sm": 0.4})
    assert w == h.window_many([(7, "GPU-a"), (7, "GPU-b")], 0, 20)
    h.add((9, "GPU-a"), 13, {"sm": 0.1})  # the key bound evicts (7, "GPU-a"), least recently written
    w = h.window_group(7, 0, 20)
    assert w is not None and w.samples == 1 and w.mean == {"sm": 0.6}
    h.discard((7, "GPU-b"))
    assert h.window_group(7, 0, 20) is None
    h.add((7, "GPU-c"), 14, {"sm": 0.5})
    w = h.window_group(7, 0, 20)
    assert w is not None and w.mean == {"sm": 0.5}
    assert h.window_group(8, 0, 20) is not None and h.window_group(5, 0, 20) is None
    # several groups at once, in the order asked: each the group's own window
    assert h.window_groups([8, 5, 7], 0, 20, ("sm",)) == [h.window_group(g, 0, 20, ("sm",)) for g in (8, 5, 7)]
    assert h.window_groups([8, 5, 7], 0, 20)[1] is None
    assert h.window_groups([8, 7], 20, 0) == [None, None]
    # a history without groups has none to read
    plain, _ = make()
    plain.add((7, "GPU-a"), 10, {"sm": 0.2})
    assert plain.window_group(7, 0, 20) is None
    assert plain.window_groups([7], 0, 20) == [None]


def test_a_one_sample_window_gives_the_sample_as_it_came() -> None:
    # a window between two samples reads the one before it: no rounding from the running sums
    h, _ = make()
    for i, x in enumerate([0.1, 0.2, 0.7, 0.3]):
        h.add("gpu", i * S, {"x": x})
    for i, x in enumerate([0.1, 0.2, 0.7, 0.3]):
        w = h.window("gpu", i * S + 1, i * S + 2, ("x",))
        assert w is not None and w.samples == 1 and w.mean == {"x": x} and w.max == {"x": x}


def test_a_value_that_is_not_finite_counts_as_absent_and_spoils_no_other_window() -> None:
    h, _ = make()
    for i, x in enumerate([0.5, float("nan"), float("inf"), 0.25, 0.75]):
        h.add("gpu", i * S, {"x": x, "y": 1.0})
    w = h.window("gpu", 0, 4 * S)
    assert w is not None and w.samples == 5
    assert w.mean == {"x": 0.5, "y": 1.0} and w.max == {"x": 0.75, "y": 1.0}
    w = h.window("gpu", 3 * S, 4 * S)
    assert w is not None and w.mean == {"x": 0.5, "y": 1.0}
    # only the two that are not measurements inside: x is the state before the window, as for
    # any field no sample inside holds
    w = h.window("gpu", 1 * S, 2 * S)
    assert w is not None and w.samples == 3 and w.mean == {"x": 0.5, "y": 1.0} and w.first_ns == 0
