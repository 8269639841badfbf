"""The socket probe's HTTP/2 records, back into stream records and requests.

On a connection in *h2 mode* the kernel (``probes/sockets.bpf.c``) cuts each
syscall's bytes into HTTP/2 frames and sends user space only the frames a
record needs, as ``EV_H2`` records (:class:`probes.socket_events.H2Event`,
layout in ``probes/sockets.h``); every other frame is aggregated in the kernel
and never sent. :class:`H2Tracker` turns those records back into the byte
stream :class:`agent.http2.H2Connection` parses, one connection each::

    tracker = H2Tracker()
    for ev in h2_events:                        # in ring buffer order
        for stream in tracker.feed(ev):         # streams this record completed
            rec = stream_request(stream, pid=..., ..., to_unix_ns=clock.to_unix_ns)
    tracker.close(conn_id, ts_ns)               # the connection closed

Records to bytes, per direction (DIR_IN: what the traced process read; the
client's direction is DIR_IN for ROLE_SERVER, DIR_OUT for ROLE_CLIENT):

- ``H2K_FRAME``: a 9-byte frame header is rebuilt from (``flen``, ``ftype``,
  ``fflags``, ``sid``) and fed with the captured payload. At most
  ``min(flen, h2_cap)`` payload bytes are captured; when the record holds
  fewer, the rest of the captured part follows in ``H2K_MORE`` records, fed as
  they come (each with its own time, as the syscall that carried it). Once the
  captured part is in, the uncaptured rest of the payload is fed as a gap
  (:meth:`H2Connection.feed_gap`: a gap inside a frame keeps framing). A later
  DATA frame with END_STREAM comes with its header only; it is recognised as
  a DATA frame of a stream whose DATA was already seen in that direction,
  and its whole payload is a gap. A captured part that never arrives in full
  (the next FRAME or RAW record of the direction comes first) is counted
  (``infersight.parse.failures{reason="h2_capture_short"}``) and its rest fed
  as a gap; a MORE record with no frame waiting for it is dropped
  (``reason="h2_more_orphan"``, its bytes in
  ``infersight.parse.skipped.bytes{reason="h2_more_orphan"}``).
- The preface never arrives (the kernel consumes it), so every connection
  starts with a synthetic preface on the client side and ``from_start`` on
  the server side: the kernel's frame boundaries are trusted, no resync is
  needed. ``H2F_JOINED`` (h2 mode entered mid-connection) changes nothing
  here: frames still start at frame boundaries, and the HPACK tables of the
  connection's past are unknown, which :class:`H2Connection` already handles
  (a block that needs them fails, counted as ``reason="hpack"``; nothing is
  guessed).
- ``H2K_RAW``: the kernel lost its frame walk for that direction; the record
  holds the first bytes of what followed (``flen`` of them moved). The first
  RAW record of a direction makes the connection :meth:`~H2Connection.lose`
  that direction's framing (``infersight.parse.resyncs{reason="h2_desync"}``);
  its bytes and a gap for the rest are then fed, and the parser's own resync
  finds frames in them. A FRAME record after RAW ones (a kernel that found its
  walk again) begins a frame: the parser is told so, with the same losses.
- ``lost`` on a record: that many records of the connection were refused by
  the ring buffer before it. Which ones is unknown: a HEADERS block (the HPACK
  table falls behind the encoder's), a first DATA frame (a model name, message
  framing), a MORE record, the record that ended a stream. The kernel's frame
  walk is not affected, so framing holds: the next record still begins a
  frame (or continues one, if only MORE records were lost). So both directions
  :meth:`~H2Connection.lose` their state *without* a resync: a frame still
  waiting for MORE records is closed with a gap (a MORE that follows is then
  an orphan), the HPACK tables are replaced by empty ones, a header block in
  progress is lost and the gRPC message framing of every open stream is
  marked lost (kernel totals, when they come, replace it). Counted as
  ``infersight.parse.failures{reason="h2_records_lost"}``, by the number of
  records. A stream whose ending record was lost stays open until the
  connection closes, a GOAWAY excludes it or it is evicted.

Kernel totals: the kernel aggregates every DATA frame of a stream (it sees
them all; user space sees one per direction), and sends the totals on the
record that ends the stream (``H2F_AGG``, ``agg`` indexed by DIR_IN /
DIR_OUT). They replace the record's ``request_messages``,
``response_messages`` (messages *started*: a stream reset inside a message
counts it), ``request_bytes``, ``response_bytes`` (padding included, unlike
the parser's), ``first_message_ns`` (the server direction's first DATA frame,
stamped by the syscall that carried its header), ``last_message_ns`` (its
latest message start) and ``messages_lost`` (the kernel's own loss of message
framing). Totals ride on a frame; they are applied when the parser completes
the stream, which may be at a later record (a header block continued in
CONTINUATION frames, a payload continued in MORE records), and dropped when
the next frame of that direction other than a CONTINUATION begins without
the stream completing (counted as ``reason="h2_totals_unmatched"``: a stream
the parser had already ended, say by GOAWAY).

- ``H2F_AGG_MISSING`` (the stream's kernel entry was gone) keeps the parser's
  counts and marks ``messages_lost``, counted as ``reason="h2_totals_missing"``
  when it reaches an open stream (a RST_STREAM after the stream ended carries
  it too; that one is dropped silently).
- Totals of part of a stream are treated the same way
  (``reason="h2_totals_partial"``): after a DATA frame forwarded whole for a
  stream whose DATA was already seen in that direction (the kernel's entry was
  evicted and made afresh, or the stream table was full), or when they hold
  fewer bytes than the forwarded frames alone (an ending HEADERS that found no
  entry and made an empty one).
- A stream that ends without totals (by GOAWAY, close or eviction, or its
  ending record lost) keeps the parser's counts; if one of its DATA frames was
  forwarded, later ones may have stayed in the kernel, so they are marked
  ``messages_lost``. (The first DATA frame of a direction is always forwarded
  and RAW records carry every frame, so without a forwarded one nothing was
  kept.)

Connections live in a bounded LRU (``max_conns``). An evicted connection is
closed at its last record's time, its open streams completed with
``end_reason="close"``, and counted as
``infersight.parse.h2.connections.evicted``; its streams go to ``on_evict``
(or, without one, are counted as ``infersight.requests.lost{reason="h2_evicted"}``).
Records that cannot be read (an unknown kind or direction, a frame length
beyond 24 bits) are counted as ``reason="h2_bad_record"`` and dropped.

:func:`stream_request` maps one :class:`H2Stream` to the pipeline's
:class:`~agent.record.Request` (see its docstring). It never copies message
bytes into the record; only the model name is read from them.

Threading: an :class:`H2Tracker` belongs to one thread (the one that drains
the ring buffer). ``on_evict`` is called from :meth:`H2Tracker.feed`, on that
thread; what it raises propagates. No method raises on any record.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

from agent import kserve
from agent.http2 import PREFACE, Direction, H2Config, H2Connection, H2Stream, HpackDecoders
from agent.record import Request, SpanIds
from agent.selfmetrics import SELF_METRICS, SelfMetrics
from probes.socket_events import (
    DIR_IN,
    DIR_OUT,
    H2F_AGG,
    H2F_AGG_MISSING,
    H2K_FRAME,
    H2K_MORE,
    H2K_RAW,
    ROLE_CLIENT,
    H2Agg,
    H2Event,
    Layout,
)

__all__ = [
    "GRPC_SERVER_ERRORS",
    "GRPC_STATUS_NAMES",
    "H2Tracker",
    "stream_request",
]

_FAILURES = "infersight.parse.failures"
_SKIPPED = "infersight.parse.skipped.bytes"
_EVICTED = "infersight.parse.h2.connections.evicted"
_LOST = "infersight.requests.lost"

_DATA, _CONTINUATION = 0x0, 0x9
_END_STREAM = 0x1
_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16+8 bits, type, flags, stream id
_MAX_FLEN = (1 << 24) - 1
_CANCEL = 0x8  # RST_STREAM error code (RFC 9113 §7)

#: gRPC status names by code (grpc/doc/statuscodes.md).
GRPC_STATUS_NAMES: Final[tuple[str, ...]] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip

#: Codes that make a gRPC *server* span an error (OTel RPC semconv, gRPC: UNKNOWN,
#: DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS). For a client
#: span every code but OK is one.
GRPC_SERVER_ERRORS: Final = frozenset({2, 4, 12, 13, 14, 15})

# Kernel totals of one stream as (client, server), or None for H2F_AGG_MISSING.
_Totals = tuple[H2Agg, H2Agg] | None


@dataclass(slots=True)
class _Pending:
    """A forwarded frame whose captured payload is still arriving in MORE records."""

    want: int  # captured bytes still to come
    left: int  # payload bytes of the frame not fed yet (the captured ones among them)


class _Side:
    """One direction of a tracked connection."""

    __slots__ = ("data_seen", "name", "pending", "raw", "restarted", "totals")

    def __init__(self, name: Direction) -> None:
        self.name: Direction = name
        self.pending: _Pending | None = None
        self.raw = False  # the kernel lost its frame walk: records are H2K_RAW
        # Streams whose DATA was seen in this direction (a later DATA frame is header-only).
        self.data_seen: OrderedDict[int, None] = OrderedDict()
        # Streams whose kernel totals restarted (a second "first" DATA was forwarded).
        self.restarted: OrderedDict[int, None] = OrderedDict()
        self.totals: tuple[int, _Totals] | None = None  # (stream id, totals) riding on the frame in progress


class _Conn:
    __slots__ = ("client_dir", "h2", "last_ns", "sides")

    def __init__(self, h2: H2Connection, client_dir: int, ts_ns: int) -> None:
        self.h2 = h2
        self.client_dir = client_dir
        self.last_ns = ts_ns
        server_dir = DIR_OUT if client_dir == DIR_IN else DIR_IN
        self.sides: dict[int, _Side] = {client_dir: _Side("client"), server_dir: _Side("server")}


class H2Tracker:
    """HTTP/2 streams of h2-mode connections, rebuilt from the kernel's records.

    See the module docstring. Not thread-safe; never raises on a record.
    """

    def __init__(
        self,
        config: H2Config | None = None,
        *,
        max_conns: int = 4096,
        h2_cap: int = Layout().h2_cap,
        on_evict: Callable[[int, list[H2Stream]], None] | None = None,
        decoders: HpackDecoders | None = None,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        """``config`` bounds each connection's parser (its ``max_frame_bytes`` default
        equals the kernel's H2_MAX_FRAME, beyond which the kernel's walk gives up too).
        ``h2_cap``: payload bytes the probe captures per frame (its H2_CAP).
        ``on_evict(conn_id, streams)`` receives the streams of a connection evicted from
        the LRU. Raises ``ValueError`` for bounds that cannot work."""
        if max_conns < 1:
            raise ValueError("max_conns must be positive")
        if h2_cap < 1:
            raise ValueError("h2_cap must be positive")
        self._config = config or H2Config()
        self._config.validate()
        self._max_conns = max_conns
        self._cap = h2_cap
        self._on_evict = on_evict
        self._decoders = decoders
        self._metrics = metrics
        # Streams remembered per direction for the header-only rule; a stream leaves when
        # it completes, so this only bounds streams the parser ended without the kernel.
        self._max_seen = 4 * self._config.max_open_streams
        metrics.describe(
            _EVICTED,
            "counter",
            "HTTP/2 connections evicted from the h2 record tracker's LRU; their open streams end as closed.",
        )
        self._conns: OrderedDict[int, _Conn] = OrderedDict()

    # --- public interface ---------------------------------------------------

    def feed(self, ev: H2Event) -> list[H2Stream]:
        """Take one record; return the streams of ``ev.conn_id`` it completed."""
        if ev.dir not in (DIR_IN, DIR_OUT) or ev.kind not in (H2K_FRAME, H2K_MORE, H2K_RAW):
            self._fail("h2_bad_record")
            return []
        if ev.kind == H2K_FRAME and ev.flen > _MAX_FLEN:
            self._fail("h2_bad_record")
            return []
        c = self._connection(ev)
        c.last_ns = max(c.last_ns, ev.ts_ns)
        out: list[H2Stream] = []
        if ev.lost:
            self._records_lost(c, ev.lost, out)
        side = c.sides[ev.dir]
        if ev.kind == H2K_MORE:
            self._more(c, side, ev)
        elif ev.kind == H2K_FRAME:
            self._frame(c, side, ev, out)
        else:
            self._raw(c, side, ev, out)
        self._drain(c, out)
        return out

    def close(self, conn_id: int, ts_ns: int, *, lost: int = 0) -> list[H2Stream]:
        """The connection closed at ``ts_ns``: complete its open streams (``end_reason``
        "close") and forget it. ``lost``: records refused after its last delivered one
        (the close summary's count). Unknown ids give ``[]``."""
        c = self._conns.pop(conn_id, None)
        if c is None:
            return []
        out: list[H2Stream] = []
        if lost:
            self._records_lost(c, lost, out)
        self._shutdown(c, ts_ns, out)
        return out

    def has(self, conn_id: int) -> bool:
        return conn_id in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    # --- connections --------------------------------------------------------

    def _connection(self, ev: H2Event) -> _Conn:
        c = self._conns.get(ev.conn_id)
        if c is not None:
            self._conns.move_to_end(ev.conn_id)
            return c
        while len(self._conns) >= self._max_conns:
            old_id, old = self._conns.popitem(last=False)
            self._metrics.inc(_EVICTED)
            streams: list[H2Stream] = []
            self._shutdown(old, old.last_ns, streams)
            if self._on_evict is not None:
                self._on_evict(old_id, streams)
            elif streams:
                self._metrics.inc(_LOST, len(streams), (("reason", "h2_evicted"),))
        # The connection's decoder key is its own (H2Connection's default): conn_ids of
        # another tracker, or of an earlier probe, must never share a table.
        h2 = H2Connection(self._config, from_start=True, decoders=self._decoders, metrics=self._metrics)
        # The kernel consumed the preface (or never saw it: a joined connection, whose
        # frames it still cuts at frame boundaries); either way the next byte is a frame's.
        h2.feed("client", PREFACE, ev.ts_ns)
        c = _Conn(h2, DIR_OUT if ev.role == ROLE_CLIENT else DIR_IN, ev.ts_ns)
        self._conns[ev.conn_id] = c
        return c

    def _shutdown(self, c: _Conn, ts_ns: int, out: list[H2Stream]) -> None:
        for side in c.sides.values():
            # The kernel saw the frame's header: its payload is taken as sent, not captured.
            self._close_pending(c, side, short=False)
        self._drain(c, out)
        c.h2.close(ts_ns)
        self._drain(c, out)
        for side in c.sides.values():
            self._settle(side)

    # --- records ------------------------------------------------------------

    def _records_lost(self, c: _Conn, n: int, out: list[H2Stream]) -> None:
        self._metrics.inc(_FAILURES, n, (("reason", "h2_records_lost"),))
        for side in c.sides.values():
            self._close_pending(c, side, short=False)
            self._drain(c, out)
            # Framing holds (the kernel's walk goes on); what the lost records carried
            # does not. A raw direction was searching anyway: it searches afresh.
            c.h2.lose(side.name, "h2_records_lost", resync=side.raw)
            self._drain(c, out)

    def _frame(self, c: _Conn, side: _Side, ev: H2Event, out: list[H2Stream]) -> None:
        if side.raw:
            # The kernel found its walk again: this record begins a frame.
            side.raw = False
            c.h2.lose(side.name, "h2_desync", resync=False)
        self._close_pending(c, side, short=True)
        self._drain(c, out)
        if ev.ftype != _CONTINUATION:
            # Totals wait for the frame that carried them and its header block; a
            # new frame (not the block's continuation) ends that wait.
            self._settle(side)
        flen, sid = ev.flen, ev.sid & 0x7FFFFFFF
        payload = ev.payload[:flen]
        header_only = False
        if ev.ftype == _DATA:
            if sid in side.data_seen:
                if payload or not ev.fflags & _END_STREAM:
                    # Forwarded as a first DATA again: the kernel's totals began afresh.
                    self._remember(side.restarted, sid)
                else:
                    header_only = True  # a later DATA with END_STREAM: its payload is a gap
            self._remember(side.data_seen, sid)
        if ev.hflags & H2F_AGG and ev.agg is not None:
            totals: _Totals = (ev.agg[c.client_dir], ev.agg[1 - c.client_dir])
            side.totals = (sid, totals)
        elif ev.hflags & (H2F_AGG | H2F_AGG_MISSING):
            side.totals = (sid, None)
        head = _HEADER.pack(flen >> 8, flen & 0xFF, ev.ftype, ev.fflags, sid)
        c.h2.feed(side.name, head + payload, ev.ts_ns)
        want = 0 if header_only else min(flen, self._cap)
        if len(payload) < want:
            side.pending = _Pending(want - len(payload), flen - len(payload))
        elif flen > len(payload):
            c.h2.feed_gap(side.name, flen - len(payload))

    def _more(self, c: _Conn, side: _Side, ev: H2Event) -> None:
        p = side.pending
        if p is None:
            self._orphan(len(ev.payload))
            return
        data = ev.payload[: p.left]
        c.h2.feed(side.name, data, ev.ts_ns)
        p.want -= len(data)
        p.left -= len(data)
        if len(ev.payload) > len(data):
            self._orphan(len(ev.payload) - len(data))
        if p.want <= 0:
            side.pending = None
            if p.left:
                c.h2.feed_gap(side.name, p.left)

    def _raw(self, c: _Conn, side: _Side, ev: H2Event, out: list[H2Stream]) -> None:
        if not side.raw:
            self._close_pending(c, side, short=True)
            self._drain(c, out)
            self._settle(side)
            side.raw = True
            c.h2.lose(side.name, "h2_desync", resync=True)
        # flen is what the syscall moved from where the walk stopped; never trust a
        # payload longer than that.
        payload = ev.payload[: ev.flen]
        c.h2.feed(side.name, payload, ev.ts_ns)
        if ev.flen > len(payload):
            c.h2.feed_gap(side.name, ev.flen - len(payload))

    def _close_pending(self, c: _Conn, side: _Side, *, short: bool) -> None:
        """End the frame waiting for MORE records: what did not come is a gap."""
        p = side.pending
        if p is None:
            return
        side.pending = None
        if short:
            self._fail("h2_capture_short")
        if p.left:
            c.h2.feed_gap(side.name, p.left)

    def _orphan(self, n: int) -> None:
        self._fail("h2_more_orphan")
        if n:
            self._metrics.inc(_SKIPPED, n, (("reason", "h2_more_orphan"),))

    # --- totals -------------------------------------------------------------

    def _drain(self, c: _Conn, out: list[H2Stream]) -> None:
        """Collect the streams the parser completed, with kernel totals applied."""
        for s in c.h2.take_completed():
            sid = s.stream_id
            restarted = forwarded = False
            for side in c.sides.values():
                forwarded |= sid in side.data_seen
                restarted |= sid in side.restarted
                side.data_seen.pop(sid, None)
                side.restarted.pop(sid, None)
            applied = False
            for side in c.sides.values():
                if side.totals is not None and side.totals[0] == sid:
                    s = self._apply(s, side.totals[1], restarted)
                    side.totals = None
                    applied = True
            if not applied and forwarded and not s.messages_lost:
                # The parser saw the first DATA frame of a direction, not the later ones
                # the kernel kept. (Without a forwarded DATA frame nothing was kept: the
                # first is always sent, and raw records carry every frame.)
                s = replace(s, messages_lost=True)
            out.append(s)

    def _apply(self, s: H2Stream, totals: _Totals, restarted: bool) -> H2Stream:
        if totals is None:
            self._fail("h2_totals_missing")
            return replace(s, messages_lost=True)
        client, server = totals
        # The parser saw a subset of the DATA frames (padding not counted): totals below
        # that cover part of the stream, kept by an entry the kernel made afresh.
        if restarted or client.bytes < s.request_bytes or server.bytes < s.response_bytes:
            self._fail("h2_totals_partial")
            return replace(s, messages_lost=True)
        return replace(
            s,
            request_messages=client.msgs,
            response_messages=server.msgs,
            request_bytes=client.bytes,
            response_bytes=server.bytes,
            first_message_ns=server.first_ns or None,
            last_message_ns=server.last_ns or None,
            messages_lost=client.lost or server.lost,
        )

    def _settle(self, side: _Side) -> None:
        """Totals whose frame is done without completing their stream have no record."""
        if side.totals is not None:
            if side.totals[1] is not None:
                self._fail("h2_totals_unmatched")
            side.totals = None

    def _remember(self, seen: OrderedDict[int, None], sid: int) -> None:
        seen[sid] = None
        seen.move_to_end(sid)
        while len(seen) > self._max_seen:
            seen.popitem(last=False)

    def _fail(self, reason: str) -> None:
        self._metrics.inc(_FAILURES, 1, (("reason", reason),))


# --- records for the pipeline --------------------------------------------------


def stream_request(
    stream: H2Stream,
    *,
    pid: int,
    command: str,
    span_kind: str,
    server_port: int | None,
    client_address: str | None,
    client_port: int | None,
    to_unix_ns: Callable[[int], int],
    metrics: SelfMetrics = SELF_METRICS,
) -> Request | None:
    """One HTTP/2 stream as the pipeline's :class:`Request`; None (counted as
    ``infersight.requests.lost{reason="h2_no_start"}``) when neither its request
    nor its response start was seen.

    - ``method``, ``path``, ``status_code``: ``:method``, ``:path``, ``:status``.
    - ``attributes``: ``rpc.system`` ("grpc"), ``rpc.service``, ``rpc.method``
      and ``rpc.grpc.status_code`` (int), each absent when unknown or not gRPC.
    - start: the client's first HEADERS, else the first response frame; end:
      the stream's end, else the last time seen.
    - ``streaming``: a gRPC stream with more than one response message, or a
      KServe ``ModelStreamInfer``. Then ``output_events`` is the number of
      response messages, ``time_to_first_token_s`` request start → first
      response message, ``time_per_output_token_s`` (last message start -
      first) / (messages - 1). Counts the capture lost (``messages_lost``) give
      None rather than a wrong number.
    - ``request_model`` / ``response_model``: :func:`agent.kserve.stream_model`.
    - ``aborted``: the client reset the stream with CANCEL.
    - ``error_type``: for a stream that ended without END_STREAM (and was not
      aborted) its end: "reset", "goaway", "close" or "evicted"; for a gRPC
      status that is an error on this side (server: UNKNOWN,
      DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS;
      client: any but OK) its name.

    Message bytes never reach the record. Pure apart from ``metrics``.
    """
    start = stream.request_start_ns if stream.request_start_ns is not None else stream.response_first_ns
    if start is None:
        metrics.inc(_LOST, 1, (("reason", "h2_no_start"),))
        return None
    seen = [
        t
        for t in (
            stream.request_start_ns,
            stream.response_first_ns,
            stream.first_message_ns,
            stream.last_message_ns,
        )
        if t is not None
    ]
    end = stream.end_ns if stream.end_ns is not None else max(seen)
    end = max(end, start)

    grpc = stream.rpc_system == "grpc"
    attributes: dict[str, Any] = {}
    if grpc:
        attributes["rpc.system"] = "grpc"
        if stream.rpc_service is not None:
            attributes["rpc.service"] = stream.rpc_service
        if stream.rpc_method is not None:
            attributes["rpc.method"] = stream.rpc_method
        if stream.grpc_status is not None:
            attributes["rpc.grpc.status_code"] = stream.grpc_status

    kserve_stream = stream.rpc_service == kserve.SERVICE and stream.rpc_method == "ModelStreamInfer"
    streaming = grpc and (stream.response_messages > 1 or kserve_stream)
    counted = not stream.messages_lost
    first, last = stream.first_message_ns, stream.last_message_ns
    output_events: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    first_token: int | None = None
    if streaming:
        if counted:
            output_events = stream.response_messages
        if first is not None:
            first_token = to_unix_ns(first)
            if stream.request_start_ns is not None:
                ttft_s = max(0, first - stream.request_start_ns) / 1e9
            if counted and last is not None and stream.response_messages >= 2:
                tpot_s = max(0, last - first) / 1e9 / (stream.response_messages - 1)

    aborted = stream.end_reason == "reset" and stream.reset_by == "client" and stream.reset_code == _CANCEL
    error_type: str | None = None
    if not stream.complete:
        if not aborted:
            error_type = stream.end_reason
    elif grpc and stream.grpc_status is not None and stream.grpc_status != 0:
        code = stream.grpc_status
        if span_kind != "server" or code in GRPC_SERVER_ERRORS:
            error_type = GRPC_STATUS_NAMES[code] if code < len(GRPC_STATUS_NAMES) else "_OTHER"

    request_model, response_model = kserve.stream_model(stream)
    return Request(
        start_time_unix_nano=to_unix_ns(start),
        end_time_unix_nano=to_unix_ns(end),
        pid=pid,
        command=command,
        method=stream.method,
        path=stream.path,
        status_code=stream.status,
        span_kind=span_kind,
        server_port=server_port,
        client_address=client_address,
        client_port=client_port,
        streaming=streaming,
        output_events=output_events,
        time_to_first_token_s=ttft_s,
        time_per_output_token_s=tpot_s,
        operation=None,  # KServe v2 is not a GenAI API in the semantic conventions' sense
        request_model=request_model,
        response_model=response_model,
        aborted=aborted,
        error_type=error_type,
        ids=SpanIds(drawn=False),  # drawn when first read
        first_token_time_unix_nano=first_token,
        attributes=MappingProxyType(attributes),
    )
