"""The socket probe's HTTP/2 records back into streams and requests (agent/h2wire.py).

The records are made the way the kernel makes them: :class:`Kernel` below is a
pure-Python model of the probe's h2 mode (the contract in ``probes/sockets.h``:
frames cut across syscalls, which frames are forwarded and which aggregated,
captured payload continued in MORE records, totals on the record that ends a
stream, a lost walk sent raw), and its records go through the probe's own
ctypes layout and :class:`probes.socket_events.Decoder`. It is applied to the
real tritonclient recording and to synthetic conversations; the truth is what
:class:`H2Connection` makes of the whole bytes (tests/test_http2.py checks that
truth against the recording's own timestamps).
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import kserve
from agent.h2wire import H2Tracker, stream_request
from agent.http2 import PREFACE, H2Connection, H2Stream, HpackDecoders
from agent.selfmetrics import SelfMetrics
from probes.socket_events import (
    DIR_IN,
    DIR_OUT,
    EV_H2,
    H2F_AGG,
    H2F_AGG_MISSING,
    H2F_JOINED,
    H2K_FRAME,
    H2K_MORE,
    H2K_RAW,
    ROLE_CLIENT,
    ROLE_SERVER,
    Decoder,
    H2Agg,
    H2Event,
    Layout,
)
from probes.socket_layout import ctypes_structs
from tests.test_http2 import (
    GOLDEN,
    OK_TRAILERS,
    REQ,
    RESP,
    SERVICE,
    Conv,
    assert_never_wrong,
    failures,
    infer_request,
    load,
    msg,
    parse,
)

CAP = Layout().h2_cap
Chunk = tuple[str, int, bytes]

# --- a model of the kernel's h2 mode -----------------------------------------------

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
_FORWARDED = {_HEADERS, _CONT, _SETTINGS, _RST, _GOAWAY, _PUSH}
_END_STREAM, _PADDED = 0x1, 0x8
_MAX_FRAME = 1 << 20  # H2_MAX_FRAME

_STRUCT = ctypes_structs(Layout())["h2_event_t"]
_DECODER = Decoder(Layout())


@dataclass
class _Agg:
    first_ns: int = 0
    last_ns: int = 0
    nbytes: int = 0
    frames: int = 0
    msgs: int = 0
    lost: int = 0
    msg_left: int = 0  # body bytes of the current gRPC message still to come
    prefix: bytes = b""  # a message prefix cut by a frame or syscall end

    def walk(self, seg: bytes, ts: int) -> None:
        """gRPC length prefixes over DATA content, across frames and syscalls."""
        while seg and not self.lost:
            if self.msg_left:
                t = min(self.msg_left, len(seg))
                self.msg_left -= t
                seg = seg[t:]
                continue
            if not self.prefix:
                self.msgs += 1
                self.last_ns = ts
            need = 5 - len(self.prefix)
            self.prefix += seg[:need]
            seg = seg[need:]
            if len(self.prefix) == 5:
                self.msg_left = int.from_bytes(self.prefix[1:5], "big")
                self.prefix = b""

    def fields(self) -> tuple[int, ...]:
        return (self.first_ns, self.last_ns, self.nbytes, self.frames, self.msgs, self.lost)


@dataclass
class _Walk:
    """The frame walk of one direction."""

    left: int = 0  # payload bytes of the current frame still to come
    fwd_left: int = 0  # of them, bytes still to forward as MORE
    sid: int = 0
    ftype: int = 0
    msgs: bool = False  # the current frame's content goes to its stream's message walk
    hdr: bytes = b""  # a frame header cut by a syscall's end
    lost: bool = False


@dataclass
class Kernel:
    """What the probe sends for one connection, fed its syscalls in order.

    ``evict``: streams whose totals entry is gone when they end (AGG_MISSING).
    ``desync``: (direction, n) — the walk of that direction is lost at its n-th
    syscall (from then on RAW); ``regain``: (direction, n) — found again there.
    ``totals=False`` leaves the totals off the records (an older probe).
    """

    role: int = ROLE_SERVER
    conn_id: int = 1
    cap: int = CAP
    joined: bool = False
    evict: frozenset[int] = frozenset()
    desync: frozenset[tuple[str, int]] = frozenset()
    regain: frozenset[tuple[str, int]] = frozenset()
    totals: bool = True
    records: list[H2Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client_dir = DIR_OUT if self.role == ROLE_CLIENT else DIR_IN
        self.walks = {DIR_IN: _Walk(), DIR_OUT: _Walk()}
        self.streams: dict[int, tuple[_Agg, _Agg]] = {}
        self.calls = {"client": 0, "server": 0}
        if not self.joined:
            self.walks[self.client_dir].left = len(PREFACE)  # skipped like a frame
            self.walks[self.client_dir].ftype = 0xFF

    def syscall(self, who: str, ts: int, data: bytes) -> None:
        d = self.client_dir if who == "client" else 1 - self.client_dir
        w = self.walks[d]
        n = self.calls[who]
        self.calls[who] += 1
        if (who, n) in self.desync:
            w.lost = True
        if (who, n) in self.regain:
            self.walks[d] = w = _Walk()
        if w.lost:
            self._emit(d, H2K_RAW, ts, flen=len(data), payload=data[: self.cap])
            return
        pos = 0
        if w.left:
            take = min(w.left, len(data))
            if w.fwd_left:
                more = min(w.fwd_left, take)
                self._emit(d, H2K_MORE, ts, sid=w.sid, ftype=w.ftype, payload=data[:more])
                w.fwd_left -= more
            if w.msgs and w.sid in self.streams:
                self.streams[w.sid][d].walk(data[:take], ts)
            w.left -= take
            pos = take
        while pos < len(data):
            need = 9 - len(w.hdr)
            w.hdr += data[pos : pos + need]
            pos += min(need, len(data) - pos)
            if len(w.hdr) < 9:
                return  # a header cut by the syscall's end: kept for the next one
            hb, w.hdr = w.hdr, b""
            flen = int.from_bytes(hb[:3], "big")
            ftype, flags = hb[3], hb[4]
            sid = int.from_bytes(hb[5:9], "big") & 0x7FFFFFFF
            if flen > _MAX_FRAME:
                w.lost = True
                self._emit(d, H2K_RAW, ts, flen=len(data) - pos, payload=data[pos : pos + self.cap])
                return
            avail = min(flen, len(data) - pos)
            fwd = ftype in _FORWARDED
            header_only = False
            st = None
            if sid and ftype in (_DATA, _HEADERS):
                st = self.streams.setdefault(sid, (_Agg(), _Agg()))
            elif sid and ftype == _RST:
                st = self.streams.get(sid)
            k: _Agg | None = None
            if ftype == _DATA:
                if st is not None:
                    k = st[d]
                    if k.frames == 0:
                        fwd = True
                        k.first_ns = ts
                    elif flags & _END_STREAM:
                        fwd = header_only = True
                    k.frames += 1
                    k.nbytes += flen
                    if flags & _PADDED:
                        k.lost = 1
                else:
                    fwd = True
            hflags, agg = 0, None
            ends = ftype == _RST or (
                ftype in (_HEADERS, _DATA) and flags & _END_STREAM and d != self.client_dir
            )
            if sid and ends and self.totals:
                if sid in self.evict:
                    self.streams.pop(sid, None)
                    st = None
                if st is not None:
                    hflags, agg = H2F_AGG, (st[0].fields(), st[1].fields())
                else:
                    hflags = H2F_AGG_MISSING
            if fwd:
                n_cap = 0 if header_only else min(avail, self.cap)
                self._emit(
                    d,
                    H2K_FRAME,
                    ts,
                    sid=sid,
                    flen=flen,
                    ftype=ftype,
                    fflags=flags,
                    hflags=hflags,
                    agg=agg,
                    payload=data[pos : pos + n_cap],
                )
                want = min(flen, self.cap)
                w.fwd_left = 0 if header_only or want <= avail else want - avail
            else:
                w.fwd_left = 0
            if hflags & H2F_AGG or (ends and st is not None):
                self.streams.pop(sid, None)
                k = None  # gone: the frame's own messages go uncounted
            if k is not None and not flags & _PADDED:
                k.walk(data[pos : pos + avail], ts)
            pos += avail
            w.left, w.sid, w.ftype = flen - avail, sid, ftype
            w.msgs = k is not None and not flags & _PADDED

    def _emit(
        self,
        d: int,
        kind: int,
        ts: int,
        *,
        sid: int = 0,
        flen: int = 0,
        ftype: int = 0,
        fflags: int = 0,
        hflags: int = 0,
        agg: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
        payload: bytes = b"",
    ) -> None:
        """One record, through the probe's ctypes layout and Decoder."""
        ev = _STRUCT()
        ev.type, ev.dir, ev.kind, ev.role = EV_H2, d, kind, self.role
        ev.tgid, ev.conn_id, ev.ts_ns, ev.fd = 4242, self.conn_id, ts, 7
        ev.sid, ev.flen, ev.cap = sid, flen, len(payload)
        ev.ftype, ev.fflags, ev.hflags = ftype, fflags, hflags | (H2F_JOINED if self.joined else 0)
        if agg is not None:
            for i in (0, 1):
                a = ev.agg[i]
                a.first_ns, a.last_ns, a.bytes, a.frames, a.msgs, a.lost = agg[i]
        ctypes.memmove(ev.payload, payload, len(payload))
        raw = bytes(ev)[: _STRUCT.payload.offset + len(payload)]
        decoded = _DECODER.decode(raw)
        assert isinstance(decoded, H2Event)
        self.records.append(decoded)


def syscalls(chunks: Iterable[Chunk], cut: int | Callable[[bytes], list[int]] | None) -> list[Chunk]:
    """Each chunk as one syscall, or cut into several (the same time: one read's worth)."""
    out: list[Chunk] = []
    for d, ts, data in chunks:
        if cut is None:
            out.append((d, ts, data))
            continue
        points = list(range(cut, len(data), cut)) if isinstance(cut, int) else cut(data)
        bounds = [0, *points, len(data)]
        out += [(d, ts, data[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    return out


def kernel_records(chunks: Iterable[Chunk], *, cut: Any = None, **kw: Any) -> list[H2Event]:
    k = Kernel(**kw)
    for d, ts, data in syscalls(chunks, cut):
        k.syscall(d, ts, data)
    return k.records


def track(
    records: Iterable[H2Event],
    *,
    metrics: SelfMetrics | None = None,
    close_ns: int | None = None,
    close_lost: int = 0,
    **kw: Any,
) -> tuple[list[H2Stream], SelfMetrics]:
    """Feed records, close their connections; streams by (completion, then) stream id."""
    m = metrics or SelfMetrics()
    t = H2Tracker(metrics=m, decoders=HpackDecoders(metrics=m), **kw)
    out: list[H2Stream] = []
    last: dict[int, int] = {}
    for ev in records:
        last[ev.conn_id] = ev.ts_ns
        out += t.feed(ev)
    for conn_id, ts in last.items():
        out += t.close(conn_id, close_ns if close_ns is not None else ts, lost=close_lost)
    return sorted(out, key=lambda s: s.stream_id), m


def without_bytes(s: H2Stream) -> H2Stream:
    """A record without its message captures (bounded prefixes whose cut differs by design)."""
    return replace(s, request_message=b"", response_message=b"")


def drop_records(records: list[H2Event], drop: set[int]) -> tuple[list[H2Event], int]:
    """The records the ring buffer took, ``lost`` counting the refused ones before each,
    and how many were refused after the last (the close summary's count)."""
    out: list[H2Event] = []
    pending = 0
    for i, ev in enumerate(records):
        if i in drop:
            pending += 1
            continue
        out.append(replace(ev, lost=pending) if pending else ev)
        pending = 0
    return out, pending


def kinds(records: Iterable[H2Event]) -> dict[int, int]:
    out: dict[int, int] = {}
    for ev in records:
        out[ev.kind] = out.get(ev.kind, 0) + 1
    return out


def resyncs(m: SelfMetrics) -> dict[str, float]:
    return {dict(s.labels)["reason"]: s.value for s in m.snapshot() if s.name == "infersight.parse.resyncs"}


# --- the recording, through the kernel ----------------------------------------------


def test_kernel_model_forwards_few_frames_of_the_recording() -> None:
    _, chunks = load(GOLDEN)
    recs = kernel_records(chunks)
    frames = sum(_count_frames(c) for d, _, c in chunks)
    assert kinds(recs) == {H2K_FRAME: len(recs)}
    # The streaming calls' later DATA, PINGs and WINDOW_UPDATEs stay in the kernel.
    assert len(recs) < frames - 20
    ending = [ev for ev in recs if ev.hflags & H2F_AGG]
    assert len(ending) == 8 and all(ev.agg is not None for ev in ending)


def _count_frames(data: bytes) -> int:
    pos = len(PREFACE) if data.startswith(PREFACE) else 0
    n = 0
    while pos + 9 <= len(data):
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
        n += 1
    return n


@pytest.mark.parametrize("role", [ROLE_SERVER, ROLE_CLIENT])
@pytest.mark.parametrize("cut", [None, 1, 5, 9, 700, 4096])
def test_recording_through_the_kernel_gives_the_parsers_streams(role: int, cut: int | None) -> None:
    """Cut at every byte, inside frame headers, inside captured payloads (MORE records),
    beyond the capture: the same streams as the parser makes of the whole bytes."""
    _, chunks = load(GOLDEN)
    truth, _ = parse(chunks)
    recs = kernel_records(chunks, cut=cut, role=role)
    if cut is not None and cut < CAP:
        assert kinds(recs).get(H2K_MORE, 0) > 0
    got, m = track(recs)
    assert failures(m) == {} and resyncs(m) == {}
    assert [without_bytes(s) for s in got] == [without_bytes(s) for s in truth]
    assert [kserve.stream_model(s) for s in got] == [kserve.stream_model(s) for s in truth]
    # What the recording holds, as tests/test_http2.py checked it against the peers' clocks.
    by_id = {s.stream_id: s for s in got}
    assert (by_id[13].rpc_method, by_id[13].response_messages, by_id[13].request_messages) == (
        "ModelStreamInfer",
        7,
        2,
    )
    assert (by_id[11].grpc_status, by_id[15].end_reason, by_id[15].reset_by) == (5, "reset", "client")
    assert by_id[9].request_bytes > 32768 and not any(s.messages_lost for s in got)


def test_kernel_totals_replace_the_parsers_counts() -> None:
    _, chunks = load(GOLDEN)
    truth = {s.stream_id: s for s in parse(chunks)[0]}
    # Without totals the parser sees one DATA frame per stream and direction: the
    # streaming call's later messages are not there, and the counts say so.
    bare, _ = track(kernel_records(chunks, totals=False))
    s13 = next(s for s in bare if s.stream_id == 13)
    assert (s13.response_messages, s13.request_messages) == (1, 1) and s13.messages_lost
    assert all(s.messages_lost for s in bare if s.request_messages or s.response_messages)
    assert truth[13].response_messages == 7 and not truth[13].messages_lost
    # Totals are taken as they come, whatever the parser saw.
    recs = kernel_records(chunks)
    ending = next(i for i, ev in enumerate(recs) if ev.sid == 13 and ev.hflags & H2F_AGG)
    srv = DIR_OUT  # ROLE_SERVER: the server writes
    made_up = (
        replace(recs[ending].agg[DIR_IN], msgs=3, bytes=999_999),  # type: ignore[index]
        replace(recs[ending].agg[srv], msgs=42, first_ns=11, last_ns=77, lost=True),  # type: ignore[index]
    )
    recs[ending] = replace(recs[ending], agg=made_up)
    got, _ = track(recs)
    s13 = next(s for s in got if s.stream_id == 13)
    assert (s13.request_messages, s13.request_bytes, s13.response_messages) == (3, 999_999, 42)
    assert (s13.first_message_ns, s13.last_message_ns, s13.messages_lost) == (11, 77, True)


def test_missing_totals_keep_the_parsers_counts_marked_lost() -> None:
    _, chunks = load(GOLDEN)
    truth = {s.stream_id: s for s in parse(chunks)[0]}
    got, m = track(kernel_records(chunks, evict=frozenset({13})))
    by_id = {s.stream_id: s for s in got}
    assert failures(m) == {"h2_totals_missing": 1}
    assert by_id[13].messages_lost and by_id[13].response_messages == 1  # what the parser saw
    assert (by_id[13].grpc_status, by_id[13].path) == (0, truth[13].path)
    for sid, s in by_id.items():
        if sid != 13:
            assert without_bytes(s) == without_bytes(truth[sid])


def test_totals_wait_for_the_continuation_that_ends_the_block() -> None:
    c = Conv(table_size=0)
    c.send("client", c.headers("client", 1, REQ) + DataFrame(1, msg(b"q"), flags=["END_STREAM"]).serialize())
    c.send("server", c.headers("server", 1, RESP))
    for i in range(3):
        c.send("server", DataFrame(1, msg(b"x" * (10 + i))).serialize())
    block = c.block("server", OK_TRAILERS)
    c.send("server", HeadersFrame(1, block[:3], flags=["END_STREAM"]).serialize())
    c.send("server", _continuation(1, block[3:]))
    recs = kernel_records(c.chunks)
    assert [ev.ftype for ev in recs if ev.hflags & H2F_AGG] == [_HEADERS]
    (st,), m = track(recs)
    assert failures(m) == {}
    assert (st.response_messages, st.response_bytes, st.grpc_status, st.messages_lost) == (3, 48, 0, False)


def _continuation(sid: int, block: bytes) -> bytes:
    return len(block).to_bytes(3, "big") + bytes([_CONT, 0x4]) + sid.to_bytes(4, "big") + block


def test_totals_for_a_stream_already_ended_are_counted() -> None:
    c = Conv(table_size=0)
    c.send("client", c.headers("client", 1, REQ) + c.headers("client", 3, REQ))
    c.send("server", GoAwayFrame(0, last_stream_id=1).serialize())  # the parser ends stream 3 here
    c.send("server", c.headers("server", 3, RESP + OK_TRAILERS, end_stream=True))  # totals for 3
    c.send("server", c.headers("server", 1, RESP + OK_TRAILERS, end_stream=True))
    got, m = track(kernel_records(c.chunks))
    assert [(s.stream_id, s.end_reason) for s in got] == [(1, "end_stream"), (3, "goaway")]
    assert failures(m) == {"h2_totals_unmatched": 1}


def test_totals_smaller_than_what_was_seen_are_partial() -> None:
    """A kernel entry evicted and made afresh mid-stream gives totals of part of it."""
    _, chunks = load(GOLDEN)
    recs = kernel_records(chunks)
    ending = next(i for i, ev in enumerate(recs) if ev.sid == 9 and ev.hflags & H2F_AGG)
    agg = recs[ending].agg
    assert agg is not None
    recs[ending] = replace(recs[ending], agg=(replace(agg[0], bytes=10, msgs=0), agg[1]))
    got, m = track(recs)
    s9 = next(s for s in got if s.stream_id == 9)
    assert failures(m) == {"h2_totals_partial": 1}
    assert s9.messages_lost and s9.request_bytes > 32768  # the parser's own count stays


def test_a_second_first_data_means_the_totals_restarted() -> None:
    c = Conv()
    c.send(
        "client",
        c.headers("client", 1, REQ) + DataFrame(1, msg(infer_request("m")), flags=["END_STREAM"]).serialize(),
    )
    c.send("server", c.headers("server", 1, RESP) + DataFrame(1, msg(b"a")).serialize())
    c.send("server", DataFrame(1, msg(b"b")).serialize())
    c.send("server", c.headers("server", 1, OK_TRAILERS, end_stream=True))
    recs = kernel_records(c.chunks)
    # The kernel's entry went between the two DATA frames: it forwarded the second as a first.
    second = DataFrame(1, msg(b"b")).serialize()
    k = Kernel()
    for d, ts, data in c.chunks:
        if data == second:
            k.streams.pop(1)
        k.syscall(d, ts, data)
    assert len(k.records) == len(recs) + 1
    (s,), m = track(k.records)
    assert failures(m) == {"h2_totals_partial": 1}
    assert s.messages_lost and s.response_messages == 2  # the parser saw both


# --- loss of the walk, of records, of the start ---------------------------------------


# Derandomized: the same examples every run, so CI sees no new ones by chance.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_recording_cut_anywhere_gives_the_parsers_streams(data: st.DataObject) -> None:
    _, chunks = load(GOLDEN)
    truth, _ = parse(chunks)
    cuts = data.draw(st.lists(st.integers(1, 2000), min_size=1, max_size=6), label="cuts")

    def cut(b: bytes) -> list[int]:
        return sorted({x % len(b) for x in cuts} - {0})

    got, m = track(kernel_records(chunks, cut=cut))
    assert failures(m) == {}
    assert [without_bytes(s) for s in got] == [without_bytes(s) for s in truth]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_records_lost_anywhere_are_counted_and_nothing_is_invented(data: st.DataObject) -> None:
    _, chunks = load(GOLDEN)
    truth, _ = parse(chunks)
    recs = kernel_records(chunks, cut=data.draw(st.sampled_from([None, 7, 300]), label="cut"))
    drop = set(data.draw(st.lists(st.integers(0, len(recs) - 1), max_size=8), label="drop"))
    lossy, after = drop_records(recs, drop)
    got, m = track(lossy, close_lost=after)
    assert failures(m).get("h2_records_lost", 0) == len(drop)
    assert_never_wrong(got, truth)
    by_id = {t.stream_id: t for t in truth}
    for s in got:
        t = by_id[s.stream_id]
        if not s.messages_lost:
            # Counts not marked lost are the kernel's, which no lost record changes.
            assert (s.request_messages, s.response_messages) == (t.request_messages, t.response_messages)


def _records() -> st.SearchStrategy[H2Event]:
    agg = st.builds(
        H2Agg,
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.booleans(),
    )
    return st.builds(
        H2Event,
        dir=st.integers(0, 2),
        kind=st.integers(0, 4),
        role=st.sampled_from([ROLE_SERVER, ROLE_CLIENT, 0]),
        tgid=st.just(1),
        conn_id=st.integers(1, 4),
        ts_ns=st.integers(0, 10**12),
        fd=st.just(3),
        sid=st.sampled_from([0, 1, 3, 5, 2, 0x7FFFFFFF]),
        flen=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        ftype=st.integers(0, 12),
        fflags=st.integers(0, 255),
        hflags=st.integers(0, 7),
        lost=st.integers(0, 3),
        agg=st.one_of(st.none(), st.tuples(agg, agg)),
        payload=st.binary(max_size=80),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_records(), max_size=40))
def test_random_records_never_raise_and_stay_bounded(records: list[H2Event]) -> None:
    m = SelfMetrics()
    t = H2Tracker(max_conns=2, metrics=m, decoders=HpackDecoders(metrics=m), on_evict=lambda cid, ss: None)
    for ev in records:
        for s in t.feed(ev):
            request(s, metrics=m)
        assert len(t) <= 2
    for cid in range(1, 5):
        for s in t.close(cid, 10**12):
            request(s, metrics=m)
    assert len(t) == 0


def test_connection_lose_without_a_search_takes_the_next_frame() -> None:
    """H2Connection.lose: the state that depended on the lost bytes goes either way; with
    resync=False the next byte is a frame's, with resync=True the reader searches."""
    for resync in (False, True):
        m = SelfMetrics()
        conn = H2Connection(from_start=True, decoders=HpackDecoders(metrics=m), metrics=m)
        c = Conv()
        c.unary(1)
        for d, ts, data in c.chunks:
            conn.feed(d, data, ts)  # type: ignore[arg-type]
        cut = c.headers("client", 3, REQ)[:-2]
        conn.feed("client", cut, 9000)  # a HEADERS frame in progress
        conn.lose("client", "test", resync=resync)
        conn.lose("server", "test", resync=resync)
        assert conn.degraded("client") and conn.degraded("server")
        # The client's next frame is a whole HEADERS that refers to table entries from
        # before the loss: it fails to decode, counted; the frame is still taken.
        c.chunks = []
        c.unary(5)
        for d, ts, data in c.chunks:
            conn.feed(d, data, ts)  # type: ignore[arg-type]
        conn.close(99_000)
        recs = {s.stream_id: s for s in conn.take_completed()}
        assert recs[1].path == f"/{SERVICE}/ModelInfer" and recs[3].headers_lost
        assert failures(m)["h2_headers_lost"] == 1 and failures(m)["hpack"] >= 1
        assert m.get("infersight.parse.skipped.bytes", (("reason", "test"),)) == len(cut) - 9
        if resync:
            assert resyncs(m) == {"test": 2}
        else:
            # Taken at once: stream 5 is recorded whole as to framing, ended by its trailers.
            assert resyncs(m) == {} and (recs[5].end_reason, recs[5].response_messages) == ("end_stream", 1)


def test_raw_records_resync_and_later_streams_are_whole() -> None:
    c = Conv(table_size=0)  # no dynamic table: what follows a loss still decodes
    for sid in range(1, 16, 2):
        c.unary(sid, model=f"m{sid}")
    truth, _ = parse(c.chunks)
    # The server direction's walk is lost at its 6th syscall (stream 3's DATA) for good.
    recs = kernel_records(c.chunks, desync=frozenset({("server", 5)}))
    assert kinds(recs).get(H2K_RAW, 0) > 10
    got, m = track(recs)
    assert resyncs(m).get("h2_desync") == 1
    assert_never_wrong(got, truth)
    by_id = {s.stream_id: s for s in got}
    assert set(by_id) == {t.stream_id for t in truth}
    # After the search found frames again, the raw bytes are whole frames: every stream
    # that began after the loss ends as it did, with its status and its response message.
    for t in truth[2:]:
        s = by_id[t.stream_id]
        assert (s.status, s.grpc_status, s.response_messages, s.end_reason, s.end_ns) == (
            200,
            0,
            1,
            "end_stream",
            t.end_ns,
        )
        assert (s.path, kserve.stream_model(s)) == (t.path, kserve.stream_model(t))


def test_raw_then_frames_again_realigns_without_a_search() -> None:
    c = Conv(table_size=0)
    for sid in range(1, 12, 2):
        c.unary(sid)
    truth, _ = parse(c.chunks)
    # Lost at the server's 4th syscall, found again at its 8th (a frame boundary).
    recs = kernel_records(c.chunks, desync=frozenset({("server", 3)}), regain=frozenset({("server", 7)}))
    assert H2K_RAW in kinds(recs)
    got, m = track(recs)
    assert resyncs(m) == {"h2_desync": 1}
    assert_never_wrong(got, truth)
    by_id = {s.stream_id: s for s in got}
    for t in truth[3:]:
        assert without_bytes(by_id[t.stream_id]) == without_bytes(t)


def test_raw_payload_is_trimmed_to_what_the_syscall_moved() -> None:
    c = Conv(table_size=0)
    c.unary(1)
    c.unary(3)
    truth, _ = parse(c.chunks)
    recs = kernel_records(c.chunks, desync=frozenset({("server", 2)}))
    # A probe that copies a full capture window past the syscall's end: junk after flen.
    junk = [replace(ev, payload=ev.payload + b"\xff" * 40) if ev.kind == H2K_RAW else ev for ev in recs]
    assert track(junk)[0] == track(recs)[0]
    assert_never_wrong(track(junk)[0], truth)


def test_joined_connection_degrades_without_a_crash() -> None:
    """The kernel joins at the recording's 7th stream: tritonclient's headers refer to
    table entries from before; those blocks fail, counted, and nothing is guessed."""
    _, chunks = load(GOLDEN)
    truth, _ = parse(chunks)
    first = {d: _first_chunk_of(chunks, d, 13) for d in ("client", "server")}
    late = [ch for i, ch in enumerate(chunks) if i >= first[ch[0]]]
    recs = kernel_records(late, joined=True)
    assert recs and all(ev.hflags & H2F_JOINED for ev in recs)
    got, m = track(recs)
    assert_never_wrong(got, truth)
    assert failures(m).get("hpack", 0) > 0 and resyncs(m) == {}
    by_id = {s.stream_id: s for s in got}
    # Framing and totals do not depend on the table: the counts are exact.
    for sid in (13, 15):
        t = {s.stream_id: s for s in truth}[sid]
        assert (by_id[sid].response_messages, by_id[sid].end_reason) == (t.response_messages, t.end_reason)


def _first_chunk_of(chunks: list[Chunk], d: str, sid: int) -> int:
    for i, (dd, _, data) in enumerate(chunks):
        if dd == d and len(data) >= 9 and int.from_bytes(data[5:9], "big") & 0x7FFFFFFF == sid:
            return i
    raise AssertionError(sid)


def test_lost_records_are_counted_and_nothing_is_invented() -> None:
    _, chunks = load(GOLDEN)
    truth = {s.stream_id: s for s in parse(chunks)[0]}
    recs = kernel_records(chunks, cut=5)
    # Lose the client's HEADERS of stream 7 (a table insert) and a MORE of stream 13's.
    h7 = next(i for i, ev in enumerate(recs) if ev.kind == H2K_FRAME and ev.sid == 7 and ev.ftype == _HEADERS)
    m13 = next(i for i, ev in enumerate(recs) if ev.kind == H2K_MORE and ev.sid == 13 and ev.dir == DIR_IN)
    lossy, _ = drop_records(recs, {h7, h7 + 1, m13})
    got, m = track(lossy)
    assert failures(m)["h2_records_lost"] == 3
    assert_never_wrong(got, list(truth.values()))
    by_id = {s.stream_id: s for s in got}
    assert by_id[7].headers_lost and by_id[7].path is None
    # Which direction lost records is unknown: both tables were emptied, so stream 7's
    # trailers (which refer to them) are lost too. It still ends, with the kernel's counts;
    # so does 13, whose lost MORE record only cut a captured payload.
    assert (by_id[7].response_messages, by_id[7].grpc_status, by_id[7].end_reason) == (1, None, "end_stream")
    assert (by_id[13].response_messages, by_id[13].request_messages) == (7, 2)
    # Later blocks refer to entries the emptied tables lack: lost, counted. The MORE
    # records after the lost one have no frame waiting for them.
    assert failures(m)["hpack"] > 0 and failures(m)["h2_more_orphan"] > 0


def test_lost_records_at_close_are_counted() -> None:
    c = Conv()
    c.unary(1)
    m = SelfMetrics()
    t = H2Tracker(metrics=m)
    for ev in kernel_records(c.chunks):
        t.feed(ev)
    assert t.has(1) and len(t) == 1
    assert t.close(1, 10**9, lost=2) == []
    assert failures(m) == {"h2_records_lost": 2} and not t.has(1) and len(t) == 0
    assert t.close(1, 10**9) == []


# --- captured payload across syscalls ------------------------------------------------


def test_more_records_carry_payload_across_syscalls_with_their_own_times() -> None:
    c = Conv(table_size=0)
    block = c.block("client", REQ)
    head = HeadersFrame(1, block, flags=["END_HEADERS"]).serialize()
    body = msg(infer_request("resnet") + b"\x3a\xb8\x17" + b"t" * 3000)  # raw_input_contents: 3000 bytes
    data = DataFrame(1, body, flags=["END_STREAM"]).serialize()
    resp = c.headers("server", 1, RESP)
    out = DataFrame(1, msg(b"r" * 50)).serialize()
    k = Kernel()
    for d, ts, b in c.chunks:
        k.syscall(d, ts, b)
    n0 = len(k.records)
    # HEADERS in three syscalls, its own header cut inside; the DATA header alone, then
    # its payload over two syscalls and beyond the capture.
    k.syscall("client", 100, head[:4])
    k.syscall("client", 110, head[4:20])
    k.syscall("client", 120, head[20:])
    k.syscall("client", 200, data[:9])
    k.syscall("client", 210, data[9:600])
    k.syscall("client", 220, data[600:])
    k.syscall("server", 300, resp + out[:9])
    k.syscall("server", 310, out[9:])
    k.syscall("server", 400, c.headers("server", 1, OK_TRAILERS, end_stream=True))
    sent = [(ev.kind, ev.ts_ns, len(ev.payload)) for ev in k.records[n0:]]
    assert sent == [
        (H2K_FRAME, 110, 11),  # the header completes in the second syscall
        (H2K_MORE, 120, len(block) - 11),
        (H2K_FRAME, 200, 0),
        (H2K_MORE, 210, 591),
        (H2K_MORE, 220, CAP - 591),
        (H2K_FRAME, 300, len(resp) - 9),
        (H2K_FRAME, 300, 0),
        (H2K_MORE, 310, 55),
        (H2K_FRAME, 400, len(c.block("server", OK_TRAILERS))),
    ]
    (s,), m = track(k.records)
    assert failures(m) == {}
    assert (s.path, s.request_start_ns, s.response_first_ns, s.end_ns) == (
        f"/{SERVICE}/ModelInfer",
        110,
        300,
        400,
    )
    assert kserve.request_model(s) == "resnet" and s.request_bytes == len(body)
    # The kernel stamps a stream's first DATA when it walks the frame's header.
    assert (s.first_message_ns, s.response_messages, s.request_messages) == (300, 1, 1)
    # Without totals the parser stamps the message by the syscall that carried its prefix.
    (bare,), _ = track([replace(ev, hflags=0, agg=None) for ev in k.records])
    assert (bare.first_message_ns, bare.response_messages) == (310, 1)


def test_short_captures_and_orphan_more_records_are_counted() -> None:
    c = Conv(table_size=0)
    c.unary(1)
    recs = kernel_records(c.chunks, cut=3)
    more = [i for i, ev in enumerate(recs) if ev.kind == H2K_MORE]
    assert more
    # Take away one MORE record without saying so (a probe that dropped it silently).
    short = recs[: more[0]] + recs[more[0] + 1 :]
    got, m = track(short)
    assert failures(m).get("h2_capture_short", 0) == 1
    assert len(got) == 1 and got[0].grpc_status == 0
    # A MORE record nothing waits for.
    m2 = SelfMetrics()
    t = H2Tracker(metrics=m2)
    t.feed(recs[0])
    t.feed(replace(recs[more[0]], conn_id=recs[0].conn_id, dir=1 - recs[more[0]].dir))
    assert failures(m2) == {"h2_more_orphan": 1}
    assert m2.get("infersight.parse.skipped.bytes", (("reason", "h2_more_orphan"),)) == len(
        recs[more[0]].payload
    )


def test_small_capture_loses_headers_never_invents_them() -> None:
    _, chunks = load(GOLDEN)
    truth, _ = parse(chunks)
    got, m = track(kernel_records(chunks, cap=64), h2_cap=64)
    assert_never_wrong(got, truth)
    assert failures(m).get("h2_headers_lost", 0) > 0
    by_id = {s.stream_id: s for s in got}
    t = {s.stream_id: s for s in truth}
    assert all(by_id[sid].response_messages == t[sid].response_messages for sid in t)


def test_bad_records_are_counted_and_dropped() -> None:
    c = Conv()
    c.unary(1)
    recs = kernel_records(c.chunks)
    m = SelfMetrics()
    t = H2Tracker(metrics=m)
    assert t.feed(replace(recs[0], dir=2)) == [] and t.feed(replace(recs[0], kind=9)) == []
    assert t.feed(replace(recs[0], flen=1 << 24)) == []
    assert failures(m) == {"h2_bad_record": 3} and len(t) == 0
    with pytest.raises(ValueError):
        H2Tracker(max_conns=0)


# --- connections ----------------------------------------------------------------------


def _open_stream_records(conn_id: int, ts: int) -> list[H2Event]:
    c = Conv(table_size=0)
    c.send("client", c.headers("client", 1, REQ))
    return [replace(ev, conn_id=conn_id, ts_ns=ts + ev.ts_ns) for ev in kernel_records(c.chunks)]


def test_lru_evicts_the_oldest_connection_and_hands_over_its_streams() -> None:
    m = SelfMetrics()
    evicted: list[tuple[int, list[H2Stream]]] = []
    t = H2Tracker(max_conns=2, metrics=m, on_evict=lambda cid, ss: evicted.append((cid, ss)))
    for cid in (1, 2):
        for ev in _open_stream_records(cid, cid * 10**6):
            assert t.feed(ev) == []
    for ev in _open_stream_records(1, 3 * 10**6)[-1:]:
        t.feed(ev)  # connection 1 is used again: 2 is now the oldest
    for ev in _open_stream_records(3, 4 * 10**6):
        t.feed(ev)
    assert m.total("infersight.parse.h2.connections.evicted") == 1
    assert (t.has(1), t.has(2), t.has(3), len(t)) == (True, False, True, 2)
    ((cid, streams),) = evicted
    assert cid == 2 and [(s.stream_id, s.end_reason, s.path) for s in streams] == [
        (1, "close", f"/{SERVICE}/ModelInfer")
    ]
    assert streams[0].end_ns == max(ev.ts_ns for ev in _open_stream_records(2, 2 * 10**6))
    # Without a taker the streams are counted as lost.
    m2 = SelfMetrics()
    t2 = H2Tracker(max_conns=1, metrics=m2)
    for cid in (1, 2):
        for ev in _open_stream_records(cid, 0):
            t2.feed(ev)
    assert m2.get("infersight.requests.lost", (("reason", "h2_evicted"),)) == 1


def test_connections_are_separate() -> None:
    _, chunks = load(GOLDEN)
    a = kernel_records(chunks, conn_id=1)
    b = kernel_records(chunks, conn_id=2, role=ROLE_CLIENT)
    mixed = [ev for pair in zip(a, b, strict=True) for ev in pair]
    got, m = track(mixed)
    truth, _ = parse(chunks)
    assert failures(m) == {}
    assert [without_bytes(s) for s in got] == sorted(
        [without_bytes(s) for s in truth] * 2, key=lambda s: s.stream_id
    )


# --- stream_request -------------------------------------------------------------------


def to_unix(ns: int) -> int:
    return ns + 1_700_000_000 * 10**9


def request(s: H2Stream, span_kind: str = "server", metrics: SelfMetrics | None = None) -> Any:
    return stream_request(
        s,
        pid=4242,
        command="tritonserver",
        span_kind=span_kind,
        server_port=8001,
        client_address="10.0.0.2",
        client_port=51000,
        to_unix_ns=to_unix,
        metrics=metrics or SelfMetrics(),
    )


@pytest.fixture(scope="module")
def recorded() -> dict[int, H2Stream]:
    _, chunks = load(GOLDEN)
    got, _ = track(kernel_records(chunks, cut=700))
    return {s.stream_id: s for s in got}


def test_unary_request_fields(recorded: dict[int, H2Stream]) -> None:
    s = recorded[5]
    r = request(s)
    assert (r.method, r.path, r.status_code, r.span_kind) == ("POST", f"/{SERVICE}/ModelInfer", 200, "server")
    assert dict(r.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,
    }
    assert type(r.attributes["rpc.grpc.status_code"]) is int
    assert (r.pid, r.command, r.server_port, r.client_address, r.client_port) == (
        4242,
        "tritonserver",
        8001,
        "10.0.0.2",
        51000,
    )
    assert s.request_start_ns is not None and s.end_ns is not None
    assert (r.start_time_unix_nano, r.end_time_unix_nano) == (to_unix(s.request_start_ns), to_unix(s.end_ns))
    assert (r.request_model, r.response_model, r.operation) == ("simple", "simple", None)
    assert (r.streaming, r.output_events, r.time_to_first_token_s, r.time_per_output_token_s) == (
        False,
        None,
        None,
        None,
    )
    assert (r.aborted, r.error_type, r.first_token_time_unix_nano) == (False, None, None)
    assert r.trace_id is not None and len(r.trace_id) == 32 and r.span_id is not None and len(r.span_id) == 16
    assert request(s).trace_id != r.trace_id
    # Health RPCs are unary gRPC too, without a model.
    live = request(recorded[1])
    assert (live.attributes["rpc.method"], live.request_model, live.streaming) == ("ServerLive", None, False)


def test_streaming_request_times_per_message(recorded: dict[int, H2Stream]) -> None:
    s = recorded[13]
    r = request(s)
    assert s.request_start_ns and s.first_message_ns and s.last_message_ns
    assert (r.streaming, r.output_events) == (True, 7)
    assert r.time_to_first_token_s == pytest.approx((s.first_message_ns - s.request_start_ns) / 1e9)
    assert r.time_per_output_token_s == pytest.approx((s.last_message_ns - s.first_message_ns) / 1e9 / 6)
    assert r.time_per_output_token_s > 0.01  # the server spaces its responses 30 ms apart
    assert r.first_token_time_unix_nano == to_unix(s.first_message_ns)
    assert (r.request_model, r.response_model, r.error_type, r.aborted) == (
        "simple_stream",
        "simple_stream",
        None,
        False,
    )
    # Counts the capture lost are not reported as counts.
    lossy = request(replace(s, messages_lost=True))
    assert (lossy.output_events, lossy.time_per_output_token_s) == (None, None)
    assert lossy.time_to_first_token_s == r.time_to_first_token_s


def test_client_cancel_is_an_abort(recorded: dict[int, H2Stream]) -> None:
    s = recorded[15]
    r = request(s)
    assert (s.end_reason, s.reset_by, s.reset_code) == ("reset", "client", 8)
    assert (r.aborted, r.error_type, r.streaming) == (True, None, True)
    assert "rpc.grpc.status_code" not in r.attributes
    # The same reset from the server, or with another code, is an error, not an abort.
    assert (
        request(replace(s, reset_by="server")).aborted,
        request(replace(s, reset_by="server")).error_type,
    ) == (
        False,
        "reset",
    )
    assert request(replace(s, reset_code=2)).error_type == "reset"


def test_grpc_status_errors_depend_on_the_side(recorded: dict[int, H2Stream]) -> None:
    nf = recorded[11]
    r = request(nf)
    assert (r.attributes["rpc.grpc.status_code"], r.status_code, r.error_type) == (5, 200, None)
    assert (r.request_model, r.response_model, r.streaming) == ("missing", None, False)
    assert request(nf, span_kind="client").error_type == "NOT_FOUND"
    unavailable = replace(nf, grpc_status=14)
    assert request(unavailable).error_type == "UNAVAILABLE"
    assert request(replace(nf, grpc_status=99), span_kind="client").error_type == "_OTHER"
    assert request(replace(nf, grpc_status=1)).error_type is None  # CANCELLED: not the server's fault


def test_streams_that_did_not_end_name_how_they_ended() -> None:
    c = Conv(table_size=0)
    c.send("client", c.headers("client", 1, REQ) + c.headers("client", 3, REQ) + c.headers("client", 5, REQ))
    c.send("client", c.headers("client", 7, REQ))
    c.send("server", c.headers("server", 7, RESP) + RstStreamFrame(7, error_code=2).serialize())
    c.send("server", GoAwayFrame(0, last_stream_id=3, error_code=0).serialize())
    got, m = track(kernel_records(c.chunks), close_ns=99_000)
    assert failures(m) == {}
    assert [(s.stream_id, s.end_reason) for s in got] == [
        (1, "close"),
        (3, "close"),
        (5, "goaway"),
        (7, "reset"),
    ]
    errors = [request(s).error_type for s in got]
    assert errors == ["close", "close", "goaway", "reset"]
    assert not any(request(s).aborted for s in got)
    assert request(got[0]).end_time_unix_nano == to_unix(99_000)


def test_non_grpc_h2_stream() -> None:
    c = Conv(table_size=0)
    req = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/v2/health/ready"),
        (":authority", "triton:8000"),
    ]
    c.send("client", c.headers("client", 1, req, end_stream=True))
    c.send("server", c.headers("server", 1, [(":status", "503"), ("content-type", "application/json")]))
    c.send("server", DataFrame(1, b'{"ready": false}' * 4, flags=["END_STREAM"]).serialize())
    (s,), m = track(kernel_records(c.chunks))
    assert failures(m) == {}
    r = request(s)
    assert (r.method, r.path, r.status_code, dict(r.attributes)) == ("GET", "/v2/health/ready", 503, {})
    assert (r.streaming, r.output_events, r.error_type, r.request_model) == (False, None, None, None)


def test_a_stream_without_a_start_is_counted() -> None:
    s = H2Stream(
        stream_id=9, method=None, path=None, authority=None, content_type=None, status=None, grpc_status=None,
        grpc_message=None, request_start_ns=None, response_first_ns=None, first_message_ns=None,
        last_message_ns=None, end_ns=5, end_reason="reset", reset_code=8, request_messages=0,
        response_messages=0, request_bytes=10, response_bytes=0, request_compressed=None,
        response_compressed=None, headers_lost=True, messages_lost=True, rpc_system=None, rpc_service=None,
        rpc_method=None,
    )  # fmt: skip
    m = SelfMetrics()
    assert request(s, metrics=m) is None
    assert m.get("infersight.requests.lost", (("reason", "h2_no_start"),)) == 1
    # With only the response seen, the record starts there and ends where last seen.
    late = request(replace(s, response_first_ns=3, end_ns=None, last_message_ns=4), metrics=m)
    assert (late.start_time_unix_nano, late.end_time_unix_nano) == (to_unix(3), to_unix(4))


def test_message_bytes_never_reach_the_record() -> None:
    canary = b"CANARY-7f3a9e-prompt-text"
    c = Conv()
    body = infer_request("llama") + b"\x1a" + bytes([len(canary)]) + canary  # a field after the name
    c.send("client", c.headers("client", 1, REQ) + DataFrame(1, msg(body), flags=["END_STREAM"]).serialize())
    c.send("server", c.headers("server", 1, RESP) + DataFrame(1, msg(body) + msg(body)).serialize())
    c.send("server", c.headers("server", 1, OK_TRAILERS, end_stream=True))
    (s,), _ = track(kernel_records(c.chunks))
    assert canary in s.request_message and canary in s.response_message  # the parser had them
    r = request(s)
    assert r.request_model == "llama" and r.streaming
    text = r.to_json()
    assert canary.decode() not in text and "CANARY" not in repr(r)
    assert canary.decode() not in repr(s)


def test_frame_header_rebuild_matches_the_wire() -> None:
    """The tracker's frame header is the one the peer wrote (24-bit length, R bit cleared)."""
    frame = SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 1 << 20}).serialize()
    k = Kernel()
    k.syscall("client", 1, PREFACE + frame)
    (ev,) = k.records
    assert (ev.flen, ev.ftype, ev.sid, ev.payload) == (len(frame) - 9, 4, 0, frame[9:])
    assert (
        struct.pack(">I", ev.flen)[1:] + bytes([ev.ftype, ev.fflags]) + struct.pack(">I", ev.sid) == frame[:9]
    )
