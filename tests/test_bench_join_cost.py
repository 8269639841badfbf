"""bench/join_cost.py: one short run through its command line, on the fake NVML."""

from __future__ import annotations

import pytest

from tests.harness import run_json_module


def test_join_cost_times_records_that_carry_their_gpu_window() -> None:
    out = run_json_module("bench.join_cost", "--history-seconds", "30", "--records", "50", "--repeat", "1",
                          "--gpus", "1,2", "--windows", "0.5,10", "--others", "2", "--json")
    assert out["no_gpu_us_per_record"] > 0
    rows = {(r["layout"], r["gpus"], r["window_s"]): r for r in out["gpu"]}
    assert set(rows) == {(layout, g, w) for layout in ("shared", "per_gpu") for g in (1, 2) for w in (0.5, 10.0)}
    assert all(r["us_per_record"] > 0 for r in rows.values())
    for layout in ("shared", "per_gpu"):
        # one sample a simulated second, the record ending on one: a 10 s window holds 11 per
        # GPU, a half-second one only the sample at its end
        assert rows[(layout, 1, 10.0)]["samples_per_gpu"] == 11
        assert rows[(layout, 2, 10.0)]["samples_per_gpu"] == 11
        assert rows[(layout, 1, 0.5)]["samples_per_gpu"] == 1
        # the last record timed (two GPUs, 10 s) carried both GPUs and their window
        example = out["example_attributes"][layout]
        assert example["gpu.uuids"] == ["GPU-bench-0000", "GPU-bench-0001"], example
        assert example["gpu.source"] == "nvml"
        assert example["gpu.window.samples"] == 22
        assert example["gpu.window.utilization.mean"] == pytest.approx(0.80)  # 80%, as a ratio
        # energy from the power draw (550 W on each GPU for 10 s, the pod's share of each GPU whole)
        assert example["gpu.window.pod.sm_share"] == 1.0
        assert example["gpu.window.pod.energy"] == pytest.approx(2 * 550 * 10)
    # the pod's memory peak, 8 GiB on each GPU: one process's on both, or a worker's on each,
    # which the pod's group found through their cgroup
    assert out["example_attributes"]["shared"]["gpu.window.pod.memory.peak"] == 2 * (8 << 30)
    assert out["example_attributes"]["per_gpu"]["gpu.window.pod.memory.peak"] == 2 * (8 << 30)
