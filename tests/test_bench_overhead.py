"""bench/overhead.py: the line through CPU per request against stream length, and
one short streamed run through its command line, with real eBPF and wrk."""

from __future__ import annotations

import os

import pytest

from bench.overhead import bracketed, line_fit, median_interval
from tests.harness import run_json_module


def test_line_fit_recovers_slope_and_intercept() -> None:
    slope, intercept = line_fit([(13.0, 31.0), (53.0, 111.0), (203.0, 411.0)])
    assert slope == pytest.approx(2.0)
    assert intercept == pytest.approx(5.0)


def test_line_fit_least_squares_through_noisy_points() -> None:
    # no line passes through these; least squares: Sxy / Sxx = 3 / 5, through the mean (1.5, 1.5)
    slope, intercept = line_fit([(0.0, 1.0), (1.0, 0.0), (2.0, 3.0), (3.0, 2.0)])
    assert slope == pytest.approx(0.6)
    assert intercept == pytest.approx(0.6)


def test_line_fit_needs_two_distinct_lengths() -> None:
    with pytest.raises(ValueError):
        line_fit([(53.0, 50.0), (53.0, 52.0)])


def test_each_run_is_set_against_the_untraced_runs_around_it() -> None:
    # two rounds: untraced runs before the first way and after every way
    untraced = [100.0, 80.0, 120.0, 100.0, 90.0, 110.0, 100.0]
    runs = {"traced": [90.0, 95.0], "probe_only": [50.0, 100.0], "otel_asgi": [55.0, 60.0]}
    got = bracketed(untraced, runs)
    assert got["traced"] == pytest.approx([90 / 90, 95 / 95])
    assert got["probe_only"] == pytest.approx([50 / 100, 100 / 100])
    assert got["otel_asgi"] == pytest.approx([55 / 110, 60 / 105])
    # a run without an untraced run on each side is refused, not guessed
    with pytest.raises(ValueError, match="bracket"):
        bracketed(untraced[:-1], runs)
    with pytest.raises(ValueError, match="bracket"):
        bracketed(untraced, {**runs, "otel_asgi": [55.0]})


def test_interval_for_the_median_from_ranked_rounds() -> None:
    # five rounds: only the lowest and highest hold the median at 90%, with chance 1 - 2/32
    assert median_interval([0.93, 0.88, 0.97, 0.91, 0.95]) == (0.88, 0.97, pytest.approx(30 / 32))
    # twelve: the 3rd and 10th ranked, 1 - 2 (1 + 12 + 66) / 4096; the 4th and 9th would hold it
    # with 1 - 2 (1 + 12 + 66 + 220) / 4096 = 0.854 only
    rounds = [float(x) for x in (12, 3, 7, 1, 9, 11, 2, 5, 10, 4, 8, 6)]
    assert median_interval(rounds) == (3.0, 10.0, pytest.approx(1 - 2 * 79 / 4096))
    assert median_interval(rounds, level=0.8) == (4.0, 9.0, pytest.approx(1 - 2 * 299 / 4096))
    # too few rounds for the level: the extremes, and the lower chance they really have
    assert median_interval([2.0, 1.0]) == (1.0, 2.0, pytest.approx(0.5))
    with pytest.raises(ValueError, match="two values"):
        median_interval([1.0])


@pytest.mark.ebpf
@pytest.mark.slow
def test_streamed_profile_reports_the_marginal_cost_per_chunk() -> None:
    out = run_json_module("bench.overhead", "--profile", "sse", "--seconds", "1", "--rounds", "1",
                          "--connections", "2", "--chunks", "5", "--sweep-chunks", "5,40", "--idle-seconds", "2",
                          "--agent-cpus", "1", "--json", timeout=300)
    assert out["accounted"] is True, out["accuracy"]
    # the agent and the probe-only drain ran on wrk's core alone, off the server's
    assert out["agent_cpus"] == [1], out["agent_cpus"]
    # an attached agent does a little periodic work even with no traffic: measured, not zero
    assert 0 < out["agent_idle_cpu_ms_per_s"] < 100, out["agent_idle_cpu_ms_per_s"]
    assert out["accuracy"]["records"] > 0
    # one round: its own ratios are the medians', each against the untraced runs around it
    assert out["ratio_each_round"] == {"traced": [out["ratio_traced_to_untraced"]],
                                       "probe_only": [out["ratio_probe_only_to_untraced"]],
                                       "otel_asgi": [out["ratio_otel_asgi_to_untraced"]]}, out
    # one round tells nothing of where the median lies
    assert out["ratio_interval"] == {"traced": None, "probe_only": None, "otel_asgi": None}, out
    each = out["requests_per_s_each_round"]
    u = each["untraced"]
    assert len(u) == 4, each
    for j, way in enumerate(("traced", "probe_only", "otel_asgi")):
        assert out["ratio_each_round"][way][0] == pytest.approx(each[way][0] / ((u[j] + u[j + 1]) / 2), abs=1e-4)
    by_chunks = out["agent_cpu_us_per_request_by_chunks"]
    assert set(by_chunks) == {"5", "40"}  # the main length is not swept twice
    assert all(v > 0 for v in by_chunks.values())
    # the fit goes through both points: two lengths, one line
    slope = out["agent_cpu_us_per_chunk_marginal"]
    fixed = out["agent_cpu_us_per_streamed_request_fixed"]
    assert fixed + slope * 8 == pytest.approx(by_chunks["5"], abs=0.05)
    assert fixed + slope * 43 == pytest.approx(by_chunks["40"], abs=0.05)
    # the average per chunk divides the whole cost of a request by its 8 chunks
    assert out["agent_cpu_us_per_chunk"] == pytest.approx(by_chunks["5"] / 8, abs=0.01)


def test_a_cpu_list_taskset_refuses_is_an_error_before_any_run(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.overhead import main

    with pytest.raises(SystemExit) as e:
        main(["--agent-cpus", "4096", "--seconds", "1"])
    if os.geteuid() != 0:
        assert "run it as root" in str(e.value.code)
    else:
        assert e.value.code == 2
        assert "--agent-cpus: taskset does not accept the CPU list '4096'" in capsys.readouterr().err
