"""NDJSON line splitting (agent/ndjson.py): whole, byte by byte, with a next line appended."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ndjson import NDJSONLine, NDJSONParser
from agent.selfmetrics import SelfMetrics


def line(data: bytes, truncated: bool = False) -> NDJSONLine:
    return NDJSONLine(data, truncated)


def feed_all(
    chunks: list[bytes], max_line_bytes: int = 65536, metrics: SelfMetrics | None = None
) -> list[NDJSONLine]:
    p = NDJSONParser(max_line_bytes, metrics=metrics or SelfMetrics())
    out: list[NDJSONLine] = []
    for c in chunks:
        out += p.feed(c)
    return out


OLLAMA_CHAT = (
    b'{"model":"llama3","created_at":"2024-05-01T00:00:00Z","message":{"role":"assistant","content":"Hi"},"done":false}\n'
    b'{"model":"llama3","created_at":"2024-05-01T00:00:01Z","message":{"role":"assistant","content":""},'
    b'"done_reason":"stop","done":true,"total_duration":1,"prompt_eval_count":5,"eval_count":2}\n'
)

# (name, stream, expected lines, ends at a line boundary)
CASES: list[tuple[str, bytes, list[NDJSONLine], bool]] = [
    ("two_lines", b'{"a":1}\n{"b":2}\n', [line(b'{"a":1}'), line(b'{"b":2}')], True),
    ("crlf", b'{"a":1}\r\n{"b":2}\r\n', [line(b'{"a":1}'), line(b'{"b":2}')], True),
    ("blank_lines_skipped", b'\n\r\n  \n{"a":1}\n\n', [line(b'{"a":1}')], True),
    ("partial_last_line_waits", b'{"a":1}\n{"b":', [line(b'{"a":1}')], False),
    ("ollama_chat", OLLAMA_CHAT, [line(x) for x in OLLAMA_CHAT.split(b"\n")[:2]], True),
]
NEXT = (b'{"next":true}\n', [line(b'{"next":true}')])


@pytest.mark.parametrize(("name", "stream", "expected", "boundary"), CASES, ids=[c[0] for c in CASES])
def test_fed_whole(name: str, stream: bytes, expected: list[NDJSONLine], boundary: bool) -> None:
    assert feed_all([stream]) == expected


@pytest.mark.parametrize(("name", "stream", "expected", "boundary"), CASES, ids=[c[0] for c in CASES])
def test_fed_byte_by_byte(name: str, stream: bytes, expected: list[NDJSONLine], boundary: bool) -> None:
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == expected


@pytest.mark.parametrize(
    ("name", "stream", "expected", "boundary"), [c for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]]
)
def test_with_next_line_appended(
    name: str, stream: bytes, expected: list[NDJSONLine], boundary: bool
) -> None:
    assert feed_all([stream + NEXT[0]]) == expected + NEXT[1]


def test_long_line_keeps_its_start_and_is_counted() -> None:
    # Ollama's final /api/generate line carries the whole `context` token array.
    final = b'{"done":true,"context":[' + b",".join(b"%d" % i for i in range(5000)) + b'],"eval_count":9}'
    metrics = SelfMetrics()
    for chunks in ([final + b"\n{}\n"], [final[:100], final[100:], b"\n{}\n"]):
        got = feed_all(chunks, max_line_bytes=1024, metrics=metrics)
        assert got == [line(final[:1024], truncated=True), line(b"{}")]
    assert metrics.get("infersight.parse.failures", (("reason", "ndjson_line_too_large"),)) == 2


def test_crlf_at_exact_bound_is_not_truncation() -> None:
    assert feed_all([b"x" * 8 + b"\r\n"], max_line_bytes=8) == [line(b"x" * 8)]
    assert feed_all([b"x" * 8, b"\r", b"\n"], max_line_bytes=8) == [line(b"x" * 8)]


def test_gap_marks_the_current_line() -> None:
    p = NDJSONParser(metrics=SelfMetrics())
    assert p.feed(b'{"response":"a') == []
    p.feed_gap(10)
    assert p.feed(b'","done":false}\n{"x":1}\n') == [
        line(b'{"response":"a","done":false}', True),
        line(b'{"x":1}'),
    ]


def test_gap_between_lines_marks_the_next_line() -> None:
    p = NDJSONParser(metrics=SelfMetrics())
    assert p.feed(b"{}\n") == [line(b"{}")]
    p.feed_gap(10)
    assert p.feed(b'"done":true}\n{"y":2}\n') == [line(b'"done":true}', True), line(b'{"y":2}')]


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.sampled_from([b"{}", b"\n", b"\r", b"\r\n", b" ", b'{"a":1}', b"x" * 9]), max_size=60
        ).map(b"".join),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
    bound=st.sampled_from([4, 8, 64]),
)
def test_any_split_gives_the_same_lines(data: bytes, cuts: list[int], bound: int) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    got = feed_all(chunks, bound)
    assert got == feed_all([data], bound)
    assert all(len(x.data) <= bound for x in got)
