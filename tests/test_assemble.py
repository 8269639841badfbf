"""Request assembly from probe records, without a kernel: records are built
with the probe's own layouts (probes/socket_events.py) and fed to the real
Assembler. These pin the accounting rules: every request phase becomes a
record or one counted loss, never both and never neither."""

from __future__ import annotations

import json
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import http1, llm
from agent.assemble import Assembler, AssemblyConfig
from agent.clock import Clock
from agent.record import Request
from agent.selfmetrics import SelfMetrics
from probes import socket_events as se

LAYOUT = se.Layout()
MS = 1_000_000
T0 = 10_000 * MS


def data(conn: int, seq: int, index: int, direction: int, ts: int, payload: bytes, *, length: int | None = None,
         lost: int = 0, fd: int = 7, tgid: int = 4242) -> bytes:
    n = len(payload) if length is None else length
    head = payload[: LAYOUT.head_cap]
    hdr = se.DATA_HEADER.pack(se.EV_DATA, direction, 0, se.ROLE_SERVER, tgid, conn, ts, fd, seq, n, index,
                              len(head), 0, lost, 0)
    return hdr + head


def summary(conn: int, seq: int, reason: int, *, flags: int = 0, writes: int = 0, reads: int = 1,
            start: int = T0, last_write: int = 0, eof: int = 0, lost: int = 0, fd: int = 7,
            tgid: int = 4242) -> bytes:
    fields = [se.EV_SUMMARY, reason, flags, se.ROLE_SERVER, tgid, conn, last_write or start, fd, seq,
              start, start, 0, last_write, eof, 100, 1000, reads, writes, lost, 0, *([0] * se.GAP_BUCKETS)]
    return se.SUMMARY_HEADER.pack(*fields)


class Harness:
    def __init__(self, alive: bool = True) -> None:
        self.records: list[Request] = []
        self.metrics = SelfMetrics()
        self.alive = alive
        self.asm = Assembler(AssemblyConfig(idle_check_s=1.0), self.records.append, clock=Clock(),
                             decoder=se.Decoder(LAYOUT), process_name=lambda pid: "server",
                             conn_alive=lambda pid, fd, cid: self.alive, metrics=self.metrics)

    def feed(self, *raws: bytes) -> None:
        self.asm.feed(se.pack(raws))

    def lost(self, reason: str | None = None) -> float:
        if reason is None:
            return self.metrics.total("infersight.requests.lost")
        return self.metrics.get("infersight.requests.lost", (("reason", reason),))


GET = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
HEAD_200 = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"


def test_json_exchange_completes_at_its_last_body_byte() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           data(1, 1, 0, se.DIR_OUT, T0 + 2 * MS, HEAD_200),
           data(1, 1, 1, se.DIR_OUT, T0 + 3 * MS, b'{"ok":true}'))
    (r,) = h.records
    assert (r.method, r.path, r.status_code, r.streaming) == ("GET", "/v1/models", 200, False)
    assert r.duration_s == 0.003
    assert not r.aborted and r.error_type is None and h.lost() == 0


def test_client_gone_before_any_response_is_an_aborted_record() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           summary(1, 1, se.SR_CLOSE, flags=se.CF_PEER_EOF, eof=T0 + 5 * MS))
    (r,) = h.records
    assert r.status_code is None and r.aborted and r.duration_s == 0.005


def test_response_to_a_request_before_attach_is_neither_record_nor_loss() -> None:
    # a connection seeded mid-exchange: the kernel saw no request phase start
    h = Harness()
    h.feed(data(1, 0, 0, se.DIR_OUT, T0, HEAD_200), data(1, 0, 1, se.DIR_OUT, T0 + MS, b'{"ok":true}'),
           data(1, 1, 0, se.DIR_IN, T0 + 9 * MS, GET),
           data(1, 1, 0, se.DIR_OUT, T0 + 10 * MS, HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1 and h.records[0].path == "/v1/models"
    assert h.lost() == 0
    assert h.metrics.get("infersight.assembly.orphan.writes") == 2


def test_a_phase_with_lost_records_is_one_loss_not_a_record() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           # write 0 of the response was lost: the next record says so
           data(1, 1, 1, se.DIR_OUT, T0 + 3 * MS, b'{"ok":true}', lost=1),
           data(1, 2, 0, se.DIR_IN, T0 + 9 * MS, GET),
           data(1, 2, 0, se.DIR_OUT, T0 + 10 * MS, HEAD_200 + b'{"ok":true}'))
    (r,) = h.records
    assert r.duration_s == 0.001  # the second phase's (read at +9 ms, answered at +10 ms)
    assert h.lost("capture_lost") == 1


def test_a_phase_first_seen_in_its_summary_is_one_loss() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}'),
           # phase 2's data records were lost; its summary arrives
           summary(1, 2, se.SR_CLOSE, writes=9, last_write=T0 + 20 * MS))
    assert len(h.records) == 1 and h.lost("capture_lost") == 1
    # a summary of an unknown connection, and the same one again, count once
    h.feed(summary(99, 3, se.SR_CLOSE, writes=9), summary(99, 3, se.SR_CLOSE, writes=9))
    assert h.lost("capture_lost") == 2


def test_an_open_request_whose_connection_vanished_is_counted_at_the_sweep() -> None:
    h = Harness(alive=True)
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, b"HTTP/1.1 200 OK\r\n"
                                                   b"transfer-encoding: chunked\r\n\r\n"))
    assert h.asm.open_requests() == 1 and len(h.asm.active()) == 1
    h.asm.sweep(T0 + 5_000 * MS)  # still streaming, says the kernel
    assert h.asm.open_requests() == 1 and h.lost() == 0
    h.alive = False
    h.asm.sweep(T0 + 10_000 * MS)
    assert h.asm.open_requests() == 0 and not h.asm.active()
    assert h.lost("close_lost") == 1 and not h.records


def test_process_exit_ends_its_open_requests() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, b"HTTP/1.1 200 OK\r\n"
                                                   b"transfer-encoding: chunked\r\n\r\n"),
           se.PROC_EVENT.pack(se.EV_PROC, se.PK_EXIT, 0, 4242, 4242, 0, T0 + 9 * MS, b"server"))
    (r,) = h.records
    assert r.error_type == "process_exit" and not r.aborted and r.status_code == 200


def test_pipelined_requests_in_one_read_share_their_phase() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET + GET),
           data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}' + HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1
    assert h.metrics.get("infersight.assembly.pipelined") == 1


def test_undecodable_records_are_counted_and_skipped() -> None:
    h = Harness()
    h.feed(b"\x09garbage", data(1, 1, 0, se.DIR_IN, T0, GET)[:20],
           data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1
    assert h.metrics.get("infersight.parse.failures", (("reason", "decode"),)) == 2


def test_traceparent_and_request_body_metadata() -> None:
    body = b'{"messages":[{"role":"user","content":"SECRET PROMPT"}],"model":"m-1","stream":false}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-type: application/json\r\n"
           b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
           b"content-length: %d\r\n\r\n" % len(body)) + body
    resp_body = (b'{"id":"x","object":"chat.completion","model":"m-1","choices":[{"index":0,"message":'
                 b'{"role":"assistant","content":"SECRET ANSWER"},"finish_reason":"stop"}],'
                 b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}')
    resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(resp_body)
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, req), data(1, 1, 0, se.DIR_OUT, T0 + MS, resp + resp_body))
    (r,) = h.records
    assert r.trace_id == "0af7651916cd43dd8448eb211c80319c" and r.parent_span_id == "b7ad6b7169203331"
    assert (r.operation, r.request_model, r.response_model) == ("chat", "m-1", "m-1")
    assert (r.input_tokens, r.output_tokens, r.finish_reasons) == (5, 2, ("stop",))
    assert "SECRET" not in r.to_json()


# --- a write of one chunk holding one SSE event, read in one step -----------------------------

SSE_POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 28\r\n\r\n" \
           b'{"model":"m","stream":true}\n'
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


def _event(delta: str, finish: str | None = None) -> bytes:
    obj = json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                                              "finish_reason": finish}]})
    return b"data: " + obj.encode() + b"\n\n"


WRITES = [
    _chunk(_event("a")), _chunk(_event("")), _chunk(_event("", "stop")),
    _chunk(_event("b").replace(b"\n\n", b"\r\n\r\n")),
    _chunk(_event("c") + _event("d")),  # two events in one chunk
    _chunk(_event("e"))[:20], _chunk(_event("e"))[20:],  # one chunk in two writes
    _chunk(_event("f")[:30]), _chunk(_event("f")[30:]),  # one event in two chunks
    _chunk(b": keep-alive\n\n"), _chunk(b"event: x\n" + _event("g")), _chunk(b"data: [DONE]\n\n"),
    _chunk(_event("h").replace(b"\n\n", b"\n")), _chunk(b"\n"),  # an event ended by the next write
    b"%x;ext=1\r\n%s\r\n" % (len(_event("i")), _event("i")),
    _chunk(b"data: " + b"x" * 3000 + b"\n\n"),  # longer than the probe's head capture
]


_CLOCK = Clock()  # one wall-clock offset for the runs compared


def _record_both_ways(request: bytes, writes: list[bytes], fast: bool) -> tuple[dict, list]:
    """The one record of an exchange (``writes`` the response's) and the self-metrics, with
    whole-event writes read in one step or always through the parsers."""
    h = Harness()
    h.asm = Assembler(AssemblyConfig(idle_check_s=1.0), h.records.append, clock=_CLOCK,
                      decoder=se.Decoder(LAYOUT), process_name=lambda pid: "server",
                      conn_alive=lambda pid, fd, cid: True, metrics=h.metrics, whole_event_writes=fast)
    raws = [data(1, 1, 0, se.DIR_IN, T0, request)]
    raws += [data(1, 1, i, se.DIR_OUT, T0 + (i + 1) * MS, w) for i, w in enumerate(writes)]
    raws.append(summary(1, 1, se.SR_NEXT_REQUEST, writes=len(writes), last_write=T0 + len(writes) * MS))
    h.feed(*raws)
    assert len(h.records) == 1
    d = h.records[0].to_dict()
    for k in ("trace_id", "span_id"):
        d.pop(k)
    return d, h.metrics.snapshot()


@given(st.lists(st.sampled_from(range(len(WRITES))), min_size=1, max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_one_step_reading_of_event_writes_changes_no_record(picks: list[int], head_alone: bool) -> None:
    # the same exchange through the one-step reading and through the parsers gives the same record
    writes = [SSE_HEAD, *[WRITES[i] for i in picks], b"0\r\n\r\n"]
    if not head_alone:
        writes = [writes[0] + writes[1], *writes[2:]]
    out = [_record_both_ways(SSE_POST, writes, fast) for fast in (True, False)]
    assert out[0] == out[1]


def _named(kind: str, **fields: object) -> bytes:
    """A typed event as vLLM writes it: its name line, then its data with the type last."""
    obj = json.dumps({**fields, "sequence_number": 1, "type": kind}, separators=(",", ":")).encode()
    return b"event: " + kind.encode() + b"\ndata: " + obj + b"\n\n"


_RESPONSE = {"id": "r", "model": "m", "object": "response", "status": "completed", "output": [],
             "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}


def _request(path: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (path, len(body), body)


# per typed-event API: its request, and writes of its stream whole, cut, joined and malformed
TYPED_STREAMS = {
    "responses": (
        _request(b"/v1/responses", b'{"model":"m","input":"hi","stream":true}'),
        [
            _chunk(_named("response.created", response={**_RESPONSE, "status": "in_progress", "usage": None})),
            _chunk(_named("response.output_text.delta", delta="a")),
            _chunk(_named("response.output_text.delta", delta="")),
            _chunk(_named("response.output_text.delta", delta="b").replace(b"\n", b"\r\n")),
            _chunk(_named("response.output_text.delta", delta="c") + _named("response.output_text.delta", delta="d")),
            _chunk(_named("response.output_text.delta", delta="e"))[:25],
            _chunk(_named("response.output_text.delta", delta="e"))[25:],
            _chunk(_named("response.output_text.delta", delta="f")[:40]),
            _chunk(_named("response.output_text.delta", delta="f")[40:]),
            _chunk(b": keep-alive\n\n"),
            _chunk(_named("response.output_text.delta", delta="g").split(b"\n", 1)[1]),  # no name line
            _chunk(_named("response.output_text.done", text="ag")),
            _chunk(_named("response.completed", response=_RESPONSE)),
            _chunk(_named("response.output_text.delta", delta="h" * 3000)),  # longer than the head capture
        ],
    ),
    "messages": (
        _request(b"/v1/messages", b'{"model":"m","max_tokens":9,"messages":[],"stream":true}'),
        [
            _chunk(_named("message_start", message={"id": "x", "type": "message", "model": "m", "content": [],
                                                   "usage": {"input_tokens": 3, "output_tokens": 1}})),
            _chunk(_named("content_block_start", index=0, content_block={"type": "text", "text": ""})),
            _chunk(_named("ping")),
            _chunk(_named("content_block_delta", index=0, delta={"type": "text_delta", "text": "a"})),
            _chunk(_named("content_block_delta", index=0, delta={"type": "text_delta", "text": "b"})[:30]),
            _chunk(_named("content_block_delta", index=0, delta={"type": "text_delta", "text": "b"})[30:]),
            _chunk(_named("content_block_stop", index=0) + _named("ping")),
            _chunk(_named("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2})),
            _chunk(_named("message_stop")),
        ],
    ),
}


@given(st.sampled_from(sorted(TYPED_STREAMS)), st.lists(st.integers(0, 100), min_size=1, max_size=10))
@settings(max_examples=300, deadline=None)
def test_one_step_reading_of_typed_event_writes_changes_no_record(api: str, picks: list[int]) -> None:
    request, pool = TYPED_STREAMS[api]
    writes = [SSE_HEAD, *[pool[i % len(pool)] for i in picks], b"0\r\n\r\n"]
    out = [_record_both_ways(request, writes, fast) for fast in (True, False)]
    assert out[0] == out[1]
    if all(i % len(pool) in (1, 3) for i in picks) and api == "responses":  # whole deltas with output only
        assert out[0][0]["output_events"] == len(picks)


OLLAMA_POST = b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: 26\r\n\r\n" \
              b'{"model":"m","prompt":"p"}'
NDJSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


def _line(text: str, done: bool = False) -> bytes:
    obj = {"model": "m", "response": text, "done": done}
    if done:
        obj.update(done_reason="stop", eval_count=3, prompt_eval_count=2)
    return json.dumps(obj).encode() + b"\n"


LINE_WRITES = [
    _chunk(_line("a")), _chunk(_line("")), _chunk(_line("b").replace(b"\n", b"\r\n")),
    _chunk(_line("c") + _line("d")), _chunk(_line("e"))[:15], _chunk(_line("e"))[15:],
    _chunk(_line("f")[:20]), _chunk(_line("f")[20:]), _chunk(b"\n"), _chunk(b"not json\n"),
    _chunk(_line("g" * 3000)),  # longer than the probe's head capture
]


@given(st.lists(st.sampled_from(range(len(LINE_WRITES))), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_one_step_reading_of_ndjson_writes_changes_no_record(picks: list[int]) -> None:
    writes = [NDJSON_HEAD, *[LINE_WRITES[i] for i in picks], _chunk(_line("", done=True)), b"0\r\n\r\n"]
    out = [_record_both_ways(OLLAMA_POST, writes, fast) for fast in (True, False)]
    assert out[0] == out[1]
    if set(picks) <= {0, 1, 2, 3, 8, 9}:  # whole chunks only: the final line is read
        assert out[0][0]["gen_ai.usage.output_tokens"] == 3


REQUESTS = [
    SSE_POST, OLLAMA_POST, GET,
    b"POST /v1/chat/completions?api-version=1 HTTP/1.1\r\nHost: x\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c"
    b"-b7ad6b7169203331-01\r\nContent-Length: 28\r\n\r\n" + b'{"model":"m","stream":true}\n',
    b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1c\r\n" + b'{"model":"m","stream":true}\n'
    b"\r\n0\r\n\r\n",  # chunked: read by the parser
    b"POST /v1/embeddings HTTP/1.1\r\ncontent-length: 16\r\ncontent-length: 16\r\n\r\n" + b'{"model":"e","x"',
]
RESPONSES = [
    [SSE_HEAD, _chunk(_event("a")), _chunk(_event("b", "stop")), b"0\r\n\r\n"],
    [SSE_HEAD + _chunk(_event("a")), _chunk(_event("b", "stop")) + b"0\r\n\r\n"],
    [NDJSON_HEAD, _chunk(_line("a")), _chunk(_line("", done=True)), b"0\r\n\r\n"],
    [HEAD_200 + b'{"a":"b"}ok'],
    [HEAD_200, b'{"a":"b"}ok'],
    [b"HTTP/1.1 200 OK\r\nContent-Type: Application/JSON\r\nContent-Length: 30\r\n\r\n",
     b'{"model":"m","usage":{"prompt_',
     ],
    [b"HTTP/1.1 100 Continue\r\n\r\n", SSE_HEAD, _chunk(_event("a")), b"0\r\n\r\n"],
    [b"HTTP/1.1 204 No Content\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", b"data: x\n\n"],  # read to close
]


def _record_heads(request: bytes, cut: int, writes: list[bytes], native: bool) -> tuple[dict, list]:
    """The record of an exchange whose request is read in two reads (cut at ``cut``; one when
    0), with its heads read in C (a whole request, a framed response's head, taken without
    the parser's events) or by the parser's Python reading."""
    h = Harness()
    h.asm = Assembler(AssemblyConfig(idle_check_s=1.0), h.records.append, clock=_CLOCK,
                      decoder=se.Decoder(LAYOUT), process_name=lambda pid: "server",
                      conn_alive=lambda pid, fd, cid: True, metrics=h.metrics, native_heads=native)
    reads = [request[:cut], request[cut:]] if 0 < cut < len(request) else [request]
    raws = [data(1, 1, i, se.DIR_IN, T0 + i * MS, r) for i, r in enumerate(reads)]
    t = T0 + 10 * MS
    raws += [data(1, 1, i, se.DIR_OUT, t + i * MS, w) for i, w in enumerate(writes)]
    raws.append(summary(1, 1, se.SR_CLOSE, writes=len(writes), last_write=t + len(writes) * MS))
    h.feed(*raws)
    assert len(h.records) == 1, h.metrics.snapshot()
    d = h.records[0].to_dict()
    for k in ("trace_id", "span_id"):
        d.pop(k)
    return d, h.metrics.snapshot()


@pytest.mark.skipif(not http1.NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
@given(st.sampled_from(range(len(REQUESTS))), st.integers(0, 200), st.sampled_from(range(len(RESPONSES))))
@settings(max_examples=300, deadline=None)
def test_heads_read_in_c_give_the_record_the_parser_gives(req: int, cut: int, resp: int) -> None:
    out = [_record_heads(REQUESTS[req], cut, RESPONSES[resp], native) for native in (True, False)]
    assert out[0] == out[1]


@pytest.mark.skipif(not http1.NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
def test_a_whole_request_and_a_framed_head_read_in_c_make_the_whole_record() -> None:
    rec, _ = _record_heads(REQUESTS[3], 0, RESPONSES[1], True)
    assert (rec["http.request.method"], rec["url.path"], rec["http.response.status_code"]) == (
        "POST", "/v1/chat/completions", 200)
    assert rec["parent_span_id"] == "b7ad6b7169203331"
    assert rec["gen_ai.request.model"] == "m" and rec["streaming"] is True
    assert rec["output_events"] == 2 and rec["gen_ai.response.finish_reasons"] == ["stop"]
    assert rec["time_to_first_token_s"] == pytest.approx(0.010)


def summary_with_ring(conn: int, seq: int, reason: int, *, flags: int, writes: int, bytes_out: int, last_write: int,
                      ring: list[tuple[int, int, bytes]], start: int = T0) -> bytes:
    """A summary whose tail ring holds ``ring``'s ``(ts, index, write)`` slots, packed as the probe sends them."""
    fields = [se.EV_SUMMARY, reason, flags, se.ROLE_SERVER, 4242, conn, last_write, 7, seq, start, start, 0,
              last_write, 0, 100, bytes_out, 1, writes, 0, len(ring), *([0] * se.GAP_BUCKETS)]
    raw = se.SUMMARY_HEADER.pack(*fields)
    for ts, index, write in ring:
        assert len(write) <= LAYOUT.tail_cap
        raw += se.TAIL_SLOT_HEADER.pack(ts, len(write), index, len(write), 0) + write
    return raw


def test_a_stream_past_its_sampled_writes_ends_at_its_terminator_and_keeps_framing() -> None:
    # The kernel saw the chunked terminator at the end of the last write: the stream ends
    # there, complete, and the connection's next response is read without a resync.
    writes = [SSE_HEAD, _chunk(_event("")), *[_chunk(_event(c)) for c in "abcdefghi"],
              _chunk(_event("", "stop")), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    ts = [T0 + (i + 1) * MS for i in range(len(writes))]
    sampled, slots = AssemblyConfig().sample_writes, AssemblyConfig().tail_slots
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, SSE_POST),
           *[data(1, 1, i, se.DIR_OUT, ts[i], w) for i, w in enumerate(writes[:sampled])],
           summary_with_ring(1, 1, se.SR_TERMINATED, flags=se.CF_TERMINATED, writes=len(writes),
                             bytes_out=sum(map(len, writes)), last_write=ts[-1],
                             ring=[(ts[i], i, writes[i]) for i in range(len(writes) - slots, len(writes))]),
           data(1, 2, 0, se.DIR_IN, T0 + 50 * MS, GET),
           data(1, 2, 0, se.DIR_OUT, T0 + 52 * MS, HEAD_200),
           data(1, 2, 1, se.DIR_OUT, T0 + 53 * MS, b'{"ok":true}'))
    first, second = h.records
    assert first.streaming and not first.aborted and first.error_type is None
    # the sampled outputs, the unseen mid-stream writes, five in the ring up to the last output
    assert (first.output_events, first.finish_reasons) == (9, ("stop",))
    assert first.time_to_first_token_s == 0.003 and first.time_per_output_token_s == 0.001
    assert first.duration_s == 0.014
    assert (second.method, second.path, second.status_code, second.duration_s) == ("GET", "/v1/models", 200, 0.003)
    assert h.metrics.total("infersight.parse.resyncs") == 0 and h.lost() == 0


def test_ring_slots_outside_the_phases_last_writes_are_not_read() -> None:
    # A slot whose index lies before the ring's window or past the phase's writes (a tail
    # entry the kernel reset mid-phase) says nothing of this response: the record is the
    # one the clean ring gives.
    writes = [SSE_HEAD, _chunk(_event("")), *[_chunk(_event(c)) for c in "abcdefghi"],
              _chunk(_event("", "stop")), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    ts = [T0 + (i + 1) * MS for i in range(len(writes))]
    sampled, slots = AssemblyConfig().sample_writes, AssemblyConfig().tail_slots
    clean = [(ts[i], i, writes[i]) for i in range(len(writes) - slots + 2, len(writes))]
    stale_before = (T0 + 90 * MS, len(writes) - slots - 1, _chunk(_event("", "length")))
    stale_after = (T0 + 91 * MS, len(writes), _chunk(_event("late", "content_filter")))
    got = []
    for ring in (clean, [stale_before, *clean], [*clean, stale_after], [stale_before, *clean, stale_after]):
        h = Harness()
        h.feed(data(1, 1, 0, se.DIR_IN, T0, SSE_POST),
               *[data(1, 1, i, se.DIR_OUT, ts[i], w) for i, w in enumerate(writes[:sampled])],
               summary_with_ring(1, 1, se.SR_TERMINATED, flags=se.CF_TERMINATED, writes=len(writes),
                                 bytes_out=sum(map(len, writes)), last_write=ts[-1], ring=ring))
        (rec,) = h.records
        got.append((rec.output_events, rec.finish_reasons, rec.time_to_first_token_s,
                    rec.time_per_output_token_s, rec.duration_s))
    assert got[0] == (9, ("stop",), 0.003, 0.001, 0.014)
    assert got[1:] == [got[0]] * 3


def _opening_without_output(kept: bytes | None, third: bytes = _chunk(_event(""))) -> tuple[Request, SelfMetrics]:
    """A 30-token stream after a role event and ``third`` (sampled writes 1 and 2), as the
    probe sends it: the sampled writes, then a summary holding the write past the samples
    (index 3) when ``kept`` is given, and the ring of the last writes."""
    sampled, slots = AssemblyConfig().sample_writes, AssemblyConfig().tail_slots
    assert sampled == 3
    role = _chunk(b"data: " + json.dumps({"model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}).encode() + b"\n\n")
    writes = [SSE_HEAD, role, third, *[_chunk(_event(f"t{i}")) for i in range(30)],
              _chunk(_event("", "stop")), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    ts = [T0 + (i + 1) * MS for i in range(len(writes))]
    ring = [(ts[i], i, writes[i]) for i in range(len(writes) - slots, len(writes))]
    if kept is not None:
        ring.insert(0, (ts[sampled], sampled, kept))
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, SSE_POST),
           *[data(1, 1, i, se.DIR_OUT, ts[i], w) for i, w in enumerate(writes[:sampled])],
           summary_with_ring(1, 1, se.SR_TERMINATED, flags=se.CF_TERMINATED, writes=len(writes),
                             bytes_out=sum(map(len, writes)), last_write=ts[-1], ring=ring))
    (rec,) = h.records
    return rec, h.metrics


def test_a_first_output_past_the_samples_is_read_from_the_write_the_summary_keeps() -> None:
    # head, role, an empty delta: no sampled write carries output; the first token is write 3,
    # which the summary keeps after the ring has moved on
    rec, metrics = _opening_without_output(_chunk(_event("t0")))
    assert rec.output_events == 30 and rec.finish_reasons == ("stop",)
    assert rec.time_to_first_token_s == 0.004  # write 3, 4 ms after the request's first byte
    assert rec.time_per_output_token_s == 0.001
    assert metrics.total("infersight.assembly.ttft.unresolved") == 0
    # without the kept write the first output is unknown: counted, never guessed
    rec, metrics = _opening_without_output(None)
    assert rec.output_events == 30 and rec.time_to_first_token_s is None and rec.time_per_output_token_s is None
    assert metrics.total("infersight.assembly.ttft.unresolved") == 1


def test_a_kept_write_without_output_leaves_the_first_output_unresolved() -> None:
    # a third event without output: the first token came later still, among the unseen writes
    rec, metrics = _opening_without_output(_chunk(_event("")))
    assert rec.time_to_first_token_s is None and rec.output_events == 29
    assert metrics.total("infersight.assembly.ttft.unresolved") == 1


def test_the_kept_write_is_not_read_once_a_sample_carried_output() -> None:
    # the first token was sampled (write 2): the kept write is one unseen mid-stream write like
    # the others, whatever it holds (here a finish reason it would otherwise add)
    token = _chunk(_event("t"))
    plain, _ = _opening_without_output(None, third=token)
    kept, _ = _opening_without_output(_chunk(_event("", "length")), third=token)
    assert plain.time_to_first_token_s == 0.003 and plain.output_events == 31
    assert plain.finish_reasons == kept.finish_reasons == ("stop",)
    def fields(r: Request) -> tuple:
        return (r.output_events, r.time_to_first_token_s, r.time_per_output_token_s, r.finish_reasons,
                r.duration_s, r.response_model, r.aborted, r.error_type)

    assert fields(kept) == fields(plain)


# --- the tail ring read in C (agent/_llmjson.c ring_walk) and by _walk_ring --------------------

def _completion(text: str, finish: str | None = None) -> bytes:
    obj = {"id": "c", "object": "text_completion", "model": "m", "choices": [
        {"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _usage(chat: bool, prompt: int, completion: int, model: str = "m") -> bytes:
    obj = {"id": "c", "model": model, "choices": [], "usage": {"prompt_tokens": prompt,
                                                              "completion_tokens": completion}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


_ERROR_WRITE = _chunk(b'data: {"error":{"message":"boom","type":"server_error","code":500}}\n\n')


def _ring_pieces(chat: bool) -> list[bytes]:
    ev = _event if chat else _completion
    return [
        _chunk(ev("a")), _chunk(ev("")), _chunk(ev("", "stop")), _chunk(ev("", "length")),
        _chunk(ev("z", "stop")), _chunk(_usage(chat, 5, 7)), _chunk(_usage(chat, 6, 9, "m2")),
        _chunk(ev("b").replace(b'"m"', b'"m3"')), _chunk(ev("b").replace(b'"m"', b'""')),
        _chunk(b"data: [DONE]\n\n"), b"E\r\ndata:[DONE]\n\n\r\n", b"0e\r\ndata: [DONE]\n\n\r\n",
        b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n", b"0\r\n\r\n", b"\r\n0\r\n\r\n", b"0\r\n",
        _chunk(ev("b"))[:25], _chunk(ev("c") + ev("d")), _chunk(b": keep-alive\n\n"),
        _chunk(ev("\u00e9")), _chunk(ev("q").replace(b'"content"', b'"cont\\u0065nt"')),
        _chunk(b"data: " + b"x" * 3000 + b"\n\n"), _chunk(ev("y" * 700)), _chunk(ev("", "bad reason!")),
        _chunk(ev("", "stop").replace(b"data: ", b"data:")), _chunk(ev("r").replace(b"\n\n", b"\r\n\r\n")),
        b"0E\r\ndata: [DONE]\n\n\r\n", b"D\r\ndata:[DONE]\n\n\r\n", b"10\r\ndata: [DONE]\r\n\r\n\r\n",
        b"\r\n",  # the terminator's last CRLF alone, after "0\r\n" (llama.cpp's server, cpp-httplib)
        _ERROR_WRITE,  # the server's error in place of an event (left to Python by the C walk)
        # events that left in one write (a socket that backed up): counted one by one
        _chunk(ev("c")) + _chunk(ev("d")),
        _chunk(ev("e")) + _chunk(ev("", "stop")) + _chunk(b"data: [DONE]\n\n"),
        b"".join(_chunk(ev(f"t{i:02d}")) for i in range(14)),  # longer than a slot: its head and tail
    ]


def _packed_ring(ring: list[tuple[int, int, bytes]]) -> bytes:
    """Ring slots as the probe packs them: a write longer than the tail capture keeps its
    first ring_head bytes and its end."""
    out = b""
    for ts, index, write in ring:
        kept = write
        if len(write) > LAYOUT.tail_cap:
            kept = write[: LAYOUT.ring_head] + write[len(write) - (LAYOUT.tail_cap - LAYOUT.ring_head):]
        out += se.TAIL_SLOT_HEADER.pack(ts, len(write), index, len(kept), 0) + kept
    return out


def _ring_record(chat: bool, sampled: list[bytes], unseen: int, ring_writes: list[bytes], stale: bool,
                 reason: int, native: bool, kept: bytes | None = None) -> tuple[dict | None, list]:
    post = SSE_POST if chat else SSE_POST.replace(b"/v1/chat/completions", b"/v1/completions")
    h = Harness()
    h.asm = Assembler(AssemblyConfig(idle_check_s=1.0), h.records.append, clock=_CLOCK,
                      decoder=se.Decoder(LAYOUT), process_name=lambda pid: "server",
                      conn_alive=lambda pid, fd, cid: True, metrics=h.metrics, native_ring=native)
    writes = [SSE_HEAD, *sampled]
    total = len(writes) + unseen + len(ring_writes)
    first_ring = total - len(ring_writes)
    ring = [(T0 + (first_ring + i + 1) * MS, first_ring + i, w) for i, w in enumerate(ring_writes)]
    if stale:  # slots of an earlier window and past the phase's writes
        ring = [(T0 + 90 * MS, max(0, first_ring - 9), _chunk(_event("old", "length"))), *ring,
                (T0 + 91 * MS, total, _chunk(_event("late", "content_filter")))]
    if kept is not None and unseen:  # the write past the samples, kept apart from the ring
        ring = [(T0 + (len(writes) + 1) * MS, len(writes), kept), *ring]
    flags = se.CF_TERMINATED if reason == se.SR_TERMINATED else 0
    fields = [se.EV_SUMMARY, reason, flags, se.ROLE_SERVER, 4242, 1, T0 + (total + 1) * MS, 7, 1, T0, T0, 0,
              T0 + total * MS, 0, 100, 5000, 1, total, 0, len(ring), *([0] * se.GAP_BUCKETS)]
    h.feed(data(1, 1, 0, se.DIR_IN, T0, post),
           *[data(1, 1, i, se.DIR_OUT, T0 + (i + 1) * MS, w) for i, w in enumerate(writes)],
           se.SUMMARY_HEADER.pack(*fields) + _packed_ring(ring))
    if not h.records:
        return None, h.metrics.snapshot()
    (rec,) = h.records
    d = rec.to_dict()
    for k in ("trace_id", "span_id"):
        d.pop(k)
    return d, h.metrics.snapshot()


_PIECES = len(_ring_pieces(True))


@given(st.booleans(), st.lists(st.integers(0, 4), max_size=AssemblyConfig().sample_writes - 1), st.integers(0, 3),
       st.lists(st.integers(0, _PIECES - 1), max_size=8), st.booleans(),
       st.sampled_from([se.SR_TERMINATED, se.SR_NEXT_REQUEST, se.SR_CLOSE]), st.none() | st.integers(0, _PIECES - 1))
@settings(max_examples=400, deadline=None)
def test_the_ring_read_in_c_gives_the_record_the_python_walk_gives(
        chat: bool, sampled: list[int], unseen: int, ring: list[int], stale: bool, reason: int,
        kept: int | None) -> None:
    pieces = _ring_pieces(chat)
    args = (chat, [pieces[i] for i in sampled], unseen, [pieces[i] for i in ring], stale, reason)
    k = None if kept is None else pieces[kept]
    assert _ring_record(*args, native=True, kept=k) == _ring_record(*args, native=False, kept=k)


@pytest.mark.parametrize("native", [True, False], ids=["c-walk", "python-walk"])
def test_a_stream_the_server_ends_with_its_error_is_an_error(native: bool) -> None:
    """A 200 stream whose server writes its error in place of the next event: the record has
    error.type response_error, and the output before the error counted; in a sampled write and
    in the tail ring."""
    a, b, c = (_chunk(_event(x)) for x in "abc")
    end = b"0\r\n\r\n"
    short, _ = _ring_record(True, [a, _ERROR_WRITE], 0, [end], False, se.SR_TERMINATED, native)
    assert short is not None and short["error.type"] == "response_error" and short["output_events"] == 1
    long, _ = _ring_record(True, [a, b], 10, [c, _ERROR_WRITE, end], False, se.SR_TERMINATED, native)
    assert long is not None and long["error.type"] == "response_error" and long["output_events"] == 13
    assert not long["aborted"] and long["http.response.status_code"] == 200
    # the same stream ending as streams do: no error
    fine, _ = _ring_record(True, [a, b], 10, [c, _chunk(_event("", "stop")), end], False, se.SR_TERMINATED, native)
    assert fine is not None and "error.type" not in fine and fine["output_events"] == 13


@pytest.mark.parametrize("native", [True, False], ids=["c-walk", "python-walk"])
def test_events_written_together_are_counted_where_the_write_is_read(native: bool) -> None:
    """A server whose socket backed up writes the events it queued in one write: each counts as
    an output event in the writes the agent reads (the sampled ones and the tail ring), and a
    write the kernel only counted counts as one."""
    a, b = (_chunk(_event(x)) for x in "ab")
    three = b"".join(_chunk(_event(x)) for x in "cde")
    end = [_chunk(_event("", "stop")), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    t = se.SR_TERMINATED

    def outputs(sampled: list[bytes], unseen: int, ring: list[bytes]) -> int:
        rec, _ = _ring_record(True, sampled, unseen, ring, False, t, native)
        assert rec is not None and rec["http.response.status_code"] == 200 and "error.type" not in rec
        return rec["output_events"]

    # before the last write with output (counted by the C walk too), and that write itself
    assert outputs([a, b], 0, [three, three, _chunk(_event("f")), *end]) == 2 + 3 + 3 + 1
    assert outputs([a, b], 0, [three, three, *end]) == 2 + 3 + 3
    # the last tokens, the finish reason and [DONE] in one write
    last = three + _chunk(_event("", "stop")) + _chunk(b"data: [DONE]\n\n")
    assert outputs([a, b], 0, [three, last, b"0\r\n\r\n"]) == 2 + 3 + 3
    # in a sampled write; and four writes between the samples and the ring: one event each
    assert outputs([a, three], 4, [three, _chunk(_event("f")), *end]) == 1 + 3 + 4 + 3 + 1
    # a write longer than a slot: the events that start in its kept head and tail
    long = b"".join(_chunk(_event(f"t{i:02d}")) for i in range(14))
    assert len(long) > LAYOUT.tail_cap
    kept = (long[: LAYOUT.ring_head], long[len(long) - (LAYOUT.tail_cap - LAYOUT.ring_head):])
    visible = sum(len(re.findall(rb"(?m)^data:", k)) for k in kept)
    assert 1 < visible < 14
    assert outputs([a, b], 0, [long, three, *end]) == 2 + visible + 3
    assert outputs([a, b], 0, [three, long, *end]) == 2 + 3 + visible


@pytest.mark.parametrize(("status", "want"), [(200, "response_error"), (400, None), (500, None)])
def test_a_whole_body_that_reports_an_error(status: int, want: str | None) -> None:
    """An error object as the body of a chat completion: an error with a 200 status (a 4xx or
    5xx one says so itself, and the metrics read it)."""
    body = b'{"error":{"message":"boom","type":"server_error","code":%d}}' % status
    req = b'{"model":"m","stream":false}'
    post = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req)
    head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, post), data(1, 1, 0, se.DIR_OUT, T0 + 2 * MS, head + body))
    (r,) = h.records
    assert r.status_code == status and not r.streaming and r.error_type == want and not r.aborted


def _encoded_exchange(coding: str, body: bytes, writes: int = 1) -> tuple[Request, SelfMetrics]:
    req = b'{"inputs":[]}'
    post = b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req)
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: %s\r\n"
            b"content-length: %d\r\n\r\n" % (coding.encode(), len(body)))
    wire = head + body
    step = -(-len(wire) // writes)
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, post),
           *[data(1, 1, i, se.DIR_OUT, T0 + (i + 1) * MS, wire[i * step:(i + 1) * step]) for i in range(writes)])
    (r,) = h.records
    return r, h.metrics


@pytest.mark.parametrize("writes", [1, 3])
def test_a_compressed_body_is_read_decompressed(writes: int) -> None:
    """Triton gzips a KServe infer answer for a client that accepts it (httpx, requests): the
    record's response model is read from the body decompressed; gzip, zlib and raw deflate."""
    body = json.dumps({"model_name": "echo", "model_version": "1",
                       "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [9000],
                                    "data": list(range(9000))}]}).encode()
    raw = zlib.compressobj(wbits=-15)
    for coding, packed in (("gzip", zlib.compress(body, wbits=31)), ("deflate", zlib.compress(body)),
                           ("deflate", raw.compress(body) + raw.flush())):
        r, m = _encoded_exchange(coding, packed, writes)
        assert r.status_code == 200 and r.response_model == "echo" and r.error_type is None, coding
        assert m.get("infersight.parse.failures", (("reason", "content_encoding"),)) == 0
    # a coding the agent does not read, or damaged data: no model, and counted
    for coding, packed in (("br", b"\x8b\x02\x80" + body[:50]), ("gzip", b"\x1f\x8b" + body[:50])):
        r, m = _encoded_exchange(coding, packed, writes)
        assert r.status_code == 200 and r.response_model is None and r.request_model == "echo"
        assert m.get("infersight.parse.failures", (("reason", "content_encoding"),)) == 1


def test_the_ring_read_in_c_decides_common_streams_and_leaves_the_rest() -> None:
    pieces = _ring_pieces(True)
    raw = se.SUMMARY_HEADER.pack(*([se.EV_SUMMARY] + [0] * 18 + [3] + [0] * se.GAP_BUCKETS))
    fields_of = se.Decoder(LAYOUT)

    def walk(writes: list[bytes], output_seen: bool, first: int = 20) -> tuple | None:
        # the ring's writes from index `first` on, after four sampled ones
        rec = raw[:] + _packed_ring([(T0 + i, first + i, w) for i, w in enumerate(writes)])
        rec = rec[:100] + len(writes).to_bytes(4, "little") + rec[104:]
        s = fields_of.decode(rec)
        assert isinstance(s, se.SummaryEvent) and len(s.ring) == len(writes)
        return llm.ring_walk(llm.Api.OPENAI_CHAT, s.raw, s.slots, 0, 100, 4, 4, output_seen)

    if not llm.NATIVE_JSON:
        assert walk(pieces[:1], True) is None
        return
    # the end of a stream (its last output, the finish reason, usage, [DONE], the terminator)
    # after 16 unseen writes: read back to the last output, the writes before it all output
    got = walk([pieces[1], pieces[0], pieces[2], pieces[5], pieces[9], pieces[14]], True)
    assert got == (6, 20, T0, 16, 2, T0, T0 + 1, "m", ("stop",), 5, 7)
    # no output seen yet and none unseen: every slot read forward, the first model kept, the last counts
    got = walk([pieces[1], pieces[7], pieces[6], pieces[4]], False, first=4)
    assert got == (4, 4, T0, 0, 2, T0 + 1, T0 + 3, "m", ("stop",), 6, 9)
    # the terminator in two writes ("0\r\n", then its last CRLF) carries no output, in C as in
    # Python: walking back from the end, the finish reason before them is read
    got = walk([pieces[0], pieces[2], pieces[9], pieces[16], pieces[30]], True)
    assert got is not None and got[4:9] == (1, T0, T0, "m", ("stop",))
    # the writes before the last output: their events counted, in a slot kept whole or cut
    got = walk([pieces[32], pieces[34], pieces[0], pieces[2], pieces[9], pieces[14]], True)
    assert got is not None and got[3:5] == (16, 2 + llm.write_events(pieces[34][:LAYOUT.ring_head], False)
                                            + llm.write_events(pieces[34][-(LAYOUT.tail_cap - LAYOUT.ring_head):],
                                                               False) + 1)
    # a [DONE] write is read in C whatever the case of its chunk size's digits; one whose size
    # has a leading zero (no server writes one) is left to Python
    done = walk([pieces[0], pieces[9]], True)
    assert done is not None
    assert walk([pieces[0], pieces[28]], True) == walk([pieces[0], pieces[29]], True) == done
    assert walk([pieces[0], pieces[11]], True) is None and walk([pieces[0], pieces[27]], True) is None
    # a slot that is not one whole event leaves the ring to Python, wherever it lies
    for odd in (pieces[17], pieces[18], pieces[19], pieces[22], pieces[31]):
        assert walk([pieces[0], odd, pieces[9]], False) is None
    # other APIs are read in Python
    assert llm.ring_walk(llm.Api.OLLAMA_CHAT, raw, b"", 0, 1, 4, 4, True) is None
    # slots that do not describe the record are refused or left to Python, never read out of it
    rec = raw + _packed_ring([(T0, 20, pieces[0])])
    for start, stop in ((-5, 40), (10, -1), (len(rec) + 100, len(rec) + 300), (200, 100)):
        slots = se.SLOT_FIELDS.pack(T0, 40, 20, start, stop, -1)
        got = llm.ring_walk(llm.Api.OPENAI_CHAT, rec, slots, 0, 100, 4, 4, True)
        assert got is None or got[4] == 0, (start, stop)
    with pytest.raises(ValueError):
        llm.ring_walk(llm.Api.OPENAI_CHAT, rec, b"\0" * 47, 0, 100, 4, 4, True)
