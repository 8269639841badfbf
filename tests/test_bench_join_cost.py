"""bench/join_cost.py: one short run through its command line, on the fake NVML."""

from __future__ import annotations

import pytest

from tests.harness import run_json_module


def test_join_cost_times_records_that_carry_their_gpu_window() -> None:
    out = run_json_module("bench.join_cost", "--history-seconds", "30", "--records", "50", "--repeat", "1",
                          "--gpus", "1,2", "--windows", "0.5,10", "--others", "2", "--json")
    assert out["no_gpu_us_per_record"] > 0
    rows = {(r["gpus"], r["window_s"]): r for r in out["gpu"]}
    assert set(rows) == {(1, 0.5), (1, 10.0), (2, 0.5), (2, 10.0)}, out["gpu"]
    assert all(r["us_per_record"] > 0 for r in rows.values())
    # one sample a simulated second, the record ending on one: a 10 s window holds 11 per GPU,
    # a half-second one only the sample at its end
    assert rows[(1, 10.0)]["samples_per_gpu"] == 11
    assert rows[(2, 10.0)]["samples_per_gpu"] == 11
    assert rows[(1, 0.5)]["samples_per_gpu"] == 1
    # the last record timed (two GPUs, 10 s) carried both GPUs and their window
    example = out["example_attributes"]
    assert example["gpu.uuids"] == ["GPU-bench-0000", "GPU-bench-0001"], example
    assert example["gpu.source"] == "nvml"
    assert example["gpu.window.samples"] == 22
    assert example["gpu.window.utilization.mean"] == pytest.approx(0.80)  # 80%, as a ratio
    # what the window's named fields feed: the process's memory peak, and energy from the power
    # draw (550 W on each GPU for 10 s, the pod's share of each GPU whole)
    assert example["gpu.window.pod.memory.peak"] == 8 << 30
    assert example["gpu.window.pod.sm_share"] == 1.0
    assert example["gpu.window.pod.energy"] == pytest.approx(2 * 550 * 10)
