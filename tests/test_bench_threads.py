"""bench/threads.py: the agent's CPU per request, thread by thread, under load."""

from __future__ import annotations

import threading

import pytest

from agent import procfs
from bench.threads import per_thread
from tests.harness import run_json_module


def test_threads_of_one_name_add_up_and_the_costliest_comes_first() -> None:
    before = {1: ("python3", 1_000_000, 5), 2: ("infersight-asse", 0, 0)}
    after = {1: ("python3", 3_000_000, 7), 2: ("infersight-asse", 8_000_000, 20), 3: ("python3", 1_000_000, 1)}
    rows = per_thread(before, after, 2.0, 1000)
    assert rows == [
        {"name": "infersight-asse", "threads": 1, "cpu_us_per_request": 8.0, "cpu_ms_per_s": 4.0,
         "wakeups_per_s": 10.0},
        # a thread that started between the readings counts from zero
        {"name": "python3", "threads": 2, "cpu_us_per_request": 3.0, "cpu_ms_per_s": 1.5, "wakeups_per_s": 1.5},
    ]
    assert per_thread(before, after, 2.0, 0)[0]["cpu_us_per_request"] is None


def test_a_thread_named_for_the_kernel_shows_its_name() -> None:
    seen: list[str] = []

    def run() -> None:
        procfs.name_thread("infersight-a-long-name")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append(f.read().strip())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["infersight-a-lo"]  # the kernel keeps 15 bytes


@pytest.mark.ebpf
@pytest.mark.slow
def test_the_pipelines_threads_are_measured_under_a_short_load() -> None:
    out = run_json_module("bench.threads", "--profile", "json", "--seconds", "2", "--connections", "4", "--json")
    assert out["requests"] > 100, out
    rows = {r["name"]: r for r in out["threads"]}
    # the pipeline's own threads, named for the kernel, did the per-request work
    assert {"infersight-drai", "infersight-asse"} <= set(rows), rows
    assert rows["infersight-asse"]["cpu_us_per_request"] > 0
    assert rows["infersight-drai"]["wakeups_per_s"] > 0
    total = sum(r["cpu_us_per_request"] for r in out["threads"])
    assert out["agent_cpu_us_per_request"] == pytest.approx(total, abs=0.05 * len(rows))
