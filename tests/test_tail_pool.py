"""The kernel's pool of tail rings, with real eBPF and a real streaming server.

A streamed response keeps its last writes in a tail ring that it takes from a
pool, in turn, at its first write past the samples. With a pool of one ring, a
quick stream that runs while a slow one is past its samples takes the slow
one's ring; the slow stream's next write takes the next ring (counted) with its
slots marked empty. Both streams keep their ends (finish reason, usage), and no
slot of the slow stream's summary holds the quick stream's bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from agent.targets import TargetConfig
from probes.socket_events import SR_TERMINATED, Decoder, SummaryEvent, unpack
from probes.sockets import SocketProbe, SocketProbeConfig
from tests.harness import running_agent, start_demo_server, wait_for

pytestmark = pytest.mark.ebpf

NO_WRITE = 0xFFFFFFFF  # probes/sockets.h: the index of a slot that holds no write of its response
SLOW, QUICK = "slow-model", "quick-model"


def _slow_with_quick_inside(url: str) -> None:
    """A 10-token stream, 0.25 s between tokens, and after its 8th token, between two of its
    writes, a whole 6-token stream with no wait between tokens. The quick stream's write
    indices fall within the slow one's, so a slot the quick stream left in the ring would
    pass for one of the slow stream's writes."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def stream(model: str, n: int, tpot: float, during: Callable[[], None] | None = None) -> None:
        chunks = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=n,
            stream_options={"include_usage": True}, extra_body={"ttft_s": 0.01, "tpot_s": tpot})
        got = 0
        for c in chunks:
            got += bool(c.choices and c.choices[0].delta.content)
            if got == 8 and during is not None:
                during()
                during = None
        assert got == n

    stream(SLOW, 10, 0.25, during=lambda: stream(QUICK, 6, 0.0))


def test_a_stream_whose_ring_was_taken_keeps_its_end_and_only_its_own_writes(tmp_path: Path) -> None:
    records: list[bytes] = []
    srv = start_demo_server(tmp_path)
    probe = SocketProbe(SocketProbeConfig(max_streams=1), on_records=lambda b: records.extend(unpack(b)))
    try:
        probe.add_target(srv.pid)
        _slow_with_quick_inside(srv.url)
        dec = Decoder(probe.config.layout)

        def summaries() -> list[SummaryEvent]:
            probe.drain(0)
            events = [dec.decode(r) for r in records]
            return [e for e in events  # each stream's summary at its chunked terminator
                    if isinstance(e, SummaryEvent) and e.tgid == srv.pid and e.reason == SR_TERMINATED]

        got = wait_for(lambda: s if len(s := summaries()) == 2 else None, what="two streamed summaries")
        assert probe.counters()["tails_reclaimed"] >= 1
        sample = probe.config.sample_writes
        by_model = {}
        for s in got:
            data = b"".join(t.head + t.tail for t in s.ring)
            by_model[SLOW if SLOW.encode() in data else QUICK] = (s, data)
        slow, slow_data = by_model[SLOW]
        quick, quick_data = by_model[QUICK]
        assert QUICK.encode() not in slow_data and SLOW.encode() not in quick_data
        for s in (slow, quick):
            # every slot is a write of its own response past the samples, or marked empty
            assert all(t.index == NO_WRITE or sample <= t.index < s.writes for t in s.ring), \
                [t.index for t in s.ring]
            own = b"".join(t.head + t.tail for t in s.ring if t.index != NO_WRITE)
            # the end: the finish reason, usage, [DONE] and the chunked terminator
            assert b'"finish_reason":"length"' in own and b'"usage"' in own and b"[DONE]" in own
        assert any(t.index == NO_WRITE for t in slow.ring)  # its slots from before were marked
    finally:
        probe.close()
        srv.stop()


def test_records_of_streams_whose_ring_was_taken_are_whole(tmp_path: Path) -> None:
    srv = start_demo_server(tmp_path)
    try:
        with running_agent(TargetConfig(pids=(srv.pid,)), probe=SocketProbeConfig(max_streams=1)) as a:
            mark = a.mark()
            _slow_with_quick_inside(srv.url)
            recs = a.wait_records(mark, 2)
            a.pipeline._read_kernel_counters()
            assert a.metrics.get("infersight.kernel.tail_rings.reclaimed") >= 1
            assert a.metrics.total("infersight.assembly.tails.missing") == 0
        quick, slow = sorted(recs, key=lambda r: r.duration_s)
        assert (quick.request_model, slow.request_model) == (QUICK, SLOW)
        assert (quick.output_events, slow.output_events) == (6, 10)
        for rec in (quick, slow):
            assert rec.finish_reasons == ("length",)
            assert rec.output_tokens == rec.output_events
        assert slow.time_per_output_token_s is not None and slow.time_per_output_token_s > 0.2
    finally:
        srv.stop()
