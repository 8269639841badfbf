"""bench/grpc.py: a short run of each profile through its command line, with
real eBPF, and the label matching its accuracy figures depend on."""

from __future__ import annotations

from typing import Any

import pytest

from bench import parse_sweep
from bench.grpc import sample
from tests.harness import run_json_module


def run_bench(*args: str) -> dict[str, Any]:
    return run_json_module("bench.grpc", "--seconds", "1", "--rounds", "1", "--clients", "2", "--json", *args)


def assert_exact(out: dict[str, Any]) -> None:
    acc = out["accuracy"]
    assert acc["calls_completed"] > 0
    assert acc["records"] == acc["calls_completed"], acc
    assert acc["requests_lost"] == 0 and acc["events_lost"] == 0 and acc["h2_desync"] == 0, acc
    assert out["client_errors"] == 0
    assert out["exact"] is True
    # every client connection was followed in h2 mode from its preface
    assert acc["h2_connections"] == 2 and acc["parse_failures"] == 0, acc


@pytest.mark.ebpf
@pytest.mark.slow
def test_unary_profile_accounts_for_every_call() -> None:
    out = run_bench("--profile", "unary")
    assert set(out["calls_per_s"]) == {"untraced", "traced", "probe_only"}
    assert all(v > 0 for v in out["calls_per_s"].values())
    assert out["agent_cpu_us_per_call"] > 0
    assert_exact(out)


@pytest.mark.ebpf
@pytest.mark.slow
def test_stream_profile_records_per_stream_do_not_grow_with_responses() -> None:
    out = run_bench("--profile", "stream", "--responses", "32", "--sweep", "1,32")
    assert_exact(out)
    assert out["responses_per_s"]["traced"] == pytest.approx(32 * out["streams_per_s"]["traced"], rel=0.05)
    # most of a 32-response stream's frames never leave the kernel
    assert out["h2_frames_aggregated_share"] > 0.7
    one, many = out["sweep"]
    assert one["exact"] and many["exact"], out["sweep"]
    assert one["h2_desync"] == many["h2_desync"] == 0
    assert many["h2_frames_per_stream"] > 3 * one["h2_frames_per_stream"]
    # ... while what reaches user space per stream stays where it was
    grew = many["records_to_user_space_per_stream"] - one["records_to_user_space_per_stream"]
    assert grew < 1.0, out["sweep"]


def test_sample_sums_only_the_samples_with_the_asked_labels() -> None:
    m = {
        "infersight_kernel_h2_frames_total": {'{fate="sent"}': 12.0, '{fate="aggregated"}': 30.0},
        "infersight_events_lost_total": {'{type="data"}': 1.0, '{type="h2"}': 2.0},
        "infersight_records_emitted_total": {"": 7.0},
    }
    assert sample(m, "infersight_kernel_h2_frames_total", fate="sent") == 12.0
    assert sample(m, "infersight_kernel_h2_frames_total", fate="aggregated") == 30.0
    assert sample(m, "infersight_events_lost_total") == 3.0
    assert sample(m, "infersight_records_emitted_total") == 7.0
    assert sample(m, "infersight_absent_total") == 0.0
    assert parse_sweep("1, 8,32") == (1, 8, 32)
    assert parse_sweep("") == ()
