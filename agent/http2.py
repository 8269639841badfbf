"""HTTP/2 and gRPC for a passive observer: frames, HPACK and per-stream records.

The agent sees both directions of a connection as captured byte chunks, with
the bytes it lost reported as gaps, and may attach in the middle of a
connection. Nothing here can answer, so h2's endpoint state machine (which
insists on a preface, settings and flow control it took part in) does not
fit. Instead frames are cut with ``hyperframe``, header blocks decoded with
``hpack`` (one decoder per direction), and streams assembled by
:class:`H2Connection`::

    conn = H2Connection()
    conn.feed("client", chunk, ts_ns)     # bytes the client sent, any split
    conn.feed("server", chunk, ts_ns)     # bytes the server sent
    conn.feed_gap("server", lost)         # n bytes were sent but not captured
    conn.close(ts_ns)
    for s in conn.take_completed():       # H2Stream records, in completion order
        ...

Framing and its loss, per direction:

- The client direction may start with the h2c prior-knowledge preface
  (RFC 9113 §3.4); it is consumed. Any other start is treated as a join: the
  reader *resyncs*, looking for three consecutive believable frames, or two
  that end exactly where the captured bytes end (known type, only defined
  flags, the stream-id rules and fixed lengths of RFC 9113 §6, odd stream
  ids not far above those seen, no empty DATA without END_STREAM, no empty
  header block). A position that already is a frame boundary costs nothing;
  skipped bytes are counted as
  ``infersight.parse.skipped.bytes{reason="h2_join"}`` and the resync as
  ``infersight.parse.resyncs{reason="h2_join"}``. Until a sync point is
  confirmed its bytes are held (bounded), so a lone frame at the end of a
  capture waits for the next chunk.
- A gap inside the payload of a known frame keeps framing: DATA payload gaps
  are handed to the stream (its gRPC message framing survives a gap inside a
  message body of known length); any other frame whose payload was cut is
  dropped. A gap that covers a frame header loses framing
  (``infersight.parse.resyncs{reason="h2_gap"}``).
- A declared length above ``H2Config.max_frame_bytes`` is taken as lost
  framing (``infersight.parse.failures{reason="h2_frame_too_large"}``, then a
  resync); a header block above ``max_header_block_bytes`` is skipped with
  framing kept (``reason="h2_headers_too_large"``).
- A capture layer that cuts frames itself (``agent/h2wire.py``, fed by the
  socket probe's h2 mode) reports a loss it cannot size with
  :meth:`H2Connection.lose`: the state that depended on the lost bytes goes
  as after a gap over a frame header, and the reader either resyncs or, when
  the caller knows where the next frame begins, takes it from there.

HPACK: a decoder's dynamic table is cumulative, so a header block lost to a
gap, a resync or a decoding error leaves the table behind the encoder's. The
decoder is then *replaced by an empty one*, never patched: an empty table
holds no wrong entries, and every entry it gains afterwards is at the same
index as in the encoder's table (new entries take the lowest dynamic index,
RFC 7541 §2.3.3). So after a join or a loss, a block that references only
the static table, literals and entries inserted since decodes correctly, and
a block that references older entries fails to decode (a table that evicted
differently from the encoder's still agrees on its newest entries, which are
the only ones it can resolve). Such a failure is
counted (``infersight.parse.failures{reason="hpack"}``), the direction is
marked degraded (:attr:`H2Connection.degraded`), and the stream record is
still produced with the fields that block would have given left as None.
Decoders live in a bounded LRU shared by connections (:class:`HpackDecoders`,
evictions counted as ``infersight.parse.h2.decoders.evicted``); an evicted
decoder comes back empty, with the same rules.

Streams: a client HEADERS on a new stream opens a record; one is also opened
for a stream first seen mid-way (after a join), unless it was recently
completed. A record completes on END_STREAM from the server (trailers, or the
last DATA), on RST_STREAM from either side (``reset_by`` names it), on a
GOAWAY that excludes it, on eviction (at most ``max_open_streams`` open
streams, the oldest evicted and counted as
``infersight.parse.failures{reason="h2_streams_full"}``) and at
:meth:`H2Connection.close`. Completed records wait in a bounded list
(``max_completed``); an overflow drops the oldest, counted as
``infersight.requests.lost{reason="h2_backlog"}``.

Other failure reasons (``infersight.parse.failures``): ``h2_headers_lost``
(a header block not captured), ``h2_continuation`` (a header block
interrupted, RFC 9113 §6.10), ``h2_bad_frame`` (a frame hyperframe rejects;
its length still frames it), ``h2_stream_id`` (a stream id far beyond those
seen: garbage after a false resync, no record is opened) and
``h2_truncated`` (the connection closed inside a frame).

Timestamps are the caller's (kernel monotonic ns): every event of a frame
takes the ``ts_ns`` of the chunk that carried the frame's first byte, and a
gRPC message the ``ts_ns`` of the chunk that carried its first byte. The
parser never reads a clock.

Threading: an :class:`H2Connection` belongs to one connection and is not
thread-safe; use it from one thread. :class:`HpackDecoders` is thread-safe.
No method raises on any input bytes; constructors raise ``ValueError`` for
invalid bounds, and :meth:`H2Connection.feed` raises ``ValueError`` for a
direction other than ``"client"`` or ``"server"``.
"""

from __future__ import annotations

import functools
import itertools
import re
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote

import hpack
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from agent.selfmetrics import SELF_METRICS, SelfMetrics

__all__ = [
    "PREFACE",
    "Direction",
    "H2Config",
    "H2Connection",
    "H2Stream",
    "HpackDecoders",
    "split_grpc_path",
]

Direction = Literal["client", "server"]

#: The client connection preface (RFC 9113 §3.4).
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_FAILURES = "infersight.parse.failures"
_SKIPPED = "infersight.parse.skipped.bytes"
_RESYNCS = "infersight.parse.resyncs"

# Frame types (RFC 9113 §6).
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
# Flags defined per type; a resync candidate may carry no other bits.
_DEFINED_FLAGS = (0x09, 0x2D, 0x00, 0x00, 0x01, 0x0C, 0x01, 0x00, 0x00, 0x04)
_END_STREAM, _END_HEADERS, _PADDED = 0x01, 0x04, 0x08
_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16+8 bits, type, flags, stream id

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_MAX_PENDING_SETTINGS = 8  # unacknowledged SETTINGS kept per direction
_MAX_FIELD_CHARS = 1024  # longest header value kept in a record
_SYNC_CHAIN = 3  # consecutive believable frames that end a resync

# Reader states.
_PREFACE_STATE, _HEAD, _BODY, _DATA_PAD, _DATA_BODY, _SKIP, _SYNC = range(7)


@dataclass(frozen=True, slots=True)
class H2Config:
    """Bounds of one HTTP/2 connection's parser. Validated by :class:`H2Connection`."""

    max_frame_bytes: int = 1 << 20
    """A longer declared frame length is taken as lost framing (gRPC peers send 16 KiB frames)."""
    max_header_block_bytes: int = 65536
    """Largest HEADERS+CONTINUATION block buffered for HPACK; a longer one is skipped."""
    max_header_list_bytes: int = 65536
    """Largest decoded header list (HPACK's own bound against decompression bombs)."""
    max_header_table_bytes: int = 65536
    """Largest HPACK dynamic table a decoder keeps, whatever the peers announce."""
    max_open_streams: int = 128
    """Open streams tracked per connection; beyond it the oldest is completed as evicted."""
    max_completed: int = 1024
    """Completed records waiting for take_completed(); beyond it the oldest is dropped."""
    max_message_capture_bytes: int = 1024
    """Prefix of the first message kept per stream and direction (enough for a KServe model name)."""
    max_recent_closed: int = 256
    """Recently completed stream ids remembered, so late frames do not reopen them."""
    max_stream_id_jump: int = 65536
    """Streams that may open unseen (in a gap) between two seen; a larger jump in ids is garbage."""
    resync_max_frame_bytes: int = 16384
    """Longest frame trusted as a resync point (the RFC 9113 default frame size); longer ones are passed."""

    def validate(self) -> None:
        """Raise ``ValueError`` for a bound that cannot work."""
        if not 16384 <= self.max_frame_bytes <= (1 << 24) - 1:
            raise ValueError("max_frame_bytes must be between 16384 and 2**24-1")
        if not 64 <= self.resync_max_frame_bytes <= self.max_frame_bytes:
            raise ValueError("resync_max_frame_bytes must be between 64 and max_frame_bytes")
        for name in (
            "max_header_block_bytes",
            "max_header_list_bytes",
            "max_open_streams",
            "max_completed",
            "max_stream_id_jump",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("max_header_table_bytes", "max_message_capture_bytes", "max_recent_closed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True, slots=True)
class H2Stream:
    """One HTTP/2 stream as observed; a value the wire did not show is None.

    ``request_message`` and ``response_message`` hold bounded prefixes of the
    first message each way (gRPC: after the 5-byte prefix) for model-name
    extraction only; they are kept out of ``repr`` and must never be logged
    or exported.
    """

    stream_id: int
    method: str | None  # :method
    path: str | None  # :path
    authority: str | None  # :authority
    content_type: str | None  # request content-type
    status: int | None  # :status of the final response head
    grpc_status: int | None  # from trailers or a trailers-only response
    grpc_message: str | None  # percent-decoded
    request_start_ns: int | None  # first HEADERS from the client
    response_first_ns: int | None  # first response HEADERS or DATA
    first_message_ns: int | None  # first byte of the first gRPC response message
    last_message_ns: int | None  # first byte of the last one (streaming: time per message)
    end_ns: int | None  # END_STREAM from the server, RST_STREAM, GOAWAY or close
    end_reason: str  # "end_stream", "reset", "goaway", "evicted" or "close"
    reset_code: int | None  # RST_STREAM error code
    request_messages: int  # complete gRPC messages from the client
    response_messages: int  # complete gRPC messages from the server
    request_bytes: int  # DATA payload bytes (padding excluded), gaps included
    response_bytes: int
    request_compressed: bool | None  # compressed flag of the first request message
    response_compressed: bool | None
    headers_lost: bool  # a header block of this stream could not be decoded or was not captured
    messages_lost: bool  # gRPC message framing of this stream was lost to a gap or resync
    rpc_system: str | None  # "grpc" when content-type is application/grpc[+proto|...]
    rpc_service: str | None  # "package.Service" from /package.Service/Method
    rpc_method: str | None
    request_message: bytes = field(default=b"", repr=False)
    response_message: bytes = field(default=b"", repr=False)
    reset_by: Direction | None = None  # the side whose RST_STREAM ended the stream

    @property
    def complete(self) -> bool:
        """Ended by END_STREAM from the server."""
        return self.end_reason == "end_stream"


def split_grpc_path(path: str | None) -> tuple[str | None, str | None]:
    """``/package.Service/Method`` to ``("package.Service", "Method")``; Nones otherwise."""
    if not path or not path.startswith("/"):
        return None, None
    parts = path[1:].split("?", 1)[0].split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None, None
    return parts[0], parts[1]


class HpackDecoders:
    """A bounded LRU of HPACK decoders keyed by (connection key, direction).

    A decoder evicted while its connection lives comes back empty; the
    connection then decodes what it still can (see the module docstring).
    Thread-safe.
    """

    def __init__(self, max_entries: int = 8192, *, metrics: SelfMetrics = SELF_METRICS) -> None:
        if max_entries < 2:
            raise ValueError("max_entries must be at least 2 (one connection's two directions)")
        self._max = max_entries
        self._metrics = metrics
        metrics.describe(
            "infersight.parse.h2.decoders.evicted",
            "counter",
            "HPACK decoders evicted from the bounded LRU; their connections decode on with an empty table.",
        )
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, hpack.Decoder] = OrderedDict()

    def get(self, key: Hashable) -> tuple[hpack.Decoder | None, int]:
        """The decoder for ``key`` (made most recent) or None, and the current size."""
        with self._lock:
            dec = self._entries.get(key)
            if dec is not None:
                self._entries.move_to_end(key)
            return dec, len(self._entries)

    def put(self, key: Hashable, decoder: hpack.Decoder) -> None:
        """Store ``decoder`` for ``key``, evicting the least recently used beyond the bound."""
        with self._lock:
            self._entries[key] = decoder
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
                self._metrics.inc("infersight.parse.h2.decoders.evicted")

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


#: The process-wide decoder LRU; connections take a ``decoders`` parameter defaulting to it.
HPACK_DECODERS = HpackDecoders()


class _Messages:
    """gRPC length-prefixed message framing of one stream direction (5-byte prefix:
    compressed flag, 4-byte big-endian length; gRPC over HTTP/2 spec)."""

    __slots__ = (
        "capture",
        "capture_limit",
        "complete",
        "compressed",
        "first_ns",
        "last_ns",
        "lost",
        "prefix",
        "remaining",
    )

    def __init__(self, capture_limit: int) -> None:
        self.prefix = b""  # partial 5-byte prefix
        self.remaining = 0  # body bytes left in the current message
        self.complete = 0
        self.lost = False
        self.first_ns: int | None = None  # first byte of the first message
        self.last_ns: int | None = None  # first byte of the latest message
        self.compressed: bool | None = None
        self.capture = bytearray()  # prefix of the first message's body
        self.capture_limit = capture_limit

    def feed(self, data: bytes, ts: int) -> None:
        if self.lost:
            return
        pos, n = 0, len(data)
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                if self.complete == 0 and len(self.capture) < self.capture_limit:
                    self.capture += data[pos : pos + min(take, self.capture_limit - len(self.capture))]
                self.remaining -= take
                pos += take
                if self.remaining == 0:
                    self.complete += 1
                continue
            if not self.prefix:
                self.last_ns = ts
                if self.first_ns is None:
                    self.first_ns = ts
            need = 5 - len(self.prefix)
            self.prefix += data[pos : pos + need]
            pos += min(need, n - pos)
            if len(self.prefix) == 5:
                if self.compressed is None:
                    self.compressed = bool(self.prefix[0] & 1)
                self.remaining = int.from_bytes(self.prefix[1:5], "big")
                self.prefix = b""
                if self.remaining == 0:
                    self.complete += 1

    def gap(self, n: int) -> None:
        """``n`` payload bytes were not captured: framing survives only inside a message body."""
        if self.lost:
            return
        if self.prefix or n > self.remaining:
            self.lose()
            return
        self.capture_limit = len(self.capture)  # the captured prefix must stay contiguous
        self.remaining -= n
        if self.remaining == 0:
            self.complete += 1

    def lose(self) -> None:
        self.lost = True
        self.prefix = b""
        self.remaining = 0


class _OpenStream:
    __slots__ = (
        "authority",
        "content_type",
        "end_ns",
        "grpc_message",
        "grpc_status",
        "headers_lost",
        "method",
        "path",
        "request",
        "request_bytes",
        "request_start_ns",
        "reset_by",
        "reset_code",
        "response",
        "response_bytes",
        "response_first_ns",
        "status",
        "stream_id",
    )

    def __init__(self, stream_id: int, capture_limit: int) -> None:
        self.stream_id = stream_id
        self.method: str | None = None
        self.path: str | None = None
        self.authority: str | None = None
        self.content_type: str | None = None
        self.status: int | None = None
        self.grpc_status: int | None = None
        self.grpc_message: str | None = None
        self.request_start_ns: int | None = None
        self.response_first_ns: int | None = None
        self.end_ns: int | None = None
        self.reset_code: int | None = None
        self.reset_by: Direction | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.headers_lost = False
        self.request = _Messages(capture_limit)
        self.response = _Messages(capture_limit)

    def record(self, end_reason: str, end_ns: int | None) -> H2Stream:
        grpc = self.content_type is not None and (
            self.content_type == "application/grpc"
            or self.content_type.startswith(("application/grpc+", "application/grpc;"))
        )
        service, method = split_grpc_path(self.path) if grpc else (None, None)
        return H2Stream(
            stream_id=self.stream_id,
            method=self.method,
            path=self.path,
            authority=self.authority,
            content_type=self.content_type,
            status=self.status,
            grpc_status=self.grpc_status,
            grpc_message=self.grpc_message,
            request_start_ns=self.request_start_ns,
            response_first_ns=self.response_first_ns,
            first_message_ns=self.response.first_ns,
            last_message_ns=self.response.last_ns,
            end_ns=end_ns,
            end_reason=end_reason,
            reset_code=self.reset_code,
            request_messages=self.request.complete,
            response_messages=self.response.complete,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            request_compressed=self.request.compressed,
            response_compressed=self.response.compressed,
            headers_lost=self.headers_lost,
            messages_lost=self.request.lost or self.response.lost,
            rpc_system="grpc" if grpc else None,
            rpc_service=service,
            rpc_method=method,
            request_message=bytes(self.request.capture),
            response_message=bytes(self.response.capture),
            reset_by=self.reset_by,
        )


# Header blocks remembered per direction (H2Connection._decode); each holds at most
# one decoded header list (bounded by max_header_list_bytes).
_HPACK_MEMO_BLOCKS = 16

# An HPACK dynamic table's state: its size limit, its entry count and its
# newest entry (held, so compared by identity). Every insertion puts a new
# entry object first; an eviction without insertion, or a resize, changes the
# count or the limit. A state therefore names one table at one moment: the
# table of a decoder that replaced an evicted or reset one never matches it,
# except when both are empty, where a block decodes the same anyway.
_TableState = tuple[int, int, object]


def _table_state(dec: hpack.Decoder) -> _TableState:
    table = dec.header_table
    # typed as objects: compiled (mypyc), an entry read as tuple[bytes, bytes] would be
    # unboxed and boxed again into a new tuple, and identity is what is compared
    entries: Sequence[object] = table.dynamic_entries
    return (table.maxsize, len(entries), entries[0] if entries else None)


def _same_table(a: _TableState, b: _TableState) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2] is b[2]


class _Side:
    """Reader state of one direction."""

    __slots__ = (
        "block",
        "block_end_stream",
        "block_lost",
        "block_push",
        "block_stream",
        "block_ts",
        "buf",
        "data_end_stream",
        "data_pad",
        "decoded_any",
        "degraded",
        "frame",
        "frame_flags",
        "frame_len",
        "frame_stream",
        "frame_ts",
        "frame_type",
        "hpack_memo",
        "key",
        "name",
        "pending_table_sizes",
        "reason",
        "remaining",
        "skip_then",
        "state",
        "sync_max_len",
        "sync_pending",
        "sync_scanned",
        "sync_skipped",
    )

    def __init__(self, name: Direction, key: Hashable, sync_max_len: int) -> None:
        self.name = name
        self.key = key
        self.buf = b""
        self.state = _PREFACE_STATE if name == "client" else _SYNC
        self.reason = "h2_join"  # why the current resync started
        self.frame: Frame | None = None
        self.frame_type = 0
        self.frame_flags = 0
        self.frame_stream = 0
        self.frame_len = 0
        self.frame_ts = 0
        self.remaining = 0  # payload bytes left in _SKIP, _DATA_BODY (content) states
        self.data_pad = 0  # padding after the current DATA frame's content
        self.data_end_stream = False
        self.skip_then = -1  # frame type whose end follows a _SKIP (DATA ends its stream data)
        # header block in progress (HEADERS/PUSH_PROMISE + CONTINUATION)
        self.block: bytearray | None = None
        self.block_stream = 0
        self.block_end_stream = False
        self.block_lost = False
        self.block_push = False  # a PUSH_PROMISE block: decoded for the table only
        self.block_ts = 0
        self.decoded_any = False  # a block was decoded: an empty decoder now means lost state
        self.degraded = False
        # header blocks that left the HPACK table as it was, by their bytes (see H2Connection._decode)
        self.hpack_memo: dict[bytes, tuple[_TableState, list[tuple[bytes, bytes]]]] = {}
        self.pending_table_sizes: deque[int] = deque()  # announced by this side, awaiting ACK
        self.sync_max_len = sync_max_len  # longest frame believed during resync
        self.sync_skipped = 0  # bytes skipped by the current resync
        # Undecided resync candidates (offsets into buf) and how far buf was scanned.
        self.sync_pending: list[int] = []
        self.sync_scanned = 0


_conn_ids = itertools.count(1)


class H2Connection:
    """Assembles the streams of one HTTP/2 connection from both directions' bytes.

    See the module docstring. Not thread-safe; never raises on input bytes.
    """

    def __init__(
        self,
        config: H2Config | None = None,
        *,
        key: Hashable | None = None,
        from_start: bool = False,
        decoders: HpackDecoders | None = None,
        metrics: SelfMetrics = SELF_METRICS,
    ) -> None:
        """``key`` names the connection in the decoder LRU (unique while it lives; a
        fresh one by default). ``from_start``: the capture begins with the connection's
        first byte both ways, so the server's first byte begins a frame (its SETTINGS,
        RFC 9113 §3.4) and needs no resync; the client's must still be the preface."""
        self._cfg = config or H2Config()
        self._cfg.validate()
        self._metrics = metrics
        self._decoders = decoders if decoders is not None else HPACK_DECODERS
        self._key = key if key is not None else ("h2", next(_conn_ids))
        self._sides = {
            "client": _Side("client", (self._key, "client"), self._cfg.resync_max_frame_bytes),
            "server": _Side("server", (self._key, "server"), self._cfg.resync_max_frame_bytes),
        }
        if from_start:
            self._sides["server"].state = _HEAD
        self._open: dict[int, _OpenStream] = {}
        self._recent_closed: OrderedDict[int, None] = OrderedDict()
        self._max_sid = 0  # highest stream id a record was opened for
        self._completed: deque[H2Stream] = deque()
        self._closed = False
        self._sync_re = _sync_expression(self._cfg.resync_max_frame_bytes)
        self._handlers = {
            _PREFACE_STATE: self._on_preface,
            _HEAD: self._on_head,
            _BODY: self._on_body,
            _DATA_PAD: self._on_data_pad,
            _DATA_BODY: self._on_data_body,
            _SKIP: self._on_skip,
            _SYNC: self._on_sync,
        }

    # --- public interface -------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        """Parse bytes sent by ``direction``, in stream order, all stamped ``ts_ns``."""
        side = self._side(direction)
        if self._closed or not data:
            return
        buf = side.buf + data if side.buf else bytes(data)
        side.buf = b""
        pos = 0
        handlers = self._handlers
        while True:
            pos, more = handlers[side.state](side, buf, pos, ts_ns)
            if not more:
                break
        side.buf = buf[pos:]

    def feed_gap(self, direction: Direction, n: int) -> None:
        """Record that ``n`` bytes sent by ``direction`` were not captured."""
        side = self._side(direction)
        if self._closed or n <= 0:
            return
        while n > 0:
            state = side.state
            if state == _DATA_BODY:
                take = min(n, side.remaining)
                st = self._stream_for_data(side)
                if st is not None:
                    (st.request if side.name == "client" else st.response).gap(take)
                    if side.name == "client":
                        st.request_bytes += take
                    else:
                        st.response_bytes += take
                side.remaining -= take
                n -= take
                if side.remaining == 0:
                    self._after_data_content(side)
                continue
            if state == _SKIP:
                take = min(n, side.remaining)
                side.remaining -= take
                n -= take
                if side.remaining == 0:
                    self._after_skip(side)
                continue
            if state in (_BODY, _DATA_PAD) and n <= side.frame_len - len(side.buf):
                # The payload is cut but its end is known: drop this frame's payload only.
                side.remaining = side.frame_len - len(side.buf) - n
                side.buf = b""
                n = 0
                if state == _BODY:
                    self._frame_payload_lost(side)
                    side.skip_then = -1
                else:
                    self._data_lost(side)  # without the pad length, content and padding are one
                    side.skip_then = _DATA
                side.state = _SKIP
                if side.remaining == 0:
                    self._after_skip(side)
                continue
            if state == _SYNC:
                # Candidates held at the end of the buffer cannot continue across the gap.
                self._skip(len(side.buf), side.reason)
                side.sync_skipped += len(side.buf)
                side.buf = b""
                side.sync_pending.clear()
                side.sync_scanned = 0
                return
            # A frame header (or the preface) was in the gap: framing is lost.
            if state == _BODY:
                self._frame_payload_lost(side)
            self._skip(len(side.buf), "h2_gap")
            side.buf = b""
            self._lose_sync(side, "h2_gap")
            return

    def lose(self, direction: Direction, reason: str, *, resync: bool = True) -> None:
        """Bytes sent by ``direction`` were lost here, how many unknown.

        For a capture layer that knows more than :meth:`feed_gap` can say: it
        lost records, or its own framing. What depended on the lost bytes is
        dropped as after a gap over a frame header: a frame or header block in
        progress (counted as ``h2_headers_lost``), the HPACK table (an empty one
        takes over, see the module docstring) and the gRPC message framing of
        every open stream in that direction. Bytes held for a frame in progress
        are counted as ``infersight.parse.skipped.bytes{reason}``.

        ``resync=True``: where the next frame begins is unknown; the reader
        searches for it (counted as ``infersight.parse.resyncs{reason}``).
        ``resync=False``: the caller cuts frames itself and knows the next byte
        fed begins one (also after a resync in progress, which then ends).
        """
        side = self._side(direction)
        if self._closed:
            return
        if side.state == _SYNC:
            # A search in progress: its held bytes cannot continue across the loss, and
            # what depended on earlier bytes was dropped when the search began.
            self._skip(len(side.buf), side.reason)
            side.buf = b""
            side.sync_pending = []
            side.sync_scanned = 0
        else:
            if side.state == _BODY:
                self._frame_payload_lost(side)
            self._skip(len(side.buf), reason)
            side.buf = b""
            self._lose_sync(side, reason, count=resync)
        side.remaining = 0
        side.skip_then = -1
        if not resync:
            side.state = _HEAD
            side.reason = "h2_join"
            side.sync_skipped = 0

    def close(self, ts_ns: int | None = None) -> None:
        """The connection ended: complete every open stream (``end_reason="close"``)."""
        if self._closed:
            return
        for side in self._sides.values():
            inside = side.state in (_DATA_PAD, _DATA_BODY, _SKIP, _BODY) and (side.remaining or side.buf)
            if inside or (side.buf and side.state in (_HEAD, _PREFACE_STATE)):
                self._fail("h2_truncated")
            self._skip(len(side.buf), "h2_truncated" if side.state != _SYNC else side.reason)
            side.buf = b""
            self._decoders.discard(side.key)
        for sid in list(self._open):
            self._finish(sid, "close", ts_ns)
        self._closed = True

    def take_completed(self) -> list[H2Stream]:
        """The records completed since the last call, oldest first."""
        out = list(self._completed)
        self._completed.clear()
        return out

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def degraded(self, direction: Direction) -> bool:
        """Whether a header block of ``direction`` could not be decoded or was lost."""
        return self._side(direction).degraded

    def buffered(self, direction: Direction) -> int:
        """Bytes held for ``direction`` while waiting for more: at most
        ``resync_max_frame_bytes + max_frame_bytes + 27``."""
        return len(self._side(direction).buf)

    # --- bookkeeping --------------------------------------------------------

    def _side(self, direction: str) -> _Side:
        side = self._sides.get(direction)
        if side is None:
            raise ValueError(f"direction must be 'client' or 'server', not {direction!r}")
        return side

    def _skip(self, n: int, reason: str) -> None:
        if n > 0:
            self._metrics.inc(_SKIPPED, n, (("reason", reason),))

    def _fail(self, reason: str) -> None:
        self._metrics.inc(_FAILURES, 1, (("reason", reason),))

    def _lose_sync(self, side: _Side, reason: str, *, count: bool = True) -> None:
        """Framing of ``side`` is lost: resync, and forget what depended on the lost bytes."""
        if count:
            self._metrics.inc(_RESYNCS, 1, (("reason", reason),))
        side.state = _SYNC
        side.reason = reason
        side.sync_pending = []
        side.sync_scanned = 0
        side.frame = None
        if side.block is not None:
            self._block_lost(side)
            self._end_block(side)  # its stream keeps a record, without these headers
        # Any header block may have been in the lost bytes.
        self._reset_decoder(side)
        for st in self._open.values():
            (st.request if side.name == "client" else st.response).lose()

    def _reset_decoder(self, side: _Side) -> None:
        self._decoders.discard(side.key)
        if side.decoded_any:
            side.degraded = True

    def _decoder(self, side: _Side) -> hpack.Decoder:
        dec, _ = self._decoders.get(side.key)
        if dec is None:
            if side.decoded_any:
                side.degraded = True  # evicted: comes back empty, see the module docstring
            dec = hpack.Decoder(max_header_list_size=self._cfg.max_header_list_bytes)
            # An observer does not police the peers: allow any table size up to our bound.
            dec.max_allowed_table_size = self._cfg.max_header_table_bytes
            self._decoders.put(side.key, dec)
        return dec

    def _other(self, side: _Side) -> _Side:
        return self._sides["server" if side.name == "client" else "client"]

    # --- stream records -----------------------------------------------------

    def _sid_limit(self) -> int:
        """The highest stream id believable now: ids grow as streams open (RFC 9113
        §5.1.1), so a frame far beyond the highest seen is garbage, not a new stream."""
        if not self._max_sid:
            return 0x7FFFFFFF
        return min(0x7FFFFFFF, self._max_sid + 2 * self._cfg.max_stream_id_jump)

    def _stream(self, sid: int, *, create: bool) -> _OpenStream | None:
        st = self._open.get(sid)
        if st is not None or not create or sid == 0 or sid % 2 == 0 or sid in self._recent_closed:
            return st
        if sid > self._sid_limit():
            self._fail("h2_stream_id")
            return None
        self._max_sid = max(self._max_sid, sid)
        if len(self._open) >= self._cfg.max_open_streams:
            self._fail("h2_streams_full")
            self._finish(next(iter(self._open)), "evicted", None)
        st = _OpenStream(sid, self._cfg.max_message_capture_bytes)
        self._open[sid] = st
        return st

    def _finish(self, sid: int, reason: str, ts: int | None) -> None:
        st = self._open.pop(sid, None)
        if st is None:
            return
        self._recent_closed[sid] = None
        while len(self._recent_closed) > self._cfg.max_recent_closed:
            self._recent_closed.popitem(last=False)
        if len(self._completed) >= self._cfg.max_completed:
            self._completed.popleft()
            self._metrics.inc("infersight.requests.lost", 1, (("reason", "h2_backlog"),))
        self._completed.append(st.record(reason, ts))

    def _stream_for_data(self, side: _Side) -> _OpenStream | None:
        return self._stream(side.frame_stream, create=True)

    def _on_header_block(self, side: _Side, sid: int, block: bytes | None, end_stream: bool, ts: int) -> None:
        headers = None if block is None else self._decode(side, block)
        st = self._stream(sid, create=True)
        if st is None:
            return
        if headers is None:
            st.headers_lost = True
        if side.name == "client":
            if st.request_start_ns is None:
                st.request_start_ns = ts
                if headers is not None:
                    self._request_fields(st, headers)
            return
        if st.response_first_ns is None:
            st.response_first_ns = ts
        if headers is not None:
            self._response_fields(st, headers)
        if end_stream:
            self._finish(sid, "end_stream", ts)

    def _decode(self, side: _Side, block: bytes) -> list[tuple[bytes, bytes]] | None:
        """Decode a whole header block; None (counted, decoder replaced) when it cannot be.

        A block that changed nothing in the decoder's dynamic table (indexed
        fields and literals without indexing: gRPC's steady state) decodes the
        same again as long as the table is as it was: such blocks are kept by
        their bytes, with the table state they were decoded in, and not decoded
        twice. A block that inserts or resizes is always decoded.
        """
        dec = self._decoder(side)
        memo = side.hpack_memo
        before = _table_state(dec)
        hit = memo.get(block)
        if hit is not None and _same_table(hit[0], before):
            side.decoded_any = True
            return hit[1]
        try:
            decoded = dec.decode(block, raw=True)
            headers = [(bytes(k), bytes(v)) for k, v in decoded]
        except Exception:  # hpack's errors, and anything it raises on garbage
            self._fail("hpack")
            self._reset_decoder(side)
            side.degraded = True
            return None
        side.decoded_any = True
        if _same_table(before, _table_state(dec)):
            if len(memo) >= _HPACK_MEMO_BLOCKS:
                del memo[next(iter(memo))]
            memo[block] = (before, headers)
        return headers

    @staticmethod
    def _request_fields(st: _OpenStream, headers: list[tuple[bytes, bytes]]) -> None:
        for k, v in headers:
            if k == b":method":
                st.method = _text(v)
            elif k == b":path":
                st.path = _text(v)
            elif k == b":authority":
                st.authority = _text(v)
            elif k == b"content-type":
                st.content_type = _text(v).lower()
            elif k == b"host" and st.authority is None:
                st.authority = _text(v)

    @staticmethod
    def _response_fields(st: _OpenStream, headers: list[tuple[bytes, bytes]]) -> None:
        for k, v in headers:
            if k == b":status":
                if v.isdigit() and len(v) == 3:
                    code = int(v)
                    if code >= 200 or st.status is None:
                        st.status = code
            elif k == b"grpc-status":
                if v.isdigit() and len(v) <= 3:
                    st.grpc_status = int(v)
            elif k == b"grpc-message":
                st.grpc_message = unquote(_text(v), errors="replace")

    # --- frames -------------------------------------------------------------

    def _on_frame(self, side: _Side, frame: Frame, ts: int) -> None:
        """A whole non-DATA frame whose payload hyperframe parsed."""
        typ = side.frame_type
        if typ in (_HEADERS, _PUSH):
            assert isinstance(frame, HeadersFrame | PushPromiseFrame)
            sid = frame.stream_id
            side.block = bytearray(frame.data)
            side.block_stream = sid
            side.block_end_stream = typ == _HEADERS and "END_STREAM" in frame.flags
            side.block_lost = False
            side.block_push = typ == _PUSH
            side.block_ts = ts
            if "END_HEADERS" in frame.flags:
                self._end_block(side)
        elif typ == _CONT:
            assert isinstance(frame, ContinuationFrame)
            if side.block is None or frame.stream_id != side.block_stream:
                return  # its block started before a join or a loss
            if len(side.block) + len(frame.data) > self._cfg.max_header_block_bytes:
                self._fail("h2_headers_too_large")
                self._block_lost(side)
                if "END_HEADERS" in frame.flags:
                    self._end_block(side)
                return
            side.block += frame.data
            if "END_HEADERS" in frame.flags:
                self._end_block(side)
        elif typ == _RST:
            assert isinstance(frame, RstStreamFrame)
            st = self._stream(frame.stream_id, create=False)
            if st is not None:
                st.reset_code = frame.error_code
                st.reset_by = side.name
                self._finish(frame.stream_id, "reset", ts)
        elif typ == _SETTINGS:
            assert isinstance(frame, SettingsFrame)
            self._on_settings(side, frame)
        elif typ == _GOAWAY:
            assert isinstance(frame, GoAwayFrame)
            # Streams the sender's peer opened above last_stream_id were not processed
            # (RFC 9113 §6.8); gRPC streams are client-opened, so only a server GOAWAY counts.
            if side.name == "server":
                for sid in [s for s in self._open if s > frame.last_stream_id]:
                    self._finish(sid, "goaway", ts)
        # PRIORITY, PING, WINDOW_UPDATE and extension frames carry nothing a record needs.

    def _on_settings(self, side: _Side, frame: SettingsFrame) -> None:
        other = self._other(side)
        if "ACK" in frame.flags:
            # side acknowledges the other's SETTINGS: a new table bound now applies to
            # side's encoder, whose blocks follow this ACK in the same byte stream.
            if other.pending_table_sizes:
                size = other.pending_table_sizes.popleft()
                self._decoder(side).max_allowed_table_size = min(size, self._cfg.max_header_table_bytes)
            return
        announced = frame.settings.get(_SETTINGS_HEADER_TABLE_SIZE)
        if announced is not None:
            if len(side.pending_table_sizes) >= _MAX_PENDING_SETTINGS:
                side.pending_table_sizes.popleft()
            side.pending_table_sizes.append(announced)

    def _end_block(self, side: _Side) -> None:
        block = None if side.block_lost or side.block is None else bytes(side.block)
        sid, end_stream, ts, push = side.block_stream, side.block_end_stream, side.block_ts, side.block_push
        side.block = None
        side.block_lost = side.block_push = False
        if push:
            # Decoded only to keep the table in step with the encoder; gRPC never pushes.
            if block is not None:
                self._decode(side, block)
            return
        self._on_header_block(side, sid, block, end_stream, ts)

    def _block_lost(self, side: _Side) -> None:
        """The header block in progress cannot be decoded: its table updates are lost."""
        if side.block is not None and not side.block_lost:
            self._fail("h2_headers_lost")
        side.block_lost = True
        self._reset_decoder(side)
        side.degraded = True

    def _frame_payload_lost(self, side: _Side) -> None:
        """The payload of the current (non-DATA) frame was not captured."""
        typ = side.frame_type
        if typ in (_HEADERS, _PUSH, _CONT):
            if typ != _CONT:
                side.block = bytearray()
                side.block_stream = side.frame_stream
                side.block_end_stream = typ == _HEADERS and bool(side.frame_flags & _END_STREAM)
                side.block_ts = side.frame_ts
            if side.block is not None:
                self._block_lost(side)
                if side.frame_flags & _END_HEADERS:
                    self._end_block(side)
        elif typ == _RST:
            # The error code is lost but the reset, and who sent it, are not.
            st = self._open.get(side.frame_stream)
            if st is not None:
                st.reset_by = side.name
            self._finish(side.frame_stream, "reset", side.frame_ts)

    # --- reader states: each returns (position, whether to go on) -------------

    def _on_preface(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        avail = buf[pos : pos + len(PREFACE)]
        if avail == PREFACE:
            side.state = _HEAD
            return pos + len(PREFACE), True
        if PREFACE.startswith(avail):
            return pos, False
        side.state = _SYNC  # no preface: joined mid-connection (or not HTTP/2)
        return pos, True

    def _on_head(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        if len(buf) - pos < 9:
            return pos, False
        if side.block is not None and (buf[pos + 3] != _CONT or _stream_id(buf, pos) != side.block_stream):
            # RFC 9113 §6.10: nothing may interleave with a header block.
            self._fail("h2_continuation")
            self._block_lost(side)
            self._end_block(side)
        length, typ, flags, sid = _header(buf, pos)
        if length > self._cfg.max_frame_bytes:
            self._fail("h2_frame_too_large")
            self._lose_sync(side, "h2_frame_too_large")
            return pos, True
        side.frame_type, side.frame_flags, side.frame_stream, side.frame_len = typ, flags, sid, length
        side.frame_ts = ts
        pos += 9
        try:
            side.frame, _ = Frame.parse_frame_header(memoryview(buf)[pos - 9 : pos])
        except HyperframeError:
            # A stream id this type cannot have (RFC 9113 §6): the length still frames it.
            self._fail("h2_bad_frame")
            if typ in (_HEADERS, _PUSH, _CONT):
                self._frame_payload_lost(side)
            side.frame = None
            side.remaining, side.skip_then, side.state = length, -1, _SKIP
            if length == 0:
                self._after_skip(side)
            return pos, True
        if typ == _DATA:
            side.data_end_stream = bool(flags & _END_STREAM)
            side.data_pad = 0
            if flags & _PADDED:
                side.state = _DATA_PAD
            else:
                side.remaining = length
                side.state = _DATA_BODY
            self._data_started(side, ts)
        elif typ > _CONT:
            side.remaining, side.skip_then, side.state = length, -1, _SKIP  # extension frame
        elif typ in (_HEADERS, _PUSH, _CONT) and length > self._cfg.max_header_block_bytes:
            self._fail("h2_headers_too_large")
            self._frame_payload_lost(side)
            side.remaining, side.skip_then, side.state = length, -1, _SKIP
        else:
            side.state = _BODY
        if side.state == _SKIP and side.remaining == 0:
            self._after_skip(side)
        return pos, True

    def _on_body(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        end = pos + side.frame_len
        if len(buf) < end:
            return pos, False
        frame = side.frame
        side.state = _HEAD
        assert frame is not None
        try:
            frame.parse_body(memoryview(buf)[pos:end])
        except Exception:  # hyperframe's errors, and anything else it raises on hostile bytes
            self._fail("h2_bad_frame")
            self._frame_payload_lost(side)
            return end, True
        self._on_frame(side, frame, side.frame_ts)
        return end, True

    def _data_started(self, side: _Side, ts: int) -> None:
        if side.name == "server":
            st = self._stream_for_data(side)
            if st is not None and st.response_first_ns is None:
                st.response_first_ns = ts

    def _on_data_pad(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        if side.frame_len == 0:
            # PADDED without room for the pad length (RFC 9113 §6.1): nothing to read.
            self._fail("h2_bad_frame")
            self._data_lost(side)
            side.remaining, side.skip_then, side.state = 0, _DATA, _SKIP
            self._after_skip(side)
            return pos, True
        if pos >= len(buf):
            return pos, False
        pad = buf[pos]
        content = side.frame_len - 1 - pad
        if content < 0:
            self._fail("h2_bad_frame")
            # The flags still hold: an END_STREAM on it ends the stream.
            side.remaining, side.skip_then, side.state = side.frame_len - 1, _DATA, _SKIP
            self._data_lost(side)
        else:
            side.remaining = content
            side.state = _DATA_BODY
            side.data_pad = pad
        if side.remaining == 0:
            if side.state == _SKIP:
                self._after_skip(side)
            else:
                self._after_data_content(side)
        return pos + 1, True

    def _on_data_body(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        if side.remaining == 0:
            self._after_data_content(side)
            return pos, True
        avail = len(buf) - pos
        if avail <= 0:
            return pos, False
        take = min(avail, side.remaining)
        st = self._stream_for_data(side)
        if st is not None:
            if side.name == "client":
                st.request.feed(buf[pos : pos + take], ts)
                st.request_bytes += take
            else:
                st.response.feed(buf[pos : pos + take], ts)
                st.response_bytes += take
        side.remaining -= take
        if side.remaining == 0:
            self._after_data_content(side)
        return pos + take, True

    def _after_data_content(self, side: _Side) -> None:
        side.skip_then = _DATA
        side.remaining = side.data_pad
        side.state = _SKIP
        if side.remaining == 0:
            self._after_skip(side)

    def _data_lost(self, side: _Side) -> None:
        st = self._stream(side.frame_stream, create=False)
        if st is not None:
            (st.request if side.name == "client" else st.response).lose()

    def _on_skip(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        if side.remaining == 0:
            self._after_skip(side)
            return pos, True
        avail = len(buf) - pos
        if avail <= 0:
            return pos, False
        take = min(avail, side.remaining)
        side.remaining -= take
        if side.remaining == 0:
            self._after_skip(side)
        return pos + take, True

    def _after_skip(self, side: _Side) -> None:
        """The current frame's payload is consumed."""
        side.state = _HEAD
        if side.skip_then == _DATA and side.name == "server" and side.data_end_stream:
            self._finish(side.frame_stream, "end_stream", side.frame_ts)
        side.skip_then = -1

    def _on_sync(self, side: _Side, buf: bytes, pos: int, ts: int) -> tuple[int, bool]:
        """Find the first believable frame. A candidate that needs more bytes to be
        judged is held, but a later one already judged believable wins over it: a
        random length field often claims a long frame, and three believable frames
        in a row rarely hide inside another frame's payload."""
        n = len(buf)
        # Offsets in sync_pending / sync_scanned are relative to pos (the held tail).
        pending = [p for p in side.sync_pending if pos + p + 9 <= n]
        found = -1
        still: list[int] = []
        for p in pending:
            verdict = self._plausible_at(side, buf, pos + p)
            if verdict:
                found = pos + p
                break
            if verdict is None:
                still.append(p)
        scan = pos + side.sync_scanned
        search = self._sync_re.search
        while found < 0:
            # The expression finds candidate headers at C speed; most payload bytes
            # (zeros included) never reach the Python checks.
            m = search(buf, scan)
            if m is None or m.start() + 9 > n:
                # Positions with a whole header that did not match are settled; the
                # last 8 bytes are not (a partial header can fail to match yet).
                scan = max(scan, n - 8)
                break
            cand = m.start()
            verdict = self._plausible_at(side, buf, cand)
            if verdict:
                found = cand
            elif verdict is None:
                still.append(cand - pos)
            scan = cand + 1
        side.sync_pending = []
        side.sync_scanned = 0
        if found >= 0:
            self._skip(found - pos, side.reason)
            side.sync_skipped += found - pos
            self._synced(side)
            return found, True
        # Keep from the earliest undecided candidate, or the last 8 bytes (a header in
        # the making). A candidate is decided once a frame of resync_max_frame_bytes, one
        # of max_frame_bytes and a header follow it, so the buffer stays bounded.
        keep = pos + still[0] if still else max(pos, scan)
        side.sync_pending = [pos + p - keep for p in still]
        side.sync_scanned = max(scan, keep) - keep
        self._skip(keep - pos, side.reason)
        side.sync_skipped += keep - pos
        return keep, False

    def _synced(self, side: _Side) -> None:
        if side.sync_skipped and side.reason == "h2_join":
            # A join is a resync only when the capture did not start on a frame boundary.
            self._metrics.inc(_RESYNCS, 1, (("reason", "h2_join"),))
        side.sync_skipped = 0
        side.state = _HEAD
        side.reason = "h2_join"

    def _plausible_at(self, side: _Side, buf: bytes, pos: int) -> bool | None:
        """Whether a frame at ``pos`` is believable: it and the frames after it, up to
        ``_SYNC_CHAIN`` of them or the end of the bytes, look real. None when too few
        bytes have arrived to tell (a frame of sync_max_len, one of max_frame_bytes
        and a header)."""
        n = len(buf)
        for i in range(_SYNC_CHAIN):
            if pos == n and i >= 2:
                # Two frames ending exactly where the bytes end: captures are cut at
                # write boundaries, which frames usually are. One such frame is not
                # enough: reads cut anywhere, and some length field fits any cut.
                return True
            if pos + 9 > n:
                return None
            last = i == _SYNC_CHAIN - 1
            # Only the first frame is held to the resync bound: a believable frame
            # followed by a long one (a large message's DATA) is still a sync point.
            verdict = _plausible_frame(
                buf,
                pos,
                self._cfg.max_frame_bytes if i else side.sync_max_len,
                self._sid_limit(),
                first=i == 0,
            )
            if verdict is None and last:
                return True  # its payload is not needed to believe the chain
            if not verdict:
                return verdict
            pos += 9 + _header(buf, pos)[0]
        return True


@functools.lru_cache(maxsize=8)
def _sync_expression(max_len: int) -> re.Pattern[bytes]:
    """A prefilter for resync candidates: a frame header whose length is at most
    ``max_len`` and whose type, flags and stream id could start a resync (the
    rest of _plausible_frame is checked in Python). Never rejects a header that
    _plausible_frame would accept."""

    def flag_set(mask: int) -> bytes:
        return b"[" + b"".join(re.escape(bytes([f])) for f in range(256) if not f & ~mask) + b"]"

    nonzero_sid = rb"(?!\x00\x00\x00\x00)[\x00-\x7f]"
    zero_sid = rb"\x00\x00\x00\x00"
    kinds = [
        rb"\x00" + flag_set(_DEFINED_FLAGS[_DATA]) + nonzero_sid,
        rb"\x01" + flag_set(_DEFINED_FLAGS[_HEADERS]) + nonzero_sid,
        rb"[\x02\x03]\x00" + nonzero_sid,  # PRIORITY, RST_STREAM
        rb"\x04" + flag_set(_DEFINED_FLAGS[_SETTINGS]) + zero_sid,
        rb"\x05" + flag_set(_DEFINED_FLAGS[_PUSH]) + nonzero_sid,
        rb"\x06" + flag_set(_DEFINED_FLAGS[_PING]) + zero_sid,
        rb"\x07\x00" + zero_sid,  # GOAWAY
        rb"\x08\x00[\x00-\x7f]",  # WINDOW_UPDATE, on any stream
    ]
    if max_len <= 0xFFFF:
        length = b"\x00" + b"[\x00-" + re.escape(bytes([max_len >> 8])) + b"]."
    else:
        length = b"[\x00-" + re.escape(bytes([min(max_len >> 16, 0xFF)])) + b"].."
    return re.compile(length + b"(?:" + b"|".join(kinds) + b")", re.S)


def _stream_id(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF


def _header(buf: bytes, pos: int) -> tuple[int, int, int, int]:
    hi, lo, typ, flags, sid = _HEADER.unpack_from(buf, pos)
    return (hi << 8) | lo, typ, flags, sid & 0x7FFFFFFF


def _plausible_frame(buf: bytes, pos: int, max_len: int, max_sid: int, *, first: bool) -> bool | None:
    """RFC 9113 §6 rules a real frame satisfies, plus what real peers never send
    (empty DATA without END_STREAM, empty header blocks). Strict enough that
    payload bytes, zeros above all, rarely pass three times in a row. None when
    the payload needed to tell has not arrived."""
    hi, lo, typ, flags, sid = _HEADER.unpack_from(buf, pos)
    length = (hi << 8) | lo
    if typ > _CONT or sid > max_sid or length > max_len or flags & ~_DEFINED_FLAGS[typ]:
        return False  # (the reserved bit makes sid exceed any max_sid too)
    if length == 0 and (typ in (_HEADERS, _CONT, _PUSH) or (typ == _DATA and not flags & _END_STREAM)):
        return False
    if typ in (_SETTINGS, _PING, _GOAWAY):
        if sid != 0:
            return False
    elif typ != _WINDOW and (sid == 0 or sid % 2 == 0):
        return False  # streams are client-opened (odd); gRPC never pushes
    if typ == _SETTINGS:
        return length % 6 == 0 and (length == 0 or not flags & 1)
    if typ == _PING:
        return length == 8
    if typ == _WINDOW:
        if length != 4:
            return False
        if pos + 13 > len(buf):
            return None
        return int.from_bytes(buf[pos + 9 : pos + 13], "big") & 0x7FFFFFFF != 0  # 0 is an error
    if typ == _RST:
        return length == 4
    if typ == _PRIORITY:
        return length == 5
    if typ == _GOAWAY:
        return length >= 8
    if typ == _CONT:
        return not first  # a continuation's block began before the resync point
    return True


def _text(v: bytes) -> str:
    return v[:_MAX_FIELD_CHARS].decode("utf-8", "replace")
