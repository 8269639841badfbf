"""Event layouts of probes/sockets.bpf.c, and their decoding.

Each C struct in ``probes/sockets.h`` has a ctypes twin in
``probes/socket_layout.py``; a test checks sizes and offsets against the
compiled program. Decoding uses precompiled ``struct.Struct`` formats (faster
than ctypes on the hot path) whose offsets the same test checks against the
ctypes definitions. This module is on the per-record path and is compiled
with mypyc (``agent.native``), which is why the ctypes twins, classes defined
inside a function, live in a module of their own.

Nothing here imports BCC: decoding is a pure function of bytes, testable
without root.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

try:  # data and summary records read in C (probes/_recread.c); data_fields/summary_fields: its reference
    from probes import _recread
except ImportError:  # not built: the Python reading below
    _recread = None  # type: ignore[assignment]

# Constants mirrored from sockets.h (checked by tests/test_socket_events.py).
EV_DATA: Final = 1
EV_SUMMARY: Final = 2
EV_CONN: Final = 3
EV_PROC: Final = 4
EV_H2: Final = 5

DIR_IN: Final = 0
DIR_OUT: Final = 1
ROLE_SERVER: Final = 1
ROLE_CLIENT: Final = 2

DF_TAIL_ONLY: Final = 1
DF_NO_PAYLOAD: Final = 2
DF_VECTORED: Final = 4

SR_TERMINATED: Final = 1
SR_NEXT_REQUEST: Final = 2
SR_CLOSE: Final = 3

CF_PEER_EOF: Final = 1
CF_WRITE_ERR: Final = 2
CF_READ_ERR: Final = 4
CF_TERMINATED: Final = 8
CF_FOREIGN: Final = 16
CF_LATE_OUTPUT: Final = 32
CF_ZERO_CHUNK: Final = 64  # the last write ended with the last chunk's "0\r\n" line

CS_ACCEPT: Final = 0
CS_CONNECT: Final = 1
CS_PEERNAME: Final = 2
CS_SOCKNAME: Final = 3

PK_EXEC: Final = 1
PK_FORK: Final = 2
PK_EXIT: Final = 3
PK_LISTEN: Final = 4
PK_TLS: Final = 5

H2K_FRAME: Final = 1
H2K_MORE: Final = 2
H2K_RAW: Final = 3
H2_PREFACE_TYPE: Final = 0xFF  # an H2K_FRAME record holding the client preface's 24 bytes

H2F_JOINED: Final = 1
H2F_AGG: Final = 2
H2F_AGG_MISSING: Final = 4

COUNTER_NAMES = (
    "requests",
    "foreign",
    "lost_data",
    "lost_summary",
    "lost_conn",
    "lost_proc",
    "conns",
    "conn_full",
    "truncated",
    "unreported",
    "closed",
    "tls_unmapped",
    "h2_conns",
    "h2_frames",
    "h2_elided",
    "h2_desync",
    "lost_h2",
    "h2_stream_full",
    "replaced",
    "tails_reclaimed",
    "iov_end_unread",
)
GAP_BUCKETS: Final = 32


@dataclass(frozen=True)
class Layout:
    """Capture sizes compiled into the probe (cflags -D...)."""

    head_cap: int = 2048
    tail_cap: int = 1024
    tail_slots: int = 8
    ring_head: int = 192
    h2_cap: int = 1024


# struct formats for the fixed-size headers; offsets checked against ctypes in tests
DATA_HEADER = struct.Struct("<BBBBIQQIIIIIIII")
SUMMARY_HEADER = struct.Struct("<BBBBIQQIIQQQQQQQIIII32I")
TAIL_SLOT_HEADER = struct.Struct("<QIIII")
#: one ring slot in :func:`summary_fields`' answer: ts_ns, len, index, and where its bytes lie
#: in the record (start, stop, split)
SLOT_FIELDS = struct.Struct("<Q5q")
CONN_EVENT = struct.Struct("<BBBBIQQIi28sI")
PROC_EVENT = struct.Struct("<BBHIIIQ16s")
H2_HEADER = struct.Struct("<BBBBIQQIIIIBBBBI")
H2_AGG = struct.Struct("<QQQIIII")
#: records read from a batch at a time: their objects, made at once, are still in cache when
#: assembly takes them (made for a whole batch, hundreds of records, they are not)
READ_AHEAD: Final = 32
#: a record's size, before its bytes in a batch (:func:`pack`)
BATCH_SIZE = struct.Struct("<I")


class DataEvent:
    """One captured syscall: ``head`` is the data's start, ``tail`` its end
    (empty when ``head`` holds all of it); ``len - len(head) - len(tail)``
    bytes in the middle were not captured."""

    __slots__ = (
        "conn_id",
        "dir",
        "fd",
        "flags",
        "head",
        "index",
        "len",
        "lost",
        "role",
        "seq",
        "tail",
        "tgid",
        "ts_ns",
    )

    def __init__(
        self,
        dir: int,
        flags: int,
        role: int,
        tgid: int,
        conn_id: int,
        ts_ns: int,
        fd: int,
        seq: int,
        len: int,
        index: int,
        head: bytes,
        tail: bytes,
        lost: int,
    ) -> None:
        self.dir = dir
        self.flags = flags
        self.role = role
        self.tgid = tgid
        self.conn_id = conn_id
        self.ts_ns = ts_ns
        self.fd = fd
        self.seq = seq
        self.len = len
        self.index = index
        self.head = head
        self.tail = tail
        self.lost = lost

    @property
    def gap(self) -> int:
        """Bytes of the syscall that were not captured."""
        return max(0, self.len - len(self.head) - len(self.tail))

    def __repr__(self) -> str:
        return (
            f"DataEvent(dir={self.dir}, conn={self.conn_id}, seq={self.seq}, idx={self.index}, "
            f"len={self.len}, head={len(self.head)}, tail={len(self.tail)}, lost={self.lost})"
        )


class TailSlot:
    """One of the last writes of a long response. For a write of at most
    ``tail_cap`` bytes ``head`` is all of it and ``tail`` is empty; for a longer
    one ``head`` is its first ``ring_head`` bytes and ``tail`` its last bytes.

    A plain slotted class, like :class:`DataEvent`: a summary carries up to
    ``tail_slots`` of these per streamed response, and a frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field) cost more than the rest
    of the summary's decoding. The decoder makes them with :meth:`in_record`:
    the bytes stay in the record until ``head`` or ``tail`` is read, since
    assembly reads only the last few writes of a ring."""

    __slots__ = ("_head", "_raw", "_split", "_start", "_stop", "_tail", "index", "len", "ts_ns")

    def __init__(self, ts_ns: int, len: int, index: int, head: bytes, tail: bytes) -> None:
        self.ts_ns = ts_ns
        self.len = len
        self.index = index
        self._head = head
        self._tail = tail
        self._raw: bytes | None = None
        self._start = self._stop = 0
        self._split = -1

    @staticmethod
    def in_record(ts_ns: int, len: int, index: int, raw: bytes, start: int, stop: int, split: int) -> TailSlot:
        """A slot whose bytes are ``raw[start:stop]``, cut at ``start + split`` into head and
        tail unless ``split`` is -1; they are copied out when first read."""
        t = TailSlot(ts_ns, len, index, b"", b"")
        t._raw = raw
        t._start = start
        t._stop = stop
        t._split = split
        return t

    def _copy_out(self, raw: bytes) -> None:
        data = raw[self._start : self._stop]
        if self._split >= 0:
            self._head = data[: self._split]
            self._tail = data[self._split :]
        else:
            self._head = data
        self._raw = None

    @property
    def head(self) -> bytes:
        raw = self._raw
        if raw is not None:
            self._copy_out(raw)
        return self._head

    @property
    def tail(self) -> bytes:
        raw = self._raw
        if raw is not None:
            self._copy_out(raw)
        return self._tail

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TailSlot):
            return NotImplemented
        return (self.ts_ns, self.len, self.index, self.head, self.tail) == (
            other.ts_ns, other.len, other.index, other.head, other.tail
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TailSlot(index={self.index}, len={self.len}, head={len(self.head)}, tail={len(self.tail)})"


class SummaryEvent:
    """The end of one request phase of a connection: the kernel's timings and
    counts, and the tail ring (see ``summary_event_t`` in ``probes/sockets.h``).
    ``gaps`` holds the gap buckets up to the last one counted (``()`` when none is).
    A plain slotted class for the reason given at :class:`TailSlot`.

    A decoded summary keeps the bytes its record lies in (``raw``: the record, or the batch
    holding it) and its ring's slots as :func:`summary_fields` reads them (``slots``,
    :data:`SLOT_FIELDS` each, their offsets into ``raw``): its ``ring`` is made from them when
    first read, and a C reader of the ring (``agent/_llmjson.c``
    ``ring_walk``) walks the slots without it."""

    __slots__ = (
        "_ring",
        "bytes_in",
        "bytes_out",
        "conn_id",
        "eof_ns",
        "fd",
        "flags",
        "gaps",
        "lost",
        "raw",
        "reads",
        "reason",
        "req_last_ns",
        "req_start_ns",
        "resp_first_ns",
        "resp_last_ns",
        "role",
        "seq",
        "slots",
        "tgid",
        "ts_ns",
        "writes",
    )

    def __init__(
        self,
        *,
        reason: int,
        flags: int,
        role: int,
        tgid: int,
        conn_id: int,
        ts_ns: int,
        fd: int,
        seq: int,
        req_start_ns: int,
        req_last_ns: int,
        resp_first_ns: int,
        resp_last_ns: int,
        eof_ns: int,
        bytes_in: int,
        bytes_out: int,
        reads: int,
        writes: int,
        lost: int,
        gaps: tuple[int, ...],
        ring: tuple[TailSlot, ...] | None = None,
        raw: bytes = b"",
        slots: bytes = b"",
    ) -> None:
        self.reason = reason
        self.flags = flags
        self.role = role
        self.tgid = tgid
        self.conn_id = conn_id
        self.ts_ns = ts_ns
        self.fd = fd
        self.seq = seq
        self.req_start_ns = req_start_ns
        self.req_last_ns = req_last_ns
        self.resp_first_ns = resp_first_ns
        self.resp_last_ns = resp_last_ns
        self.eof_ns = eof_ns
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.reads = reads
        self.writes = writes
        self.lost = lost
        self.gaps = gaps
        self._ring = ring
        self.raw = raw
        self.slots = slots

    @property
    def ring(self) -> tuple[TailSlot, ...]:
        """The tail ring's slots, in write order (see ``summary_event_t``)."""
        ring = self._ring
        if ring is None:
            raw = self.raw
            ring = self._ring = tuple([
                TailSlot.in_record(ts, ln, index, raw, start, stop, split)
                for ts, ln, index, start, stop, split in SLOT_FIELDS.iter_unpack(self.slots)
            ])
        return ring

    def __repr__(self) -> str:
        return (
            f"SummaryEvent(reason={self.reason}, conn={self.conn_id}, seq={self.seq}, "
            f"writes={self.writes}, ring={len(self.ring)}, lost={self.lost})"
        )


@dataclass(frozen=True, slots=True)
class ConnEvent:
    source: int  # CS_*
    role: int
    tgid: int
    conn_id: int
    ts_ns: int
    fd: int
    listen_fd: int
    addr: bytes


@dataclass(frozen=True, slots=True)
class ProcEvent:
    kind: int
    tgid: int
    pid: int
    ppid: int
    ts_ns: int
    comm: str


# H2Agg and H2Event are plain (not frozen) dataclasses: several are decoded per gRPC call,
# and a frozen dataclass's __init__ costs more than the decoding. Nothing assigns to them.
@dataclass(slots=True)
class H2Agg:
    """A stream's DATA totals in one direction, aggregated in the kernel."""

    first_ns: int  # first DATA byte (0: none)
    last_ns: int  # start of the latest gRPC message (0: none)
    bytes: int  # DATA payload bytes, padding included
    frames: int  # DATA frames
    msgs: int  # gRPC messages started
    lost: bool  # gRPC message framing lost in the kernel


@dataclass(slots=True)
class H2Event:
    """One record of an h2-mode connection (see ``probes/sockets.h``).

    ``kind`` H2K_FRAME: a frame header (``ftype``, ``fflags``, ``sid``,
    ``flen``) and the first ``len(payload)`` bytes of its payload; the rest of
    the captured part may follow in H2K_MORE records (in total at most
    ``min(flen, h2_cap)`` bytes are ever captured). H2K_RAW: a direction whose
    frame walk lost sync; ``payload`` is the syscall's first bytes and ``flen``
    its length. ``agg`` (indexed by DIR_IN / DIR_OUT) is set with H2F_AGG.
    """

    dir: int
    kind: int
    role: int
    tgid: int
    conn_id: int
    ts_ns: int
    fd: int
    sid: int
    flen: int
    ftype: int
    fflags: int
    hflags: int
    lost: int
    agg: tuple[H2Agg, H2Agg] | None
    payload: bytes = field(repr=False)


Event = DataEvent | SummaryEvent | ConnEvent | ProcEvent | H2Event


class DecodeError(ValueError):
    """A ring buffer record that does not match any layout."""


#: a data record's fields, in the order of :class:`DataEvent`'s arguments
DataFields = tuple[int, int, int, int, int, int, int, int, int, int, bytes, bytes, int]


def pack(records: Iterable[bytes]) -> bytes:
    """Records as one batch, the form the probe's drain hands them on in: each record's size
    as a little-endian u32, then its bytes (``probes/_ringdrain.c`` builds the same)."""
    return b"".join([b for r in records for b in (BATCH_SIZE.pack(len(r)), r)])


def unpack(batch: bytes) -> list[bytes]:
    """A batch's records, each as its own bytes (a cut last record: what the batch holds of it)."""
    out = []
    off = 0
    while off + BATCH_SIZE.size <= len(batch):
        (size,) = BATCH_SIZE.unpack_from(batch, off)
        off += BATCH_SIZE.size
        out.append(batch[off : off + size])
        off += size
    return out


def data_fields(buf: bytes, off: int, size: int, head_cap: int) -> DataFields:
    """The fields of the data record ``buf[off:off + size]``: the reference of
    ``probes/_recread.c``'s ``data_fields``."""
    if size < DATA_HEADER.size:
        raise DecodeError(f"short record of type {EV_DATA}: {size} bytes")
    (_, d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head_len, tail_len, lost, _) = (
        DATA_HEADER.unpack_from(buf, off)
    )
    end = off + size
    base = off + DATA_HEADER.size
    if flags & DF_TAIL_ONLY:
        head = b""
        tail = buf[base : min(base + tail_len, end)]
    else:
        if base + head_len > end:
            raise DecodeError("data record shorter than its head_len")
        head = buf[base : base + head_len]
        at = min(base + head_cap, end)
        tail = buf[at : min(at + tail_len, end)] if tail_len else b""
    return (d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head, tail, lost)


def summary_fields(buf: bytes, off: int, size: int, tail_slots: int, tail_cap: int,
                   ring_head: int) -> tuple[Any, ...]:
    """The summary record ``buf[off:off + size]``: its header fields as ``SUMMARY_HEADER``
    unpacks them (20 ints), its gap buckets up to the last non-zero one (one tuple), then the
    ring slots read as one bytes object, :data:`SLOT_FIELDS` each (``ts_ns, len, index``, and
    where the slot's bytes lie in ``buf``: ``start, stop, split``, ``stop`` at most the
    record's end): the reference of ``probes/_recread.c``'s ``summary_fields``.

    The ring's slots are packed: each slot's header, then the ``cap`` bytes it holds. The
    kernel packs them in ring order, which a ring that has wrapped rotates; they are read out
    in write order (by index; equal indices in packed order)."""
    end = off + size
    short = DecodeError(f"short record of type {EV_SUMMARY}: {size} bytes")
    if size < SUMMARY_HEADER.size:
        raise short
    f = SUMMARY_HEADER.unpack_from(buf, off)
    slots = []
    at = off + SUMMARY_HEADER.size
    for _ in range(min(f[19], tail_slots)):
        if end - at < TAIL_SLOT_HEADER.size:
            raise short
        ts, ln, index, cap, _ = TAIL_SLOT_HEADER.unpack_from(buf, at)
        start = at + TAIL_SLOT_HEADER.size
        at = start + min(cap, tail_cap)
        slots.append((ts, ln, index, start, min(at, end), ring_head if ln > tail_cap else -1))
    slots.sort(key=lambda s: s[2])
    gaps = f[20:]
    used = len(gaps)
    while used and not gaps[used - 1]:
        used -= 1
    return (*f[:20], gaps[:used], b"".join(SLOT_FIELDS.pack(*slot) for slot in slots))


def read_batch(batch: bytes, off: int, count: int, head_cap: int, tail_slots: int, tail_cap: int,
               ring_head: int) -> tuple[list[Any], int]:
    """Up to ``count`` records of a batch (:func:`pack`) from its offset ``off``, record by
    record: :func:`data_fields`' tuple for a data record, :func:`summary_fields`' for a
    summary, ``(kind, off, size)`` for any other record, and for a record refused the message
    of the DecodeError refusing it (a str); and the offset after them: the reference of
    ``probes/_recread.c``'s ``read_batch``."""
    out: list[Any] = []
    end = len(batch)
    off = min(off, end)
    while len(out) < count and off < end:
        if end - off < BATCH_SIZE.size:
            out.append("a record's size cut short")
            off = end
            break
        (size,) = BATCH_SIZE.unpack_from(batch, off)
        off += BATCH_SIZE.size
        if size == 0:
            out.append("empty record")
        elif size > end - off:
            out.append("record past its batch's end")
        else:
            kind = batch[off]
            try:
                if kind == EV_DATA:
                    out.append(data_fields(batch, off, size, head_cap))
                elif kind == EV_SUMMARY:
                    out.append(summary_fields(batch, off, size, tail_slots, tail_cap, ring_head))
                else:
                    out.append((kind, off, size))
            except DecodeError as e:
                out.append(str(e))
        off = min(off + size, end)
    return out, off


class Decoder:
    """Turns raw ring buffer records into events, for one capture layout.

    ``native``: read data and summary records with ``probes/_recread.c`` where it is built
    (False: always with :func:`data_fields` and :func:`summary_fields`)."""

    def __init__(self, layout: Layout = Layout(), native: bool = True) -> None:
        self.layout = layout
        self.native = native and _recread is not None
        # bound once: compiled code would look a module's attribute up on every call
        self._read_data: Callable[[bytes, int, int, int], DataFields] = (
            _recread.data_fields if self.native else data_fields
        )
        self._read_summary: Callable[[bytes, int, int, int, int, int], tuple[Any, ...]] = (
            _recread.summary_fields if self.native else summary_fields
        )
        self._read_batch: Callable[[bytes, int, int, int, int, int, int], tuple[list[Any], int]] = (
            _recread.read_batch if self.native else read_batch
        )
        self._head_cap = layout.head_cap
        # a summary holds the ring's slots, and the first write past the samples (probes/sockets.h)
        self._summary_slots = layout.tail_slots + 1
        self._tail_cap = layout.tail_cap
        self._ring_head = layout.ring_head

    def decode(self, raw: bytes) -> Event:
        """Decode one record. Raises DecodeError for a short or unknown record."""
        return self.decode_at(raw, 0, len(raw))

    def decode_batch(self, batch: bytes) -> list[Event | DecodeError]:
        """A batch's records (:func:`pack`), in order: each decoded, or the DecodeError that
        refused it (a cut last record included)."""
        out: list[Event | DecodeError] = []
        off = 0
        while off < len(batch):
            evs, off = self.decode_some(batch, off)
            out.extend(evs)
        return out

    def decode_some(self, batch: bytes, off: int) -> tuple[list[Event | DecodeError], int]:
        """The next few records of a batch from its offset ``off`` (at most :data:`READ_AHEAD`),
        each decoded or the DecodeError that refused it, and the offset after them."""
        out: list[Event | DecodeError] = []
        fields, off = self._read_batch(batch, off, READ_AHEAD, self._head_cap, self._summary_slots, self._tail_cap,
                                       self._ring_head)
        for f in fields:
            if isinstance(f, str):
                out.append(DecodeError(f))
                continue
            n = len(f)
            if n == 13:  # data_fields': unpacked as that tuple type (compiled, an Any's unpacking iterates)
                (d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head, tail, lost) = cast(DataFields, f)
                out.append(DataEvent(d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head, tail, lost))
            elif n == 22:  # summary_fields'
                out.append(self._summary_event(f, batch))
            else:
                try:
                    out.append(self.decode_at(batch, f[1], f[2]))
                except DecodeError as e:
                    out.append(e)
        return out, off

    def decode_at(self, buf: bytes, off: int, size: int) -> Event:
        """Decode the record ``buf[off:off + size]`` (one of a batch's: :func:`pack`). Raises
        DecodeError for a short or unknown record. A summary's event keeps ``buf``."""
        if size <= 0 or off + size > len(buf):
            raise DecodeError("empty record" if size <= 0 else "record past its batch's end")
        kind = buf[off]
        if kind == EV_DATA:
            return self._data(buf, off, size)
        if kind == EV_SUMMARY:
            return self._summary(buf, off, size)
        if kind == EV_CONN:
            if size < CONN_EVENT.size:
                raise DecodeError(f"short record of type {kind}: {size} bytes")
            (_, role, addr_len, source, tgid, conn_id, ts, fd, listen_fd, addr, _) = CONN_EVENT.unpack_from(buf, off)
            return ConnEvent(source, role, tgid, conn_id, ts, fd, listen_fd, addr[:addr_len])
        if kind == EV_H2:
            return self._h2(buf, off, size)
        if kind == EV_PROC:
            if size < PROC_EVENT.size:
                raise DecodeError(f"short record of type {kind}: {size} bytes")
            (_, pk, _, tgid, pid, ppid, ts, comm) = PROC_EVENT.unpack_from(buf, off)
            return ProcEvent(pk, tgid, pid, ppid, ts, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))
        raise DecodeError(f"unknown record type {kind}")

    def _data(self, buf: bytes, off: int, size: int) -> DataEvent:
        try:
            f = self._read_data(buf, off, size, self._head_cap)
        except ValueError as e:  # the C reader's refusal, or the Python one's DecodeError
            raise DecodeError(str(e)) from None
        (d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head, tail, lost) = f
        return DataEvent(d, flags, role, tgid, conn_id, ts, fd, seq, ln, index, head, tail, lost)

    def _h2(self, buf: bytes, off: int, size: int) -> H2Event:
        base = H2_HEADER.size + 2 * H2_AGG.size
        if size < base:
            raise DecodeError(f"short record of type {EV_H2}: {size} bytes")
        (_, d, kind, role, tgid, conn_id, ts, fd, sid, flen, cap, ftype, fflags, hflags, _, lost) = (
            H2_HEADER.unpack_from(buf, off)
        )
        agg = None
        if hflags & H2F_AGG:
            a_in = H2_AGG.unpack_from(buf, off + H2_HEADER.size)
            a_out = H2_AGG.unpack_from(buf, off + H2_HEADER.size + H2_AGG.size)
            agg = (
                H2Agg(a_in[0], a_in[1], a_in[2], a_in[3], a_in[4], bool(a_in[5])),
                H2Agg(a_out[0], a_out[1], a_out[2], a_out[3], a_out[4], bool(a_out[5])),
            )
        if cap > self.layout.h2_cap or size < base + cap:
            raise DecodeError("h2 record shorter than its cap")
        payload = buf[off + base : off + base + cap]
        return H2Event(d, kind, role, tgid, conn_id, ts, fd, sid, flen, ftype, fflags, hflags, lost, agg, payload)

    def _summary(self, buf: bytes, off: int, size: int) -> SummaryEvent:
        try:
            f = self._read_summary(buf, off, size, self._summary_slots, self._tail_cap, self._ring_head)
        except ValueError as e:
            raise DecodeError(str(e)) from None
        return self._summary_event(f, buf)

    @staticmethod
    def _summary_event(f: tuple[Any, ...], buf: bytes) -> SummaryEvent:
        gaps: tuple[int, ...] = f[20]
        # all slots are read, in write order; the valid ones are those of this phase's last
        # writes. They stay in the fields, their bytes in the batch, until read
        return SummaryEvent(
            reason=f[1],
            flags=f[2],
            role=f[3],
            tgid=f[4],
            conn_id=f[5],
            ts_ns=f[6],
            fd=f[7],
            seq=f[8],
            req_start_ns=f[9],
            req_last_ns=f[10],
            resp_first_ns=f[11],
            resp_last_ns=f[12],
            eof_ns=f[13],
            bytes_in=f[14],
            bytes_out=f[15],
            reads=f[16],
            writes=f[17],
            lost=f[18],
            gaps=gaps,
            raw=buf,
            slots=f[21],
        )
