"""The event layout is a contract between probes/sockets.bpf.c and Python.

A C program built from probes/sockets.h prints every struct's size and field
offsets; the ctypes twins and the struct formats used for decoding must agree.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import socket_events as se
from probes import socket_layout
from probes.sockets import SocketProbeConfig
from tests.conftest import IN_CI

HEADER = Path(__file__).resolve().parent.parent / "probes" / "sockets.h"

FIELDS = {
    "data_event_t": ["type", "dir", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq", "len", "index",
                     "head_len", "tail_len", "lost", "pad", "payload"],
    "tail_slot_t": ["ts_ns", "len", "index", "cap", "pad", "data"],
    "summary_event_t": ["type", "reason", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq",
                        "req_start_ns", "req_last_ns", "resp_first_ns", "resp_last_ns", "eof_ns", "bytes_in",
                        "bytes_out", "reads", "writes", "lost", "ring_count", "gaps", "ring"],
    "conn_event_t": ["type", "role", "addr_len", "source", "tgid", "conn_id", "ts_ns", "fd", "listen_fd",
                     "addr", "pad1"],
    "proc_event_t": ["type", "kind", "pad0", "tgid", "pid", "ppid", "ts_ns", "comm"],
}


def c_layout(tmp_path: Path, cfg: SocketProbeConfig) -> dict[str, dict[str, int]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             "typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;",
             "typedef int32_t s32;", f'#include "{HEADER}"', "int main(void) {"]
    for struct, fields in FIELDS.items():
        lines.append(f'printf("{struct} sizeof %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(f'printf("{struct} {f} %zu\\n", offsetof(struct {struct}, {f}));')
    names = {k: getattr(se, k) for k in dir(se) if re.fullmatch(r"(EV|DIR|ROLE|DF|SR|CF|PK|CS)_[A-Z_]+", k)}
    for name in names:
        lines.append(f'printf("const {name} %d\\n", (int){name});')
    lines.append('printf("const C_COUNTERS %d\\n", (int)C_COUNTERS);')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    defs = [f"-DHEAD_CAP={cfg.head_cap}", f"-DTAIL_CAP={cfg.tail_cap}", f"-DTAIL_SLOTS={cfg.tail_slots}",
            f"-DRING_HEAD={cfg.ring_head}"]
    subprocess.run(["gcc", *defs, "-o", str(exe), str(src)], check=True)
    out: dict[str, dict[str, int]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        a, b, c = line.split()
        out.setdefault(a, {})[b] = int(c)
    return out


@pytest.mark.parametrize("cfg", [SocketProbeConfig(), SocketProbeConfig(head_cap=1024, tail_cap=128, tail_slots=4)])
def test_ctypes_twins_match_c(tmp_path: Path, cfg: SocketProbeConfig) -> None:
    c = c_layout(tmp_path, cfg)
    structs = socket_layout.ctypes_structs(cfg.layout)
    for name, fields in FIELDS.items():
        cls = structs[name]
        assert ctypes.sizeof(cls) == c[name]["sizeof"], name
        for f in fields:
            assert getattr(cls, f).offset == c[name][f], f"{name}.{f}"


def test_constants_match_c(tmp_path: Path) -> None:
    c = c_layout(tmp_path, SocketProbeConfig())["const"]
    for name, value in c.items():
        if name == "C_COUNTERS":
            assert value == len(se.COUNTER_NAMES)
        else:
            assert getattr(se, name) == value, name


def test_struct_formats_match_ctypes() -> None:
    structs = socket_layout.ctypes_structs(se.Layout())
    assert se.DATA_HEADER.size == structs["data_event_t"].payload.offset
    assert se.SUMMARY_HEADER.size == structs["summary_event_t"].ring.offset
    assert se.TAIL_SLOT_HEADER.size == structs["tail_slot_t"].data.offset
    assert se.CONN_EVENT.size == ctypes.sizeof(structs["conn_event_t"])
    assert se.PROC_EVENT.size == ctypes.sizeof(structs["proc_event_t"])


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_decode_round_trip(native: bool) -> None:
    layout = se.Layout()
    d = se.Decoder(layout, native=native)
    hdr = se.DATA_HEADER.pack(se.EV_DATA, se.DIR_OUT, 0, se.ROLE_SERVER, 42, 7, 123, 9, 3, 4000, 1,
                              layout.head_cap, 16, 2, 0)
    raw = hdr + b"h" * layout.head_cap + b"t" * 16
    ev = d.decode(raw)
    assert isinstance(ev, se.DataEvent)
    assert (ev.tgid, ev.conn_id, ev.seq, ev.len, ev.index, ev.lost) == (42, 7, 3, 4000, 1, 2)
    assert ev.head == b"h" * layout.head_cap and ev.tail == b"t" * 16
    assert ev.gap == 4000 - layout.head_cap - 16
    tail_only = se.DATA_HEADER.pack(se.EV_DATA, se.DIR_IN, se.DF_TAIL_ONLY, 1, 1, 1, 1, 1, 1, 9000, 5, 0, 4, 0, 0)
    ev2 = d.decode(tail_only + b"}END")
    assert isinstance(ev2, se.DataEvent) and ev2.head == b"" and ev2.tail == b"}END"
    with pytest.raises(se.DecodeError):
        d.decode(b"\x09junk")
    with pytest.raises(se.DecodeError):
        d.decode(hdr[:10])


def _conn(fd: int) -> bytes:
    return se.CONN_EVENT.pack(se.EV_CONN, se.ROLE_SERVER, 16, se.CS_ACCEPT, 42, 7, 123, fd, 3, b"\x02" * 28, 0)


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_a_batch_decodes_record_by_record_and_a_bad_one_loses_nothing_else(native: bool) -> None:
    d = se.Decoder(se.Layout(), native=native)
    data = se.DATA_HEADER.pack(se.EV_DATA, se.DIR_IN, 0, 1, 42, 7, 123, 9, 3, 5, 0, 5, 0, 0, 0) + b"hello"
    proc = se.PROC_EVENT.pack(se.EV_PROC, se.PK_EXEC, 0, 42, 42, 1, 5, b"vllm")
    records = [_conn(9), data, b"", b"\x09junk", data[:20], proc, _conn(10)]
    batch = se.pack(records)
    assert se.unpack(batch) == records
    evs = d.decode_batch(batch)
    assert len(evs) == len(records)
    # an empty, an unknown and a cut record are refused, each alone
    assert [type(e).__name__ for e in evs] == [
        "ConnEvent", "DataEvent", "DecodeError", "DecodeError", "DecodeError", "ProcEvent", "ConnEvent"]
    assert [getattr(e, "fd", None) for e in evs] == [9, 9, None, None, None, None, 10]
    data_ev = evs[1]
    assert isinstance(data_ev, se.DataEvent) and data_ev.head == b"hello"  # not the bytes after it
    # a batch cut inside its last record, or inside a record's size: the records before it decode
    for cut in (len(batch) - 3, len(batch) - len(records[-1]) - 2):
        evs = d.decode_batch(batch[:cut])
        assert len(evs) == len(records)
        assert isinstance(evs[-2], se.ProcEvent) and isinstance(evs[-1], se.DecodeError)
    assert d.decode_batch(b"") == []
    # a record's size past the batch's end
    assert [type(e).__name__ for e in d.decode_batch(se.BATCH_SIZE.pack(1000) + _conn(1))] == ["DecodeError"]


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_summary_ring_slots_decode_lazily_and_exactly(native: bool) -> None:
    layout = se.Layout()
    d = se.Decoder(layout, native=native)
    fields = [se.EV_SUMMARY, se.SR_CLOSE, 0, se.ROLE_SERVER, 42, 7, 999, 9, 3, 1, 2, 3, 4, 5, 100, 2000, 1, 60, 0, 3,
              *range(se.GAP_BUCKETS)]
    long_write = bytes(range(256)) * (layout.tail_cap // 256)  # ring_head bytes of the start, the rest of the end
    slots = [(1000, 20, 57, b"short write" + b"\0" * 9), (1001, 5000, 58, long_write), (1002, 5, 59, b"0\r\n\r\n")]
    raw = se.SUMMARY_HEADER.pack(*fields)
    for ts, ln, index, data in slots:  # packed: each slot's header, then the bytes it holds
        cap = min(ln, layout.tail_cap)
        raw += se.TAIL_SLOT_HEADER.pack(ts, ln, index, cap, 0) + data[:cap]
    ev = d.decode(raw)
    assert isinstance(ev, se.SummaryEvent)
    assert (ev.tgid, ev.conn_id, ev.seq, ev.writes, ev.gaps) == (42, 7, 3, 60, tuple(range(se.GAP_BUCKETS)))
    assert [(t.ts_ns, t.len, t.index) for t in ev.ring] == [(ts, ln, i) for ts, ln, i, _ in slots]
    assert ev.ring[0].head == b"short write" + b"\0" * 9 and ev.ring[0].tail == b""
    assert ev.ring[1].tail == long_write[layout.ring_head :] and ev.ring[1].head == long_write[: layout.ring_head]
    assert ev.ring[2] == se.TailSlot(1002, 5, 59, b"0\r\n\r\n", b"")
    assert ev.ring[1] == se.TailSlot(1001, 5000, 58, long_write[: layout.ring_head], long_write[layout.ring_head :])
    # a ring slot cut short (the last slot's bytes missing) keeps what is there
    cut = d.decode(raw[:-2])
    assert isinstance(cut, se.SummaryEvent) and cut.ring[2].head == b"0\r\n"
    with pytest.raises(se.DecodeError):  # a slot header missing
        d.decode(raw[: -5 - 10])


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_a_wrapped_ring_reads_out_in_write_order(native: bool) -> None:
    # the kernel packs slot 0 first; once the ring has wrapped, slot 0 holds a later write than
    # the last slot (here writes 4..9 in four slots: 8, 9, 6, 7)
    layout = se.Layout(tail_slots=4)
    d = se.Decoder(layout, native=native)
    fields = [se.EV_SUMMARY, se.SR_TERMINATED, 0, se.ROLE_SERVER, 42, 7, 999, 9, 3, 1, 2, 3, 4, 5, 100, 2000, 1, 10,
              0, 4, *[0] * se.GAP_BUCKETS]
    raw = se.SUMMARY_HEADER.pack(*fields)
    for index, data in [(8, b"eight"), (9, b"0\r\n\r\n"), (6, b"six!"), (7, b"seven, longer")]:
        raw += se.TAIL_SLOT_HEADER.pack(1000 + index, len(data), index, len(data), 0) + data
    ev = d.decode(raw)
    assert isinstance(ev, se.SummaryEvent)
    assert [(t.index, t.ts_ns, t.head) for t in ev.ring] == [
        (6, 1006, b"six!"), (7, 1007, b"seven, longer"), (8, 1008, b"eight"), (9, 1009, b"0\r\n\r\n")]
    assert ev.gaps == ()  # no gap counted: the buckets read as none


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_gap_buckets_read_up_to_the_last_counted_one(native: bool) -> None:
    d = se.Decoder(se.Layout(), native=native)
    buckets = [0, 4, 0, 7, 1] + [0] * (se.GAP_BUCKETS - 5)
    fields = [se.EV_SUMMARY, se.SR_TERMINATED, 0, se.ROLE_SERVER, 42, 7, 999, 9, 3, 1, 2, 3, 4, 5, 100, 2000, 1, 10,
              0, 0, *buckets]
    ev = d.decode(se.SUMMARY_HEADER.pack(*fields))
    assert isinstance(ev, se.SummaryEvent) and ev.gaps == (0, 4, 0, 7, 1)
    fields[-1] = 2  # the last bucket counted: all of them
    ev = d.decode(se.SUMMARY_HEADER.pack(*fields))
    assert isinstance(ev, se.SummaryEvent) and ev.gaps == (0, 4, 0, 7, 1, *[0] * (se.GAP_BUCKETS - 6), 2)


# --- data and summary records read in C (probes/_recread.c) against the Python reading ---


def test_the_c_record_reader_is_built_where_ci_runs() -> None:
    if IN_CI:
        assert se._recread is not None, "probes/_recread.c is not built: python -m agent.native build"
    if se._recread is not None:
        r = se._recread
        assert (r.DATA_HEADER_SIZE, r.SUMMARY_HEADER_SIZE, r.TAIL_SLOT_HEADER_SIZE) == (
            se.DATA_HEADER.size, se.SUMMARY_HEADER.size, se.TAIL_SLOT_HEADER.size)
        assert (r.DF_TAIL_ONLY, r.GAP_BUCKETS) == (se.DF_TAIL_ONLY, se.GAP_BUCKETS)
        assert se.Decoder().native and not se.Decoder(native=False).native


def _read(fn, *args):  # type: ignore[no-untyped-def]
    """What a reader returns, or that it refused the record (C: ValueError, Python: DecodeError)."""
    try:
        return fn(*args)
    except ValueError as e:
        return ("refused", str(e))


_U32 = st.integers(min_value=0, max_value=2**32 - 1)
_U64 = st.integers(min_value=0, max_value=2**64 - 1)
_SMALL = st.integers(min_value=0, max_value=600)


def _maybe_cut(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` whole, or (one time in four) cut anywhere."""
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.integers(0, 3)) == 3 else raw


@st.composite
def _data_records(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=1400))
    head_len = draw(st.one_of(st.integers(0, len(body)), _SMALL))
    tail_len = draw(st.one_of(st.just(0), st.integers(0, len(body)), _SMALL))
    hdr = se.DATA_HEADER.pack(se.EV_DATA, draw(st.integers(0, 255)), draw(st.sampled_from([0, se.DF_TAIL_ONLY, 3, 254])),
                              draw(st.integers(0, 255)), draw(_U32), draw(_U64), draw(_U64), draw(_U32), draw(_U32),
                              draw(_U32), draw(_U32), head_len, tail_len, draw(_U32), draw(_U32))
    return _maybe_cut(draw, hdr + body)


@st.composite
def _summary_records(draw: st.DrawFn) -> bytes:
    data = st.one_of(st.binary(max_size=128), st.binary(max_size=128), st.binary(max_size=600))
    slots = draw(st.lists(st.tuples(_U64, _U32, _U32, data), max_size=10))
    n = len(slots)
    ring_count = draw(st.one_of(st.just(n), st.just(n), st.just(n), st.integers(0, 12), _U32))
    fields = [se.EV_SUMMARY, *draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)), draw(_U32), draw(_U64),
              draw(_U64), draw(_U32), draw(_U32), *draw(st.lists(_U64, min_size=7, max_size=7)),
              *draw(st.lists(_U32, min_size=3, max_size=3)), ring_count,
              *draw(st.lists(_U32, min_size=se.GAP_BUCKETS, max_size=se.GAP_BUCKETS))]
    raw = se.SUMMARY_HEADER.pack(*fields)
    for ts, ln, index, data in slots:  # cap: the bytes that follow, or (rarely) any number
        cap = draw(st.one_of(*[st.just(len(data))] * 6, st.integers(0, 700), _U32))
        raw += se.TAIL_SLOT_HEADER.pack(ts, ln, index, cap, 0) + data
    return _maybe_cut(draw, raw)


_SUMMARY_FIELDS = ("reason", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq", "req_start_ns", "req_last_ns",
                   "resp_first_ns", "resp_last_ns", "eof_ns", "bytes_in", "bytes_out", "reads", "writes", "lost",
                   "gaps", "ring")


@st.composite
def _in_batch(draw: st.DrawFn, records: st.SearchStrategy[bytes]) -> tuple[bytes, bytes, int]:
    """A record, and a batch holding it at some offset with other bytes before and after it
    (which a reader must not take for the record's)."""
    raw = draw(records)
    before, after = draw(st.binary(max_size=24)), draw(st.binary(max_size=700))
    return raw, before + raw + after, len(before)


_DATA_FIELDS = ("dir", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq", "len", "index", "head", "tail", "lost")


def _fields(ev: object) -> object:
    """An event's fields (DecodeError: its message), to compare decoders by."""
    if isinstance(ev, se.DecodeError):
        return ("refused", str(ev))
    if isinstance(ev, se.DataEvent):
        return [getattr(ev, f) for f in _DATA_FIELDS]
    if isinstance(ev, se.SummaryEvent):
        return [getattr(ev, f) for f in _SUMMARY_FIELDS]
    return ev


def _reads_alike_in_a_batch(layout: se.Layout, raw: bytes, batch: bytes, off: int) -> None:
    """The C decoder reads the record inside the batch as the Python one reads it alone (or
    refuses it with the same message)."""
    c, py = se.Decoder(layout, native=True), se.Decoder(layout, native=False)
    try:
        want = py.decode(raw)
    except se.DecodeError as e:
        with pytest.raises(se.DecodeError, match=re.escape(str(e))):
            c.decode_at(batch, off, len(raw))
        return
    got = c.decode_at(batch, off, len(raw))
    assert type(got) is type(want) and _fields(got) == _fields(want)


@pytest.mark.skipif(se._recread is None, reason="probes/_recread.c not built (CI requires it)")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=_in_batch(_data_records()), head_cap=st.sampled_from([2048, 256, 0]))
def test_the_c_record_reader_reads_data_records_as_python_does(rec: tuple[bytes, bytes, int], head_cap: int) -> None:
    raw, batch, off = rec
    want = _read(se.data_fields, raw, 0, len(raw), head_cap)
    # in a batch, the same record reads the same, in C and in Python
    assert _read(se._recread.data_fields, batch, off, len(raw), head_cap) == want
    assert _read(se.data_fields, batch, off, len(raw), head_cap) == want
    _reads_alike_in_a_batch(se.Layout(head_cap=head_cap), raw, batch, off)


@pytest.mark.skipif(se._recread is None, reason="probes/_recread.c not built (CI requires it)")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=_in_batch(_summary_records()), layout=st.sampled_from([(8, 512, 192), (4, 128, 64), (0, 512, 192)]))
def test_the_c_record_reader_reads_summary_records_as_python_does(rec: tuple[bytes, bytes, int],
                                                                   layout: tuple[int, int, int]) -> None:
    raw, batch, off = rec
    assert _read(se._recread.summary_fields, batch, off, len(raw), *layout) == \
        _read(se.summary_fields, batch, off, len(raw), *layout)
    lay = se.Layout(tail_slots=layout[0], tail_cap=layout[1], ring_head=layout[2])
    _reads_alike_in_a_batch(lay, raw, batch, off)


@st.composite
def _batches(draw: st.DrawFn) -> bytes:
    records = draw(st.lists(st.one_of(_data_records(), _summary_records(), st.just(_conn(5)),
                                      st.just(b""), st.binary(max_size=40)), max_size=8))
    batch = se.pack(records)
    return batch[: draw(st.integers(0, len(batch)))] if draw(st.integers(0, 4)) == 4 else batch


@pytest.mark.skipif(se._recread is None, reason="probes/_recread.c not built (CI requires it)")
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_batches(), layout=st.sampled_from([(2048, 8, 512, 192), (256, 4, 128, 64)]))
def test_the_c_batch_reader_reads_a_batch_as_python_does(batch: bytes, layout: tuple[int, int, int, int]) -> None:
    for off, count in ((0, 1 << 20), (0, 1), (0, 3), (5, 2), (len(batch) + 1, 4)):  # any start and count
        want = se.read_batch(batch, off, count, *layout)
        assert se._recread.read_batch(batch, off, count, *layout) == want
        assert len(want[0]) <= count and want[1] >= min(off, len(batch))
    lay = se.Layout(head_cap=layout[0], tail_slots=layout[1], tail_cap=layout[2], ring_head=layout[3])
    c, py = se.Decoder(lay, native=True), se.Decoder(lay, native=False)
    got = c.decode_batch(batch)
    assert [_fields(e) for e in got] == [_fields(e) for e in py.decode_batch(batch)]
    # and record by record, each on its own, as the batch reads it
    records = se.unpack(batch)
    assert len(got) == len(records) + (0 < len(batch) - sum(4 + len(r) for r in records) < 4)
    for raw, ev in zip(records, got, strict=False):
        try:
            alone = py.decode(raw)
        except se.DecodeError as e:
            alone = e
        if not (isinstance(ev, se.DecodeError) and str(ev) == "record past its batch's end"):  # a cut last one
            assert _fields(alone) == _fields(ev)


def test_a_ring_count_past_the_record_is_refused_before_any_slot_is_read() -> None:
    if se._recread is None:
        pytest.skip("probes/_recread.c not built (CI requires it)")
    fields = [se.EV_SUMMARY, se.SR_CLOSE, 0, se.ROLE_SERVER, 42, 7, 999, 9, 3, 1, 2, 3, 4, 5, 100, 2000, 1, 60, 0,
              0xFFFFFFFF, *[0] * se.GAP_BUCKETS]
    raw = se.SUMMARY_HEADER.pack(*fields) + se.TAIL_SLOT_HEADER.pack(1, 2, 3, 0, 0)
    # a layout allowing any number of slots: the record holds one slot header, not four billion
    with pytest.raises(se.DecodeError) as py:
        se.summary_fields(raw, 0, len(raw), 1 << 40, 512, 192)
    with pytest.raises(ValueError, match=re.escape(str(py.value))):
        se._recread.summary_fields(raw, 0, len(raw), 1 << 40, 512, 192)


def test_the_c_record_reader_rejects_wrong_arguments() -> None:
    if se._recread is None:
        pytest.skip("probes/_recread.c not built (CI requires it)")
    with pytest.raises(TypeError):
        se._recread.data_fields("not bytes", 0, 9, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        se._recread.summary_fields(b"", 0, 0, 1, 2)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        se._recread.data_fields(b"x" * 100, 0, 100, -1)
    with pytest.raises(ValueError, match="past its batch's end"):  # a record that is not all in the batch
        se._recread.data_fields(b"x" * 100, 50, 51, 10)
    with pytest.raises(ValueError, match="past its batch's end"):
        se._recread.summary_fields(b"x" * 300, 301, 0, 8, 512, 192)
