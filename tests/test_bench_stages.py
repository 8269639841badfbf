"""bench/stages.py: a short recording of each protocol, with real eBPF, replayed stage by stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import stages
from probes.socket_events import pack, unpack
from tests.harness import run_json_module


@pytest.mark.ebpf
@pytest.mark.slow
@pytest.mark.parametrize(("profile", "records_per_request"),
                         [("json", 3), ("unary", 5), ("sse", 5), ("responses", 10)])
def test_replay_of_a_recording_gives_every_stage(profile: str, records_per_request: int) -> None:
    """A Responses stream's request sends its first 8 response writes (the head, the four
    envelope events before the first delta, three deltas), its request and its summary."""
    streamed = profile in ("sse", "responses")
    extra = ["--chunks", "10"] if streamed else []
    out = run_json_module("bench.stages", "--profile", profile, "--seconds", "1", "--repeat", "1", *extra, "--json")
    assert out.get("chunks") == (10 if streamed else None), out
    assert out["requests"] > 100, out
    # the recording is the probe's: a few records per request, as the overhead benchmarks count
    assert records_per_request <= out["records_per_request"] < records_per_request + 0.5, out
    cpu = out["cpu_us_per_request"]
    assert set(cpu) == {"decode", "assembly", "join", "export", "all"}
    # figures only: how they compare is a measurement (README), never a test's condition
    assert all(v > 0 for v in cpu.values()), cpu


def test_a_recording_saved_loads_back_as_it_was(tmp_path: Path) -> None:
    records = [[b"\x01" * 70, b"", b"\x02abc"], [], [bytes(range(256)) * 6]]
    batches = [pack(b) for b in records]  # as the probe's drain hands them on
    path = tmp_path / "rec.bin"
    stages.save(batches, path)
    assert stages.load(path) == batches
    assert [unpack(b) for b in stages.load(path)] == records
    data = path.read_bytes()
    for cut in (len(data) - 1, 5, 2):  # inside a record, a record's length, a batch's count
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut short"):
            stages.load(tmp_path / "cut.bin")


@pytest.mark.ebpf
@pytest.mark.slow
def test_a_saved_recording_replays_to_the_same_requests(tmp_path: Path) -> None:
    path = tmp_path / "json.rec"
    live = run_json_module("bench.stages", "--profile", "json", "--seconds", "1", "--repeat", "1", "--save", str(path),
                           "--json")
    loaded = run_json_module("bench.stages", "--load", str(path), "--repeat", "1", "--json")
    assert loaded["loaded"] == str(path)
    assert live["requests"] > 100, live
    assert (loaded["requests"], loaded["records"]) == (live["requests"], live["records"])
    assert set(loaded["cpu_us_per_request"]) == {"decode", "assembly", "join", "export", "all"}
