"""bench/stages.py: a short recording of each protocol, with real eBPF, replayed stage by stage."""

from __future__ import annotations

import pytest

from tests.harness import run_json_module


@pytest.mark.ebpf
@pytest.mark.slow
@pytest.mark.parametrize(("profile", "records_per_request"), [("json", 3), ("unary", 5), ("sse", 6)])
def test_replay_of_a_recording_gives_every_stage(profile: str, records_per_request: int) -> None:
    extra = ["--chunks", "10"] if profile == "sse" else []
    out = run_json_module("bench.stages", "--profile", profile, "--seconds", "1", "--repeat", "1", *extra, "--json")
    assert out.get("chunks") == (10 if profile == "sse" else None), out
    assert out["requests"] > 100, out
    # the recording is the probe's: a few records per request, as the overhead benchmarks count
    assert records_per_request <= out["records_per_request"] < records_per_request + 0.5, out
    cpu = out["cpu_us_per_request"]
    assert set(cpu) == {"decode", "assembly", "join", "export", "all"}
    # figures only: how they compare is a measurement (README), never a test's condition
    assert all(v > 0 for v in cpu.values()), cpu
