"""Server-sent events parsing (agent/sse.py), per the WHATWG event-stream rules.

Each case runs fed whole, byte by byte, and with a next event appended.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.selfmetrics import SelfMetrics
from agent.sse import SSEEvent, SSEParser


def ev(data: bytes, event: str | None = None, id: str | None = None, truncated: bool = False) -> SSEEvent:
    return SSEEvent(data, event, id, truncated)


def feed_all(
    chunks: list[bytes], max_event_bytes: int = 65536, metrics: SelfMetrics | None = None, whole_events: bool = True
) -> list[SSEEvent]:
    p = SSEParser(max_event_bytes, metrics=metrics or SelfMetrics(), whole_events=whole_events)
    out: list[SSEEvent] = []
    for c in chunks:
        out += p.feed(c)
    return out


# (name, stream, expected events, ends at an event boundary)
CASES: list[tuple[str, bytes, list[SSEEvent], bool]] = [
    ("data_with_and_without_space", b"data:a\n\ndata: b\n\n", [ev(b"a"), ev(b"b")], True),
    ("only_one_space_removed", b"data:  two\n\n", [ev(b" two")], True),
    ("multi_line_data", b"data: a\ndata:\ndata: c\n\n", [ev(b"a\n\nc")], True),
    ("comments_and_keepalives", b": ping\n\n:\ndata: x\n: mid\n\n", [ev(b"x")], True),
    (
        "fields",
        b"event: delta\nid: 7\nretry: 1000\ndata: x\n\n",
        [ev(b"x", "delta", "7")],
        True,
    ),
    ("field_without_colon", b"data\n\n", [ev(b"")], True),
    ("unknown_field_ignored", b"foo: bar\ndata: x\n\n", [ev(b"x")], True),
    ("no_data_not_dispatched", b"event: ping\nid: 1\n\ndata: y\n\n", [ev(b"y")], True),
    ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [ev(b"a"), ev(b"b")], True),
    ("cr_only", b"data: a\r\rdata: b\rdata: c\r\r", [ev(b"a"), ev(b"b\nc")], True),
    ("mixed_line_ends", b"data: a\r\ndata: b\n\r\n", [ev(b"a\nb")], True),
    ("done_is_an_event", b'data: {"x":1}\n\ndata: [DONE]\n\n', [ev(b'{"x":1}'), ev(b"[DONE]")], True),
    ("bom_at_start", b"\xef\xbb\xbfdata: x\n\n", [ev(b"x")], True),
    ("id_with_nul_ignored", b"id: a\x00b\ndata: x\n\n", [ev(b"x")], True),
    ("empty_event_type_is_none", b"event:\ndata: x\n\n", [ev(b"x")], True),
    ("incomplete_event_waits", b"data: x\n\ndata: partial\n", [ev(b"x")], False),
    ("colon_in_value_kept", b'data: {"a":"b:c"}\n\n', [ev(b'{"a":"b:c"}')], True),
]
NEXT = (b"data: next\n\n", [ev(b"next")])


@pytest.mark.parametrize(("name", "stream", "expected", "boundary"), CASES, ids=[c[0] for c in CASES])
def test_fed_whole(name: str, stream: bytes, expected: list[SSEEvent], boundary: bool) -> None:
    assert feed_all([stream]) == expected


@pytest.mark.parametrize(("name", "stream", "expected", "boundary"), CASES, ids=[c[0] for c in CASES])
def test_fed_byte_by_byte(name: str, stream: bytes, expected: list[SSEEvent], boundary: bool) -> None:
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == expected


@pytest.mark.parametrize(
    ("name", "stream", "expected", "boundary"), [c for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]]
)
def test_with_next_event_appended(name: str, stream: bytes, expected: list[SSEEvent], boundary: bool) -> None:
    assert feed_all([stream + NEXT[0]]) == expected + NEXT[1]


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    # Were the LF taken as a second (blank) line, "a" would dispatch alone.
    assert feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [ev(b"a\nb")]


def test_lone_cr_at_feed_end_then_data() -> None:
    assert feed_all([b"data: a\r", b"data: b\r\r"]) == [ev(b"a\nb")]


def test_event_type_does_not_leak_into_next_event() -> None:
    assert feed_all([b"event: a\ndata: 1\n\ndata: 2\n\n"]) == [ev(b"1", "a"), ev(b"2")]


def test_oversized_event_is_truncated_and_counted() -> None:
    metrics = SelfMetrics()
    stream = b"data: " + b"x" * 40 + b"\ndata: yy\n\ndata: ok\n\n"
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        got = feed_all(chunks, max_event_bytes=16, metrics=metrics)
        assert got == [ev(b"x" * 16, truncated=True), ev(b"ok")]
    assert metrics.get("infersight.parse.failures", (("reason", "sse_event_too_large"),)) == 2


def test_many_small_lines_reaching_the_bound() -> None:
    got = feed_all([b"data: 1234\n" * 5 + b"\n"], max_event_bytes=12)
    assert got == [ev(b"1234\n1234\n12", truncated=True)]


def test_gap_marks_the_current_event_truncated() -> None:
    p = SSEParser(metrics=SelfMetrics())
    assert p.feed(b'data: {"tok') == []
    p.feed_gap(9)
    assert p.feed(b'en":"x"}\n\ndata: {"b":1}\n\n') == [ev(b'{"token":"x"}', truncated=True), ev(b'{"b":1}')]


def test_gap_between_events_marks_the_next_one() -> None:
    p = SSEParser(metrics=SelfMetrics())
    assert p.feed(b"data: a\n\n") == [ev(b"a")]
    p.feed_gap(100)
    assert p.feed(b"data: b\n\ndata: c\n\n") == [ev(b"b", truncated=True), ev(b"c")]


def test_realistic_vllm_stream() -> None:
    stream = (
        b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
        b'"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}\n\n'
        b"data: [DONE]\n\n"
    )
    got = feed_all([stream[i : i + 7] for i in range(0, len(stream), 7)])
    assert len(got) == 3
    assert got[0].data.startswith(b'{"id":"c1"') and got[1].data.endswith(b'"finish_reason":null}]}')
    assert got[2] == ev(b"[DONE]")


# --- properties -------------------------------------------------------------------

PIECES = [
    b"data:",
    b"data: ",
    b"event: e",
    b"id: 1",
    b"retry: 5",
    b":",
    b"x",
    b"[DONE]",
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
]
streams = st.one_of(st.binary(max_size=400), st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join))



def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


@settings(max_examples=300, deadline=None)
@given(
    data=streams,
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
    bound=st.sampled_from([4, 64]),
)
def test_any_split_gives_the_same_events(data: bytes, cuts: list[int], bound: int) -> None:
    assert feed_all(_split(data, cuts), bound) == feed_all([data], bound)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.one_of(streams, st.integers(min_value=1, max_value=100)), max_size=10))
def test_random_input_is_bounded(ops: list[bytes | int]) -> None:
    p = SSEParser(32, metrics=SelfMetrics())
    for op in ops:
        if isinstance(op, int):
            p.feed_gap(op)
            continue
        for e in p.feed(op):
            assert len(e.data) <= 32
        assert p.buffered <= 2 * 32 + 16


_EVENTS = st.lists(
    st.one_of(
        st.sampled_from([b"data: {}\n\n", b"data:{}\r\n\r\n", b"data: [DONE]\n\n", b"data: a:b\n\n", b"data: \n\n",
                         b"data:  two\r\n\r\n", b"data: x\r\n\n", b"data: x\n\r\n", b"data: x\r\r",
                         b"\xef\xbb\xbfdata: bom\n\n", b": ping\n\n", b"event: e\ndata: y\n\n", b"data: x\n"]),
        st.binary(max_size=80).map(lambda b: b"data: " + b.replace(b"\r", b"").replace(b"\n", b"") + b"\n\n"),
        st.sampled_from(PIECES),
    ),
    max_size=20,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(_EVENTS, streams),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=6),
    bound=st.sampled_from([4, 64, 65536]),
)
def test_whole_events_in_one_match_agree_with_the_line_by_line_reading(
    data: bytes, cuts: list[int], bound: int
) -> None:
    chunks = _split(data, cuts)
    m1, m2 = SelfMetrics(), SelfMetrics()
    reference = feed_all(chunks, bound, m1, whole_events=False)
    assert feed_all(chunks, bound, m2, whole_events=True) == reference
    assert m2.snapshot() == m1.snapshot()  # the oversize count too


def test_a_token_write_is_one_match() -> None:
    p = SSEParser(metrics=SelfMetrics())
    assert p.feed(b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n') == [ev(b'{"a":1}'), ev(b"[DONE]")]
    # pending state (an event type awaiting its data) leaves the feed to the line reading
    assert p.feed(b"event: e\n") == []
    assert p.feed(b"data: x\n\n") == [ev(b"x", "e")]
