"""bench/server_cost.py: the probe's cost on the server's own CPU, and its split by symbol."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.server_cost import _REPORT_LINE, compare, group, split_us
from tests.harness import run_json_module

# lines as `perf report --sort dso,symbol --stdio -n` prints them (perf 6.1)
REPORT = """\
# Overhead       Samples  Shared Object                                   Symbol
# ........  ............  ..............................................  ..........
#
    51.80%         16801  python3.11                                      [.] _PyEval_EvalFrameDefault
     9.34%          3030  [kernel.kallsyms]                               [k] _raw_spin_unlock_irqrestore
     0.48%           156  bpf_prog_d3b2a211e49323f4_data_exit             [k] bpf_prog_d3b2a211e49323f4_data_exit
     0.11%            36  python3.11                                      [.] 0x000000000010ba84
"""


def test_report_lines_give_dso_and_symbol_samples() -> None:
    rows = [m.groups() for line in REPORT.splitlines() if (m := _REPORT_LINE.match(line))]
    assert rows == [
        ("16801", "python3.11", ".", "_PyEval_EvalFrameDefault"),
        ("3030", "[kernel.kallsyms]", "k", "_raw_spin_unlock_irqrestore"),
        ("156", "bpf_prog_d3b2a211e49323f4_data_exit", "k", "bpf_prog_d3b2a211e49323f4_data_exit"),
        ("36", "python3.11", ".", "0x000000000010ba84"),
    ]


def test_samples_split_the_cpu_per_request_and_compare_by_group() -> None:
    base = split_us(Counter({("python3.11", "eval"): 300, ("[kernel.kallsyms]", "tcp"): 100}), 400.0)
    assert base == {("python3.11", "eval"): 300.0, ("[kernel.kallsyms]", "tcp"): 100.0}
    probed = split_us(Counter({("python3.11", "eval"): 310, ("[kernel.kallsyms]", "tcp"): 100,
                               ("[kernel.kallsyms]", "trace_call_bpf"): 20,
                               ("bpf_prog_ab_data_exit", "bpf_prog_ab_data_exit"): 5}), 435.0)
    assert split_us(Counter(), 400.0) == {}
    assert group(("bpf_prog_ab_data_exit", "x")) == "bpf_programs"
    assert group(("[kernel.kallsyms]", "x")) == "kernel"
    assert group(("libc.so.6", "x")) == "user"
    out = compare(base, probed, top=2)
    assert out["delta_us_per_request"] == {"bpf_programs": 5.0, "kernel": 20.0, "user": 10.0}
    assert out["top_symbols_us_per_request"] == [
        {"symbol": "trace_call_bpf", "where": "kernel", "untraced": 0.0, "probe": 20.0, "delta": 20.0},
        {"symbol": "eval", "where": "user", "untraced": 300.0, "probe": 310.0, "delta": 10.0},
    ]


@pytest.mark.ebpf
@pytest.mark.slow
def test_server_cpu_with_and_without_the_probe_under_a_short_load() -> None:
    out = run_json_module("bench.server_cost", "--profile", "json", "--seconds", "2", "--rounds", "1", "--perf",
                          "--json")
    assert out["requests"]["untraced"] > 100 and out["requests"]["probe"] > 100, out
    for key in ("requests_per_s", "server_cpu_us_per_request", "server_busy", "wrk_cpu_us_per_request"):
        assert out[key]["untraced"] > 0 and out[key]["probe"] > 0, (key, out[key])
    # the server is pinned to its own core and loaded by wrk: busy most of the run either way
    assert out["server_busy"]["untraced"] > 0.5, out
    # the probe's programs ran on the server's syscalls, so only the probed run has their samples
    assert out["perf"]["delta_us_per_request"]["bpf_programs"] > 0, out["perf"]
    assert len(out["perf"]["top_symbols_us_per_request"]) == 12, out["perf"]
