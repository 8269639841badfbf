"""HTTP/1.1 framing for a passive observer (agent/http1.py).

Every table case runs three ways, as h11's tests do: fed whole, fed one byte at
a time, and with the next message appended. Hypothesis checks that any split of
any input gives the same events and that random input never raises and never
grows the parser's buffer past its bound.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.http1 import (
    NATIVE_HEAD,
    NEED_DATA,
    Body,
    BodyGap,
    EndOfMessage,
    Event,
    H1Parser,
    NeedData,
    RequestHead,
    ResponseHead,
    Skipped,
    Upgrade,
    header,
)
from agent.selfmetrics import SelfMetrics
from tests.conftest import IN_CI

Segment = bytes | int  # bytes are captured, an int is a gap of that many bytes


def drain(p: H1Parser) -> list[Event]:
    out: list[Event] = []
    while not isinstance(ev := p.next_event(), NeedData):
        out.append(ev)
    return out


def merged(events: list[Event]) -> list[Event]:
    """Join runs of Body, BodyGap and same-reason Skipped, whose split depends on the feeds."""
    out: list[Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, Body) and isinstance(last, Body):
            out[-1] = Body(last.data + ev.data)
        elif isinstance(ev, BodyGap) and isinstance(last, BodyGap):
            out[-1] = BodyGap(last.n + ev.n)
        elif isinstance(ev, Skipped) and isinstance(last, Skipped) and last.reason == ev.reason:
            out[-1] = Skipped(last.n + ev.n, ev.reason)
        elif isinstance(ev, Body) and not ev.data:
            continue
        else:
            out.append(ev)
    return out


def run(
    role: str,
    segments: list[Segment],
    *,
    methods: tuple[str, ...] = (),
    close: bool = False,
    bytewise: bool = False,
    max_head_bytes: int = 16384,
    metrics: SelfMetrics | None = None,
    native: bool = True,
) -> list[Event]:
    p = H1Parser(role, max_head_bytes=max_head_bytes, metrics=metrics or SelfMetrics(), native_head=native)  # type: ignore[arg-type]
    for m in methods:
        p.expect_response_to(m)
    events: list[Event] = []
    for seg in segments:
        if isinstance(seg, int):
            p.feed_gap(seg)
        elif bytewise:
            for i in range(len(seg)):
                p.feed(seg[i : i + 1])
                events += drain(p)
        else:
            p.feed(seg)
        events += drain(p)
    if close:
        p.close()
    events += drain(p)
    return merged(events)


@dataclass
class Case:
    name: str
    role: str
    segments: list[Segment]
    expected: list[Event]
    methods: tuple[str, ...] = ()
    close: bool = False
    boundary: bool = True  # ends between messages, so a next message can follow
    max_head_bytes: int = 16384
    failures: dict[str, int] = field(default_factory=dict)  # expected infersight.parse.failures


def rq(method: str, target: str, *headers: tuple[str, str], version: str = "1.1") -> RequestHead:
    return RequestHead(method, target, version, tuple(headers))


def rs(status: int, reason: str, *headers: tuple[str, str], version: str = "1.1") -> ResponseHead:
    return ResponseHead(status, reason, version, tuple(headers))


EOM = EndOfMessage(True)
CUT = EndOfMessage(False)
CHAT_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
CL = ("content-length", str(len(CHAT_BODY)))
CHUNKED = ("transfer-encoding", "chunked")
SSE_EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
SSE_CHUNKED = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in SSE_EVENTS) + b"0\r\n\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_RS = rs(200, "OK", ("content-type", "text/event-stream"), CHUNKED)
CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(range(32)) + b"\x00\x20" + b"\x13\x01" * 16
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000012040000000000")

REQUEST_CASES = [
    Case(
        "get",
        "request",
        [b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"],
        [rq("GET", "/health", ("host", "a")), EOM],
    ),
    Case(
        "post_content_length",
        "request",
        [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
            % (len(CHAT_BODY), CHAT_BODY)
        ],
        [rq("POST", "/v1/chat/completions", ("host", "a"), CL), Body(CHAT_BODY), EOM],
    ),
    Case(
        "http10_and_header_case",
        "request",
        [b"GET / HTTP/1.0\r\nX-Mixed-CASE:  v  \r\n\r\n"],
        [rq("GET", "/", ("x-mixed-case", "v"), version="1.0"), EOM],
    ),
    Case(
        "chunked_with_extensions_and_trailers",
        "request",
        [
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
        ],
        [rq("POST", "/x", CHUNKED), Body(b"abcd0123456789"), EOM],
    ),
    Case(
        "pipelined",
        "request",
        [b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\n\r\n"],
        [
            rq("GET", "/a"),
            EOM,
            rq("POST", "/b", ("content-length", "2")),
            Body(b"hi"),
            EOM,
            rq("GET", "/c"),
            EOM,
        ],
    ),
    Case(
        "stray_crlf_between_requests",
        "request",
        [b"\r\n\nGET / HTTP/1.1\r\n\r\n\r\n"],
        [rq("GET", "/"), EOM],
    ),
    Case(
        "bare_lf_line_ends",
        "request",
        [b"POST /x HTTP/1.1\nContent-Length: 1\n\nz"],
        [rq("POST", "/x", ("content-length", "1")), Body(b"z"), EOM],
    ),
    Case("extension_method", "request", [b"PURGE /cache HTTP/1.1\r\n\r\n"], [rq("PURGE", "/cache"), EOM]),
    Case(
        "obs_fold",
        "request",
        [b"GET / HTTP/1.1\r\nX-Long: a\r\n  b\r\n\r\n"],
        [rq("GET", "/", ("x-long", "a b")), EOM],
    ),
    Case(
        "repeated_equal_content_length",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nok"],
        [rq("POST", "/", ("content-length", "2, 2")), Body(b"ok"), EOM],
    ),
    Case(
        "te_and_cl_conflict_chunked_wins",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        [rq("POST", "/", ("content-length", "100"), CHUNKED), Body(b"ok"), EOM],
        failures={"conflicting_framing": 1},
    ),
    Case(
        "invalid_content_length",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\nzzzz"],
        [rq("POST", "/", ("content-length", "1x")), CUT, Skipped(4, "bad_framing")],
        failures={"bad_framing": 1},
    ),
    Case(
        "differing_content_lengths",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"],
        [rq("POST", "/", ("content-length", "1"), ("content-length", "2")), CUT],
        failures={"bad_framing": 1},
    ),
    Case(
        "request_with_unchunked_transfer_coding",
        "request",
        [b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nzz"],
        [rq("POST", "/", ("transfer-encoding", "gzip")), CUT, Skipped(2, "bad_framing")],
        failures={"bad_framing": 1},
    ),
    Case(
        "missing_final_chunk_then_next_request",
        "request",
        [b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nGET /b HTTP/1.1\r\n\r\n"],
        [rq("POST", "/a", CHUNKED), Body(b"ok"), CUT, rq("GET", "/b"), EOM],
        failures={"bad_chunk": 1},
    ),
    Case(
        "huge_chunk_size",
        "request",
        [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\nzz"],
        [rq("POST", "/", CHUNKED), CUT, Skipped(16, "bad_chunk")],
        failures={"bad_chunk": 1},
    ),
    Case(
        "invalid_chunk_hex",
        "request",
        [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
        [rq("POST", "/", CHUNKED), CUT, Skipped(4, "bad_chunk")],
        failures={"bad_chunk": 1},
    ),
    Case(
        "chunk_data_without_crlf",
        "request",
        [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX"],
        [rq("POST", "/", CHUNKED), Body(b"ok"), CUT, Skipped(2, "bad_chunk")],
        failures={"bad_chunk": 1},
    ),
    Case(
        "tls_client_hello",
        "request",
        [CLIENT_HELLO],
        [Skipped(len(CLIENT_HELLO), "tls")],
        failures={"tls": 1},
    ),
    Case(
        "http2_preface",
        "request",
        [H2_PREFACE],
        [Skipped(len(H2_PREFACE), "http2")],
        failures={"http2": 1},
    ),
    Case(
        "binary_then_request",
        "request",
        [b"\x00\xff\x10binary\x80GET / HTTP/1.1\r\n\r\n"],
        [Skipped(10, "not_http"), rq("GET", "/"), EOM],
        failures={"not_http": 1},
    ),
    Case(
        "attach_mid_body",
        "request",
        [b'content":"hi"}]}POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}'],
        [Skipped(16, "not_http"), rq("POST", "/v1/completions", ("content-length", "2")), Body(b"{}"), EOM],
        failures={"not_http": 1},
    ),
    Case(
        "head_too_large",
        "request",
        [b"GET /big HTTP/1.1\r\nCookie: " + b"c" * 300 + b"\r\n\r\nGET /ok HTTP/1.1\r\n\r\n"],
        [Skipped(331, "head_too_large"), rq("GET", "/ok"), EOM],
        max_head_bytes=128,
        failures={"head_too_large": 1},
    ),
    Case(
        "header_line_without_colon",
        "request",
        [b"GET /a HTTP/1.1\r\nnot a header\r\n\r\nGET /b HTTP/1.1\r\n\r\n"],
        [Skipped(33, "bad_head"), rq("GET", "/b"), EOM],
        failures={"bad_head": 1},
    ),
    Case(
        "gap_inside_content_length_body",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab", 5, b"cde"],
        [rq("POST", "/", ("content-length", "10")), Body(b"ab"), BodyGap(5), Body(b"cde"), EOM],
    ),
    Case(
        "gap_past_body_end_resyncs",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab", 9, b"ost: x\r\n\r\nGET /n HTTP/1.1\r\n\r\n"],
        [
            rq("POST", "/", ("content-length", "4")),
            Body(b"ab"),
            BodyGap(2),
            EOM,
            Skipped(10, "gap"),
            rq("GET", "/n"),
            EOM,
        ],
    ),
    Case(
        "gap_in_head",
        "request",
        [b"GET /a HTT", 3, b".1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"],
        [Skipped(16, "gap"), rq("GET", "/b"), EOM],
    ),
    Case(
        "gap_in_head_after_start_line",
        "request",
        [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nCookie: abc",
            4000,
            b"xyz\r\n\r\n{}GET /b HTTP/1.1\r\n\r\n",
        ],
        [rq("POST", "/v1/chat/completions", ("host", "a")), CUT, Skipped(9, "gap"), rq("GET", "/b"), EOM],
    ),
    Case(
        "gap_in_response_head_after_status_line",
        "response",
        [
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-Af",
            10,
            b"ter: 1\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ],
        [
            rs(503, "Service Unavailable"),
            CUT,
            Skipped(10, "gap"),
            rs(200, "OK", ("content-length", "0")),
            EOM,
        ],
        methods=("POST", "GET"),
    ),
    Case(
        "gap_in_chunk_size_line",
        "request",
        [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n1", 2, b"\r\n0\r\n\r\n"],
        [rq("POST", "/", CHUNKED), Body(b"ok"), Skipped(1, "gap"), CUT, Skipped(7, "gap")],
    ),
    Case(
        "close_inside_body",
        "request",
        [b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"],
        [rq("POST", "/", ("content-length", "9")), Body(b"abc"), CUT],
        close=True,
        boundary=False,
        failures={"truncated": 1},
    ),
    Case(
        "close_inside_head",
        "request",
        [b"GET / HTTP/1.1\r\nHost:"],
        [Skipped(21, "truncated")],
        close=True,
        boundary=False,
        failures={"truncated": 1},
    ),
]

RESPONSE_CASES = [
    Case(
        "content_length",
        "response",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"],
        [rs(200, "OK", ("content-length", "5")), Body(b"hello"), EOM],
        methods=("POST",),
    ),
    Case(
        "chunked_sse_yields_only_event_bytes",
        "response",
        [SSE_HEAD + SSE_CHUNKED],
        [SSE_RS, Body(b"".join(SSE_EVENTS)), EOM],
        methods=("POST",),
    ),
    Case(
        "status_line_without_reason_and_http10",
        "response",
        [b"HTTP/1.0 200\r\nContent-Length: 0\r\n\r\n"],
        [rs(200, "", ("content-length", "0"), version="1.0"), EOM],
        methods=("GET",),
    ),
    Case(
        "read_to_close",
        "response",
        [b'HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n{"a":1}\n{"b":2}\n'],
        [rs(200, "OK", ("content-type", "application/x-ndjson")), Body(b'{"a":1}\n{"b":2}\n'), EOM],
        methods=("POST",),
        close=True,
        boundary=False,
    ),
    Case(
        "unchunked_transfer_coding_reads_to_close",
        "response",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz"],
        [rs(200, "OK", ("transfer-encoding", "gzip")), Body(b"zzz"), EOM],
        close=True,
        boundary=False,
    ),
    Case(
        "continue_then_final",
        "response",
        [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ],
        [
            rs(100, "Continue"),
            rs(103, "Early Hints", ("link", "</a>")),
            rs(200, "OK", ("content-length", "2")),
            Body(b"ok"),
            EOM,
        ],
        methods=("POST",),
    ),
    Case(
        "no_body_statuses",
        "response",
        [
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"
        ],
        [
            rs(204, "No Content", ("content-length", "7")),
            EOM,
            rs(304, "Not Modified", ("content-length", "7")),
            EOM,
        ],
        methods=("GET", "GET"),
    ),
    Case(
        "head_response_has_no_body",
        "response",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"],
        [
            rs(200, "OK", ("content-length", "1000")),
            EOM,
            rs(200, "OK", ("content-length", "1")),
            Body(b"x"),
            EOM,
        ],
        methods=("HEAD", "GET"),
    ),
    Case(
        "switching_protocols",
        "response",
        [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"],
        [rs(101, "Switching Protocols", ("upgrade", "websocket")), Upgrade()],
        methods=("GET",),
        boundary=False,
    ),
    Case(
        "connect_tunnel",
        "response",
        [b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03\x00\x10"],
        [rs(200, "Connection Established"), Upgrade()],
        methods=("CONNECT",),
        boundary=False,
    ),
    Case(
        "keep_alive_pair_in_one_read",
        "response",
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        ],
        [
            rs(200, "OK", ("content-length", "2")),
            Body(b"ab"),
            EOM,
            rs(404, "Not Found", ("content-length", "0")),
            EOM,
        ],
        methods=("GET", "GET"),
    ),
    Case(
        "te_and_cl_conflict",
        "response",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n1\r\nA\r\n0\r\n\r\n"],
        [rs(200, "OK", CHUNKED, ("content-length", "3")), Body(b"A"), EOM],
        failures={"conflicting_framing": 1},
    ),
    Case(
        "attach_mid_stream",
        "response",
        [b'oken":"x"}\n\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'],
        [Skipped(19, "not_http"), rs(200, "OK", ("content-length", "0")), EOM],
        failures={"not_http": 1},
    ),
    Case(
        "tls_server_hello",
        "response",
        [bytes.fromhex("160303003a020000360303") + bytes(40)],
        [Skipped(51, "tls")],
        failures={"tls": 1},
    ),
    Case(
        "bad_status_code",
        "response",
        [b"HTTP/1.1 2000 OK\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [Skipped(20, "not_http"), rs(200, "OK", ("content-length", "0")), EOM],
        failures={"not_http": 1},
    ),
    Case(
        "gap_inside_chunk_keeps_framing",
        "response",
        [SSE_HEAD + b'1d\r\ndata: {"tok', 10, b'en":1}\n\n\r\n0\r\n\r\n'],
        [SSE_RS, Body(b'data: {"tok'), BodyGap(10), Body(b'en":1}\n\n'), EOM],
        methods=("POST",),
    ),
    Case(
        "gap_across_chunks_loses_framing",
        "response",
        [
            SSE_HEAD + b"10\r\ndata: {}\n\n",
            40,
            b'":2}\n\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n',
        ],
        [
            SSE_RS,
            Body(b"data: {}\n\n"),
            BodyGap(6),
            CUT,
            Skipped(13, "gap"),
            rs(200, "OK", ("content-length", "0")),
            EOM,
        ],
        methods=("POST", "GET"),
    ),
    Case(
        "gap_in_read_to_close_body",
        "response",
        [b'HTTP/1.1 200 OK\r\n\r\n{"a"', 100, b"1}\n"],
        [rs(200, "OK"), Body(b'{"a"'), BodyGap(100), Body(b"1}\n"), EOM],
        close=True,
        boundary=False,
    ),
    Case(
        "close_inside_chunked",
        "response",
        [SSE_HEAD + b"5\r\nab"],
        [SSE_RS, Body(b"ab"), CUT],
        close=True,
        boundary=False,
        failures={"truncated": 1},
    ),
    Case(
        "no_method_queued_frames_as_get",
        "response",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"],
        [rs(200, "OK", ("content-length", "3")), Body(b"abc"), EOM],
    ),
]

NEXT_MESSAGE: dict[str, tuple[bytes, list[Event], tuple[str, ...]]] = {
    "request": (b"GET /next HTTP/1.1\r\nHost: n\r\n\r\n", [rq("GET", "/next", ("host", "n")), EOM], ()),
    "response": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        [rs(200, "OK", ("content-length", "2")), Body(b"ok"), EOM],
        ("GET",),
    ),
}

CASES = REQUEST_CASES + RESPONSE_CASES


def _run_case(case: Case, **kw: object) -> list[Event]:
    return run(
        case.role,
        case.segments,
        methods=case.methods,
        close=case.close,
        max_head_bytes=case.max_head_bytes,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.role}-{c.name}")
def test_case_fed_whole(case: Case) -> None:
    metrics = SelfMetrics()
    assert _run_case(case, metrics=metrics) == case.expected
    failures = {
        dict(s.labels)["reason"]: s.value for s in metrics.snapshot() if s.name == "infersight.parse.failures"
    }
    assert failures == case.failures


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.role}-{c.name}")
def test_case_fed_byte_by_byte(case: Case) -> None:
    assert _run_case(case, bytewise=True) == case.expected


@pytest.mark.parametrize("case", [c for c in CASES if c.boundary], ids=lambda c: f"{c.role}-{c.name}")
def test_case_with_next_message_appended(case: Case) -> None:
    data, events, methods = NEXT_MESSAGE[case.role]
    segments = (
        [*case.segments[:-1], case.segments[-1] + data]
        if isinstance(case.segments[-1], bytes)
        else [
            *case.segments,
            data,
        ]
    )
    got = run(
        case.role,
        segments,
        methods=case.methods + methods,
        close=case.close,
        max_head_bytes=case.max_head_bytes,
    )
    assert got == merged([*case.expected, *events])


def test_skipped_bytes_are_counted_by_reason() -> None:
    metrics = SelfMetrics()
    run("request", [CLIENT_HELLO, b"GET / HTTP/1.1\r\n\r\n", b"\x00\x01"], metrics=metrics, close=True)
    assert metrics.get("infersight.parse.skipped.bytes", (("reason", "tls"),)) == len(CLIENT_HELLO)
    assert metrics.get("infersight.parse.skipped.bytes", (("reason", "not_http"),)) == 2
    assert metrics.get("infersight.parse.failures", (("reason", "tls"),)) == 1


def test_gap_resync_is_counted_apart_from_failures() -> None:
    metrics = SelfMetrics()
    run(
        "response",
        [SSE_HEAD + b"10\r\ndata: {}\n\n", 100, b"xyz"],
        methods=("POST",),
        metrics=metrics,
        close=True,
    )
    assert metrics.get("infersight.parse.resyncs", (("reason", "gap"),)) == 1
    assert metrics.get("infersight.parse.skipped.bytes", (("reason", "gap"),)) == 3
    assert metrics.total("infersight.parse.failures") == 0


@pytest.mark.parametrize(
    "fed",
    [
        b"10\r\ndata: {}\n\n",  # between chunks
        b"10\r\ndata: {",  # inside a chunk's data
        b"10\r\ndata: {}\n\n\r",  # inside a chunk's CRLF
        b"1",  # inside a chunk-size line
        b"0\r\nx-trailer: 1",  # inside the trailer
    ],
)
def test_a_chunked_body_ended_out_of_sight_keeps_framing(fed: bytes) -> None:
    # The capture saw the terminator in writes the parser was not fed: the body ends complete,
    # and the connection's next response is read without a resync.
    metrics = SelfMetrics()
    p = H1Parser("response", metrics=metrics)
    p.expect_response_to("POST")
    p.feed(SSE_HEAD + fed)
    events = drain(p)
    assert isinstance(events[0], ResponseHead)
    assert p.end_chunked() is True
    assert drain(p) == [EndOfMessage(True)]
    assert p.buffered == 0
    p.expect_response_to("GET")
    p.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert drain(p) == [rs(200, "OK", ("content-length", "2")), Body(b"ok"), EndOfMessage(True)]
    assert metrics.total("infersight.parse.resyncs") == 0
    assert metrics.total("infersight.parse.failures") == 0


def test_end_chunked_outside_a_chunked_body_changes_nothing() -> None:
    p = H1Parser("response")
    assert p.end_chunked() is False  # before any head
    p.expect_response_to("GET")
    p.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")
    drain(p)
    assert p.end_chunked() is False  # a Content-Length body
    p.feed(b"cde")
    assert drain(p) == [Body(b"cde"), EndOfMessage(True)]


def test_gap_during_resync_keeps_its_reason() -> None:
    metrics = SelfMetrics()
    got = run("request", [CLIENT_HELLO, 500, b"\x17\x03\x03GE", 7, b"T / HTTP/1.1\r\n\r\n"], metrics=metrics)
    # "GE", a gap, then "T / HTTP/1.1": no request line can span the gap.
    assert got == [Skipped(len(CLIENT_HELLO) + 5 + 16, "tls")]
    assert metrics.get("infersight.parse.failures", (("reason", "tls"),)) == 1
    assert metrics.total("infersight.parse.resyncs") == 0


def test_upgraded_bytes_are_counted_not_reported() -> None:
    metrics = SelfMetrics()
    got = run("response", [b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"\x00" * 50, 10], metrics=metrics)
    assert got == [rs(101, "Switching Protocols"), Upgrade()]
    assert metrics.get("infersight.parse.skipped.bytes", (("reason", "upgraded"),)) == 60
    assert metrics.total("infersight.parse.failures") == 0


def test_chunk_header_split_between_cr_and_lf() -> None:
    p = H1Parser("response", metrics=SelfMetrics())
    p.expect_response_to("POST")
    for part in (SSE_HEAD + b"3\r", b"\nabc\r", b"\n0\r", b"\n\r", b"\n"):
        p.feed(part)
    assert merged(drain(p)) == [SSE_RS, Body(b"abc"), EOM]


def test_response_methods_are_matched_in_order() -> None:
    p = H1Parser("response", metrics=SelfMetrics())
    p.expect_response_to("HEAD")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    p.expect_response_to("GET")  # queued late, but before its response arrives
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    assert [type(e) for e in drain(p)] == [ResponseHead, EndOfMessage, ResponseHead, Body, EndOfMessage]


def test_pending_methods_are_bounded_and_counted() -> None:
    metrics = SelfMetrics()
    p = H1Parser("response", metrics=metrics)
    for _ in range(200):
        p.expect_response_to("GET")
    assert metrics.get("infersight.parse.failures", (("reason", "pending_methods_full"),)) == 72


def test_feed_after_close_is_ignored() -> None:
    p = H1Parser("request", metrics=SelfMetrics())
    p.close()
    p.feed(b"GET / HTTP/1.1\r\n\r\n")
    p.feed_gap(5)
    assert p.next_event() is NEED_DATA


def test_header_lookup() -> None:
    headers = (("content-type", "text/event-stream"), ("x", "1"), ("x", "2"))
    assert header(headers, "Content-Type") == "text/event-stream"
    assert header(headers, "X") == "1"
    assert header(headers, "missing") is None


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        H1Parser("both")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        H1Parser("request", max_head_bytes=10)


# --- properties -----------------------------------------------------------------

# Pieces that make malformed-but-plausible HTTP when concatenated at random.
PIECES = [
    b"GET / HTTP/1.1\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n",
    b"HTTP/1.1 204 No Content\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: x\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Host: a\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"3\r\n",
    b"0\r\n",
    b"ffffffffffffffff\r\n",
    b"abc",
    b"data: {}\n\n",
    b"\x16\x03\x01",
    b"PRI * HTTP/2.0\r\n",
    b"\x00\xff",
    b"HTTP/1.",
    b"GE",
    b" ",
    b":",
]

inputs = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
    st.lists(
        st.sampled_from([s for c in CASES for s in c.segments if isinstance(s, bytes)]),
        min_size=1,
        max_size=4,
    ).map(b"".join),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=inputs,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    role=st.sampled_from(["request", "response"]),
    max_head=st.sampled_from([64, 200, 16384]),
    methods=st.lists(st.sampled_from(["GET", "HEAD", "POST", "CONNECT"]), max_size=4),
    close=st.booleans(),
)
def test_any_split_gives_the_same_events(
    data: bytes, cuts: list[int], role: str, max_head: int, methods: list[str], close: bool
) -> None:
    whole = run(role, [data], methods=tuple(methods), max_head_bytes=max_head, close=close)
    split = run(role, _split(data, cuts), methods=tuple(methods), max_head_bytes=max_head, close=close)  # type: ignore[arg-type]
    assert split == whole


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.one_of(inputs, st.integers(min_value=1, max_value=5000)), max_size=12),
    role=st.sampled_from(["request", "response"]),
    max_head=st.sampled_from([64, 1024]),
)
def test_random_input_never_raises_and_stays_bounded(ops: list[Segment], role: str, max_head: int) -> None:
    metrics = SelfMetrics()
    p = H1Parser(role, max_head_bytes=max_head, metrics=metrics)  # type: ignore[arg-type]
    fed = 0
    reported = 0
    for op in ops:
        if isinstance(op, int):
            p.feed_gap(op)
        else:
            p.feed(op)
            fed += len(op)
        assert p.buffered <= max(max_head, 1024)
        for ev in drain(p):
            assert isinstance(
                ev, RequestHead | ResponseHead | Body | BodyGap | EndOfMessage | Skipped | Upgrade
            )
            if isinstance(ev, Body):
                reported += len(ev.data)
            elif isinstance(ev, Skipped):
                assert ev.n > 0
                reported += ev.n
    p.close()
    for ev in drain(p):
        if isinstance(ev, Body):
            reported += len(ev.data)
        elif isinstance(ev, Skipped):
            reported += ev.n
    # Every captured byte is accounted for: body, skipped, or head/framing overhead.
    assert reported <= fed


# --- the common head read in C (agent/_httphead.c) against the Python reading ----

_TCHARS = list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_EOL = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\r"])
_NAME = st.one_of(
    st.sampled_from([b"Host", b"Content-Length", b"content-type", b"Transfer-Encoding", b"TRACEPARENT", b"X-Y"]),
    st.lists(st.sampled_from(_TCHARS), min_size=1, max_size=70).map(bytes),
    st.binary(max_size=4),
)
_VALUE = st.one_of(
    st.sampled_from([b"", b"3", b" 3 ", b"chunked", b"gzip, chunked", b" a b \t", b"\xe9t\xe9", b"x\ry", b"\t"]),
    st.binary(max_size=20).filter(lambda b: b"\n" not in b),
)
_FIELD = st.one_of(
    st.tuples(_NAME, st.sampled_from([b":", b": ", b" :", b":\t", b""]), _VALUE, _EOL).map(b"".join),
    st.sampled_from([b" folded\r\n", b"\tfolded\n"]),
)
_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.2", b"HTTP/1."])
_METHOD = st.one_of(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"PATCH", b"M-SEARCH"]),
    st.lists(st.sampled_from(_TCHARS), min_size=1, max_size=40).map(bytes),
    st.binary(max_size=4),
)
_TARGET = st.one_of(
    st.sampled_from([b"/", b"/v1/chat/completions", b"*", b"http://a/b?c=d", b"/caf\xc3\xa9", b"/\xff\xfe", b""]),
    st.binary(max_size=12),
)
_REQUEST_LINE = st.tuples(_METHOD, st.sampled_from([b" ", b"  ", b""]), _TARGET, st.sampled_from([b" ", b""]), _VERSION,
                          st.sampled_from([b"", b" "]), _EOL).map(b"".join)
_STATUS_LINE = st.tuples(
    _VERSION,
    st.sampled_from([b" ", b"", b"  "]),
    st.sampled_from([b"200", b"204", b"101", b"100", b"304", b"404", b"20", b"2000", b"abc"]),
    st.sampled_from([b"", b" OK", b" ", b" Not Found", b" r\xe9ason", b"OK", b" a\rb", b"\t"]),
    _EOL,
).map(b"".join)
_GOOD_EOL = st.sampled_from([b"\r\n", b"\n"])
_GOOD_FIELD = st.tuples(
    st.lists(st.sampled_from(_TCHARS), min_size=1, max_size=20).map(bytes),
    st.sampled_from([b":", b": ", b":\t", b":  "]),
    st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    _GOOD_EOL,
).map(b"".join)
_GOOD_START = st.one_of(
    st.tuples(_METHOD.filter(lambda m: m and all(c in _TCHARS for c in m) and len(m) <= 32), st.just(b" "),
              _TARGET.filter(lambda t: t and all(c > 0x20 and c != 0x7F for c in t)), st.just(b" "),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), _GOOD_EOL).map(b"".join),
    st.tuples(st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 "]), st.sampled_from([b"200", b"204", b"304", b"101", b"100"]),
              st.sampled_from([b"", b" OK", b" ", b" r\xe9ason"]), _GOOD_EOL).map(b"".join),
)
_HEADS = st.tuples(
    st.one_of(_GOOD_START, _REQUEST_LINE, _STATUS_LINE, st.sampled_from([b"", b"\r\n", b"\n"])),
    st.lists(st.one_of(_GOOD_FIELD, _FIELD), max_size=6).map(b"".join),
    st.sampled_from([b"\r\n", b"\n", b"", b"\r\n\r\n", b"\r"]),
    st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]),
).map(b"".join)


def test_the_c_head_reader_is_built_where_ci_runs() -> None:
    if IN_CI:
        assert NATIVE_HEAD, "agent/_httphead.c is not built: python -m agent.native build"


@pytest.mark.skipif(not NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
def test_the_c_head_reader_takes_common_heads_and_leaves_the_rest() -> None:
    from agent._httphead import parse_request_head, parse_response_head

    got = parse_request_head(b"xxPOST /v1/x HTTP/1.1\r\nHost: a\r\nX-Y:\t b c \r\n\r\nbody", 2, 16384)
    assert got == (46, "POST", "/v1/x", "1.1", (("host", "a"), ("x-y", "b c")))
    assert parse_response_head(b"HTTP/1.0 204\n\n", 0, 100) == (14, "1.0", 204, "", ())
    assert parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n", 0, 100) == (19, "1.1", 200, "OK", ())
    # the head must end within the limit
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, 26) is None
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, 27) is not None
    # not the common form: obsolete folding, a bare CR, a space before the colon, no end yet
    for head in (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
                 b"GET / HTTP/1.1\r\nA : b\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\r\n"):
        assert parse_request_head(head, 0, 16384) is None
        assert run("request", [head], native=True) == run("request", [head], native=False)
    with pytest.raises(ValueError):
        parse_request_head(b"GET", -1, 10)


@pytest.mark.skipif(not NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
def test_the_c_head_reader_hands_out_repeated_lines_again_but_never_credentials() -> None:
    from agent._httphead import parse_request_head

    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a:8000\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-secret\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            b"\r\nX-Custom: same\r\n\r\n")
    first, second = parse_request_head(head, 0, 16384), parse_request_head(head, 0, 16384)
    assert first == second and first is not None and second is not None
    shared = [a is b for a, b in zip(first[4], second[4], strict=True)]
    # host and content-type lines repeat from request to request; credentials, trace context
    # and names the reader does not know are made anew each time
    assert shared == [True, True, False, False, False]
    assert first[4][2] == ("authorization", "Bearer sk-secret")
    # lines differing in case or spacing, and many more lines than the reader keeps, in turn,
    # twice: each read as itself
    lines = [b"Host: h%d" % i for i in range(150)] + [b"HOST: h1", b"host:h1", b"Host: h1 ", b"Host:\th1"]
    lines += [b"Content-Type: " + b"x" * 90, b"Content-Type: " + b"y" * 200]
    for _ in range(2):
        for line in lines:
            got = parse_request_head(b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n", 0, 16384)
            name, _, value = line.partition(b":")
            assert got is not None and got[4] == ((name.decode().lower(), value.strip(b" \t").decode()),), line


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_HEADS,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
    role=st.sampled_from(["request", "response"]),
    max_head=st.sampled_from([64, 200, 16384]),
    methods=st.lists(st.sampled_from(["GET", "HEAD", "POST", "CONNECT"]), max_size=2),
)
def test_the_c_head_reader_agrees_with_the_python_reading(
    data: bytes, cuts: list[int], role: str, max_head: int, methods: list[str]
) -> None:
    kw = {"methods": tuple(methods), "max_head_bytes": max_head, "close": True}
    reference = run(role, [data], native=False, **kw)  # type: ignore[arg-type]
    assert run(role, [data], native=True, **kw) == reference  # type: ignore[arg-type]
    assert run(role, _split(data, cuts), native=True, **kw) == reference  # type: ignore[arg-type]


# --- a whole request, or a framed response's head, read without events (take_*_head) -------

_FRAMING = [
    b"Content-Length: %d", b"content-length:%d ", b"CONTENT-LENGTH:\t%d\t", b"Content-Length: %d, %d",
    b"Content-Length: +%d", b"Content-Length: 0%d", b"Content-Length: %d0000000000000000000",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"transfer-encoding: gzip, chunked",
    b"Transfer-Encoding: gzip", b"Transfer-Encoding:  chunked ", b"Content-Type: text/event-stream",
    b"content-type: application/x-ndjson; charset=utf-8", b"Content-Type:", b"TraceParent:  a b ", b"traceparent:",
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
]
_BODIES = st.one_of(st.binary(max_size=30), st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"data: x\n\n"]))
_AFTER = st.sampled_from([b"", b"", b"", b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"x", b"\r\n"])


_REQUEST_STARTS = st.sampled_from([b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n", b"GET / HTTP/1.0\n",
                                   b"M-SEARCH * HTTP/1.1\r\n", b"POST /api/generate HTTP/1.1\r\n"])
_STATUS_STARTS = st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 204 No Content\r\n", b"HTTP/1.0 304\r\n",
                                  b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 101 Switching\r\n",
                                  b"HTTP/1.1 404 Not Found\n", b"HTTP/1.0 200\r\n"])


@st.composite
def _framed_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A role and a message for it: a start line, header fields framing a body (or not, or
    wrongly), the body and what may follow."""
    role = draw(st.sampled_from(["request", "response"]))
    body = draw(_BODIES)
    common = _REQUEST_STARTS if role == "request" else _STATUS_STARTS
    # (each choice by a drawn number: generation leans to the first choices and to the bounds)
    start = draw({6: _GOOD_START, 7: _REQUEST_LINE, 8: _STATUS_LINE}.get(draw(st.integers(0, 9)), common))
    fields = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):  # framing, mostly once
        template = _FRAMING[draw(st.sampled_from([0, 0, 7, 7, *range(len(_FRAMING))]))]
        n = max(0, len(body) + draw(st.sampled_from([0, 0, 0, -3, -1, 1, 2])))
        line = template % ((n,) * template.count(b"%d"))
        fields.append(line + draw(_EOL if draw(st.integers(0, 9)) == 7 else _GOOD_EOL))
    for _ in range(draw(st.integers(0, 3))):  # other fields, mostly well formed
        fields.insert(draw(st.integers(0, len(fields))), draw(_FIELD if draw(st.integers(0, 9)) == 7 else _GOOD_FIELD))
    end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b""]))
    return role, start + b"".join(fields) + end + body + draw(_AFTER)


def _take_and_feed_agree(role: str, data: bytes, more: list[bytes], methods: list[str], max_head: int) -> bool:
    """``take_*_head`` against feeding ``data`` to the Python reading: the same head, the same
    events, then the same events for every later feed and at close, and the same counts.
    True when the head was taken."""
    m_fast, m_ref = SelfMetrics(), SelfMetrics()
    fast = H1Parser(role, max_head_bytes=max_head, metrics=m_fast)  # type: ignore[arg-type]
    ref = H1Parser(role, max_head_bytes=max_head, metrics=m_ref, native_head=False)  # type: ignore[arg-type]
    for m in methods:
        fast.expect_response_to(m)
        ref.expect_response_to(m)
    ref.feed(data)
    expected = drain(ref)
    got = fast.take_request_head(data) if role == "request" else fast.take_response_head(data)
    if got is None:  # nothing changed: the bytes read as feeding them does
        fast.feed(data)
        assert drain(fast) == expected
    else:
        head = expected[0]
        if role == "request":
            method, target, traceparent, body = cast(tuple[str, str, str | None, bytes], got)
            assert isinstance(head, RequestHead) and (head.method, head.target) == (method, target)
            assert header(head.headers, "traceparent") == traceparent
            rest = [ev for ev in merged(expected[1:]) if ev != EndOfMessage(True)]
            assert rest == ([Body(body)] if body else [])
            assert drain(fast) == []
        else:
            end, status, ctype = cast(tuple[int, int, str | None], got)
            assert isinstance(head, ResponseHead) and head.status == status
            assert header(head.headers, "content-type") == ctype
            fast.feed(data[end:])
            assert merged(drain(fast)) == merged(expected[1:])
    for piece in more:
        ref.feed(piece)
        ended = fast.take_body(piece)
        if ended is None:  # nothing changed: the bytes read as feeding them does
            fast.feed(piece)
            assert merged(drain(fast)) == merged(drain(ref))
        else:
            assert drain(fast) == []
            assert merged(drain(ref)) == [Body(piece)] + ([EndOfMessage(True)] if ended else [])
    fast.close()
    ref.close()
    assert merged(drain(fast)) == merged(drain(ref))
    assert m_fast.snapshot() == m_ref.snapshot()
    return got is not None


@pytest.mark.skipif(not NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.one_of(_framed_messages(), st.tuples(st.sampled_from(["request", "response"]), _HEADS)),
    more=st.lists(st.one_of(_BODIES, _AFTER, _framed_messages().map(lambda m: m[1])), max_size=3),
    max_head=st.sampled_from([64, 16384, 16384]),
    methods=st.lists(st.sampled_from(["GET", "HEAD", "POST", "POST", "CONNECT"]), max_size=2),
)
def test_a_head_taken_without_events_reads_as_feeding_it(
    case: tuple[str, bytes], more: list[bytes], max_head: int, methods: list[str]
) -> None:
    _take_and_feed_agree(case[0], case[1], more, methods, max_head)


@pytest.mark.skipif(not NATIVE_HEAD, reason="agent/_httphead.c not built (CI requires it)")
def test_common_heads_are_taken_and_the_rest_left_to_feeding() -> None:
    post = b"POST /v1/chat/completions?a=b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\ntraceparent: t1\r\n" \
           b"TRACEPARENT: t2\r\n\r\n"
    p = H1Parser("request", metrics=SelfMetrics())
    assert p.take_request_head(post + b"abcd") == ("POST", "/v1/chat/completions?a=b", "t1", b"abcd")
    assert p.take_request_head(b"GET / HTTP/1.1\r\n\r\n") == ("GET", "/", None, b"")
    # a body cut short: the parser is left inside it
    assert p.take_request_head(post + b"ab") == ("POST", "/v1/chat/completions?a=b", "t1", b"ab")
    assert p.take_request_head(b"GET / HTTP/1.1\r\n\r\n") is None
    p.feed(b"cd")
    assert merged(drain(p)) == [Body(b"cd"), EndOfMessage(True)]
    sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    q = H1Parser("response", metrics=SelfMetrics())
    q.expect_response_to("POST")
    assert q.take_response_head(sse) == (len(sse), 200, "text/event-stream")
    assert q.at_chunk_start()
    for role, method, message in [
        ("request", "", post + b"abcde"),  # a pipelined request follows
        ("request", "", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("request", "", b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("request", "", b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
        ("request", "", b"\r\nGET / HTTP/1.1\r\n\r\n"),
        ("request", "", b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"),
        ("response", "HEAD", sse),
        ("response", "CONNECT", sse),
        ("response", "GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("response", "GET", b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("response", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ("response", "GET", b"HTTP/1.1 200 OK\r\n\r\nread to close"),
        ("response", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("response", "GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    ]:
        assert not _take_and_feed_agree(role, message, [], [method] if method else [], 16384), message
    # a parser that holds bytes or events is not between messages
    r = H1Parser("request", metrics=SelfMetrics())
    r.feed(b"GET / HTTP/1.1\r\n")
    assert r.take_request_head(b"\r\n") is None
    r.feed(b"\r\n")
    assert r.take_request_head(b"GET / HTTP/1.1\r\n\r\n") is None  # its events not yet taken
    drain(r)
    assert r.take_request_head(b"GET / HTTP/1.1\r\n\r\n") is not None
    assert H1Parser("request", native_head=False).take_request_head(b"GET / HTTP/1.1\r\n\r\n") is None
    # the common forms, against feeding them
    assert _take_and_feed_agree("request", post + b"abcd", [b"GET / HTTP/1.1\r\n\r\n"], [], 16384)
    assert _take_and_feed_agree("response", sse + b"5\r\nhello\r\n", [b"0\r\n\r\n"], ["POST"], 16384)
    assert _take_and_feed_agree("response", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", [b"cde"], ["GET"], 16384)
    # the method taken with the head: the next response answers the next one (HEAD: no body)
    assert _take_and_feed_agree("response", sse + b"0\r\n\r\n", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"],
                                ["GET", "HEAD"], 16384)


def test_a_content_length_body_is_taken_without_events() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    for native in (True, False):
        p = H1Parser("response", metrics=SelfMetrics(), native_head=native)
        p.expect_response_to("GET")
        assert p.take_body(b"abc") is None  # between messages: no body to be in
        p.feed(head)
        assert p.take_body(b"abc") is None  # the head's event not yet taken
        assert drain(p) == [ResponseHead(200, "OK", "1.1", (("content-length", "10"),))]
        assert p.take_body(b"") is None
        assert p.take_body(b"abcd") is False
        assert p.take_body(b"efghijk") is None  # one byte past the body's end
        assert p.take_body(b"efghij") is True
        assert drain(p) == []
        assert p.take_body(b"x") is None  # between messages again
        p.expect_response_to("GET")
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # the next response reads as usual
        assert merged(drain(p))[1:] == [Body(b"ok"), EndOfMessage(True)]
    # against feeding: a body in pieces, exactly to its end, then the next message
    assert _take_and_feed_agree("response", head + b"ab", [b"cdefgh", b"ij", b"HTTP/1.1 204 x\r\n\r\n"],
                                ["POST", "GET"], 16384)
    post = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 6\r\n\r\n"
    assert _take_and_feed_agree("request", post, [b"{}", b"{\"a\"", b"GET / HTTP/1.1\r\n\r\n"], [], 16384)
    # bytes past the end are left to feeding
    assert _take_and_feed_agree("request", post + b"{", [b"}}}}}GET / HTTP/1.1\r\n\r\n"], [], 16384)
