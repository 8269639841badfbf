"""Request assembly: socket-probe events in, one :class:`Request` per request out.

The kernel (probes/sockets.bpf.c) splits each connection into request phases
and sends, per phase: the request-direction syscalls (bounded head and tail of
each), the first ``sample_writes`` response writes (``late_sample_writes`` for the APIs
whose streams open with several events carrying no output), and for longer responses a
summary with counts, times and the last writes' tails (with the first write past
the samples, once the last writes no longer include it). This module feeds those
captures through the sans-IO parsers (http1, sse, ndjson) and the LLM API
extraction (llm), and builds the record.

Timing definitions (README "Timing definitions"):
- start: the first request byte read by the server (exit of that read);
- end: the last response byte written;
- TTFT: start → the write that completed the first stream event carrying output
  (a role-only first event does not count);
- time per output token: (last output event - first output event) / (output
  events - 1);
- aborted: the client closed (or reset) before the response ended.

Output events are counted exactly over the sampled writes and the tail ring;
writes between the two, which the kernel only counted, are taken as one output
event each (servers write one stream event per write). When no sampled write
carried output, the first write past the samples, which the summary keeps, is
read as one more sample before that count.

Accounting: every request phase the kernel counted ends as exactly one of: a
record, or a counted loss (``infersight.requests.lost`` by reason).

Threading: one owner thread calls every method except :meth:`active`, which
may be called from any thread (it copies the in-flight table, never mutates it).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from agent import http1, llm
from agent.clock import Clock
from agent.h2wire import H2Tracker, stream_request
from agent.http2 import H2Stream
from agent.ndjson import NDJSONParser
from agent.procfs import SocketTable, parse_sockaddr, socket_inode
from agent.record import ActiveRequest, Request, SpanIds
from agent.selfmetrics import SELF_METRICS, SelfMetrics
from agent.sse import SSEParser
from probes.socket_events import (
    CF_FOREIGN,
    CF_LATE_OUTPUT,
    CF_PEER_EOF,
    CF_READ_ERR,
    CF_TERMINATED,
    CF_WRITE_ERR,
    CS_PEERNAME,
    CS_SOCKNAME,
    DF_NO_PAYLOAD,
    DIR_IN,
    PK_EXEC,
    PK_EXIT,
    ROLE_CLIENT,
    ROLE_SERVER,
    SR_CLOSE,
    SR_NEXT_REQUEST,
    SR_TERMINATED,
    ConnEvent,
    DataEvent,
    Decoder,
    H2Event,
    ProcEvent,
    SummaryEvent,
    TailSlot,
)

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
LOST: Final = "infersight.requests.lost"


@dataclass(frozen=True)
class AssemblyConfig:
    """Bounds of request assembly."""

    sample_writes: int = 3
    """Response writes per request the probe sends in full (must match the probe)."""
    late_sample_writes: int = 8
    """As ``sample_writes``, for the requests the probe marks ``CF_LATE_OUTPUT`` (must match)."""
    tail_slots: int = 8
    """Tail ring size of the probe (must match the probe)."""
    max_connections: int = 65536
    """Connections with assembly state; the least recently active is evicted (counted)."""
    max_body_capture: int = 16384
    """Request and response body bytes kept for metadata extraction."""
    idle_check_s: float = 30.0
    """An open request without news for this long is checked against the kernel's map."""
    client_spans: bool = False
    """Emit records for connections the targets opened (span_kind client)."""
    max_h2_connections: int = 4096
    """HTTP/2 connections with stream state; the least recently active is evicted (counted)."""


class Exchange:
    """One request/response phase of a connection."""

    __slots__ = (
        "api",
        "complete",
        "damaged",
        "done",
        "end_ns",
        "error_reported",
        "events_output",
        "finish_reasons",
        "first_output_ns",
        "input_tokens",
        "last_news_ns",
        "last_output_ns",
        "max_sample_index",
        "method",
        "output_tokens",
        "path",
        "req_gap",
        "req_model",
        "req_prefix",
        "req_stream",
        "req_suffix",
        "resp_coding",
        "resp_gap",
        "resp_head_seen",
        "resp_model",
        "resp_prefix",
        "resp_suffix",
        "sampled_bytes",
        "seq",
        "start_ns",
        "status",
        "stream",
        "streaming",
        "traceparent",
        "writes",
    )

    def __init__(self, seq: int, start_ns: int) -> None:
        self.seq = seq
        self.start_ns = start_ns
        self.last_news_ns = start_ns
        self.method: str | None = None
        self.path: str | None = None
        self.traceparent: str | None = None
        self.api: llm.Api | None = None
        self.req_prefix = b""  # bytes: a body read whole is kept without a copy
        self.req_suffix = b""
        self.req_gap = False
        self.req_model: str | None = None
        self.req_stream: bool | None = None
        self.status: int | None = None
        self.resp_head_seen = False
        self.resp_coding: str | None = None  # the response's Content-Encoding, when it has one
        self.streaming = False
        self.stream: SSEParser | NDJSONParser | None = None
        self.resp_prefix = b""
        self.resp_suffix = b""
        self.resp_gap = False
        self.writes: dict[int, int] = {}  # sampled write index -> ts
        self.sampled_bytes = 0
        self.max_sample_index = -1
        self.events_output = 0
        self.first_output_ns: int | None = None
        self.last_output_ns: int | None = None
        self.resp_model: str | None = None
        self.finish_reasons: list[str] = []
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.error_reported = False  # the body (an event, or a whole body) reports the server's error
        self.complete = False
        self.damaged = False
        self.done = False
        self.end_ns: int | None = None


class Conn:
    __slots__ = (
        "client_addr",
        "client_port",
        "conn_id",
        "cur",
        "fd",
        "h2",
        "inode",
        "last_seq",
        "listen_fd",
        "req_parser",
        "resp_parser",
        "role",
        "server_port",
        "tgid",
    )

    def __init__(self, conn_id: int, tgid: int, fd: int, role: int) -> None:
        self.conn_id = conn_id
        self.tgid = tgid
        self.fd = fd
        self.role = role
        self.inode: int | None = None
        self.listen_fd = -1
        self.server_port: int | None = None
        self.client_addr: str | None = None
        self.client_port: int | None = None
        self.cur: Exchange | None = None
        self.h2 = False  # the kernel sends this connection as HTTP/2 frames
        self.last_seq = 0
        self.req_parser: http1.H1Parser | None = None
        self.resp_parser: http1.H1Parser | None = None


class Assembler:
    """Builds records from decoded socket-probe events.

    ``emit`` receives each completed :class:`Request`. ``process_name(pid)``
    names processes; ``conn_alive(pid, fd, conn_id)`` asks the kernel whether a
    connection still exists (for requests whose close was lost); ``sockets``
    resolves addresses from /proc. All are injected so tests can run without a
    kernel.
    """

    def __init__(
        self,
        config: AssemblyConfig,
        emit: Callable[[Request], None],
        *,
        clock: Clock,
        decoder: Decoder,
        process_name: Callable[[int], str | None] = lambda pid: None,
        conn_alive: Callable[[int, int, int], bool] | None = None,
        sockets: SocketTable | None = None,
        proc: str = "/proc",
        metrics: SelfMetrics = SELF_METRICS,
        on_proc_event: Callable[[ProcEvent], None] | None = None,
        whole_event_writes: bool = True,
        native_ring: bool = True,
        native_heads: bool = True,
    ) -> None:
        """``whole_event_writes``: read a response write that is one chunk holding one whole SSE
        event (a ``data:`` event, or for the typed-event APIs a named one) or NDJSON line in one
        step, where agent/_llmjson.c is built (False: always through
        the HTTP/1 and SSE or NDJSON parsers, the reading the tests compare it against).
        ``native_ring``: read a decoded summary's tail ring in C, where agent/_llmjson.c is
        built (False: always with :meth:`_walk_ring`, its reference). ``native_heads``: read
        HTTP/1 heads with agent/_httphead.c, a whole request or a framed response's head
        without the parser's events (False: always with the parser's Python reading)."""
        self.config = config
        self._native_heads = native_heads
        self._whole_event_writes = whole_event_writes and llm.NATIVE_JSON
        self._native_ring = native_ring and llm.NATIVE_JSON
        self._emit = emit
        self._clock = clock
        self._decoder = decoder
        self._process_name = process_name
        self._conn_alive = conn_alive
        self._sockets = sockets
        self._proc = proc
        self._metrics = metrics
        self._on_proc_event = on_proc_event
        self._conns: OrderedDict[int, Conn] = OrderedDict()
        self._gone: OrderedDict[int, None] = OrderedDict()
        self._by_fd: dict[tuple[int, int], int] = {}
        self._listen_ports: dict[tuple[int, int], int | None] = {}
        self._names: dict[int, str] = {}
        self._active: dict[int, tuple[Conn, Exchange]] = {}
        self._seed_ids = iter(range(1 << 62, 1 << 63))
        self._h2 = H2Tracker(
            max_conns=config.max_h2_connections,
            h2_cap=decoder.layout.h2_cap,
            on_evict=self._h2_evicted,
            metrics=metrics,
        )

    # ---- input -------------------------------------------------------------------
    def feed(self, batch: bytes) -> int:
        """Process a batch of ring buffer records (packed: ``probes.socket_events.pack``), in
        order, a few records read at a time. Returns the number of records it held (a cut last
        one included)."""
        decoder = self._decoder  # its method called directly: a bound method is a call through Python
        n = off = 0
        end = len(batch)
        while off < end:
            evs, off = decoder.decode_some(batch, off)
            n += len(evs)
            for ev in evs:
                if isinstance(ev, DataEvent):
                    self._on_data(ev)
                elif isinstance(ev, SummaryEvent):
                    self._on_summary(ev)
                elif isinstance(ev, H2Event):
                    self._on_h2(ev)
                elif isinstance(ev, ConnEvent):
                    self._on_conn(ev)
                elif isinstance(ev, ProcEvent):
                    self._on_proc(ev)
                else:
                    self._metrics.inc("infersight.parse.failures", labels=(("reason", "decode"),))
                    log.debug("undecodable record: %s", ev)
        return n

    def next_seed_id(self) -> int:
        return next(self._seed_ids)

    def register_conn(
        self,
        conn_id: int,
        tgid: int,
        fd: int,
        role: int,
        server_port: int | None,
        client_addr: str | None,
        client_port: int | None,
    ) -> None:
        """Connection state for a socket seeded from /proc at attach time."""
        c = self._new_conn(conn_id, tgid, fd, role)
        c.server_port = server_port
        c.client_addr = client_addr
        c.client_port = client_port

    # ---- connection bookkeeping ---------------------------------------------------
    def _new_conn(self, conn_id: int, tgid: int, fd: int, role: int) -> Conn:
        old_id = self._by_fd.get((tgid, fd))
        if old_id is not None and old_id != conn_id:
            # the fd was reused: the old connection closed without us seeing it
            old = self._conns.get(old_id)
            if old is not None:
                self._forget(old)
                self._abandon(old, "close_lost")
        c = Conn(conn_id, tgid, fd, role)
        self._conns[conn_id] = c
        self._by_fd[(tgid, fd)] = conn_id
        if len(self._conns) > self.config.max_connections:
            evicted = next(iter(self._conns.values()))
            self._forget(evicted)
            self._metrics.inc("infersight.assembly.evictions", labels=(("what", "connection"),))
            self._abandon(evicted, "evicted")
        return c

    def _conn_for(self, conn_id: int, tgid: int, fd: int, role: int) -> Conn:
        c = self._conns.get(conn_id)
        if c is None:
            # EV_CONN lost or the socket predates us: build state from /proc
            c = self._new_conn(conn_id, tgid, fd, role)
            c.inode = socket_inode(tgid, fd, self._proc)
        else:
            self._conns.move_to_end(conn_id)
        return c

    def _on_conn(self, ev: ConnEvent) -> None:
        if ev.source in (CS_PEERNAME, CS_SOCKNAME):
            c0 = self._conns.get(ev.conn_id)
            addr = parse_sockaddr(ev.addr) if ev.addr else None
            if c0 is None or addr is None:
                return
            # peer of a server connection / local end of a client one: the client
            if (ev.source == CS_PEERNAME) == (c0.role == ROLE_SERVER):
                c0.client_addr, c0.client_port = addr
            else:
                c0.server_port = addr[1]
            return
        c = self._new_conn(ev.conn_id, ev.tgid, ev.fd, ev.role)
        c.listen_fd = ev.listen_fd
        addr = parse_sockaddr(ev.addr) if ev.addr else None
        if addr is not None:
            if ev.role == ROLE_SERVER:
                c.client_addr, c.client_port = addr
            else:
                c.server_port = addr[1]
        if c.client_addr is None or c.server_port is None:
            c.inode = socket_inode(ev.tgid, ev.fd, self._proc)

    def _resolve_addresses(self, c: Conn, final: bool = False) -> None:
        if c.role == ROLE_SERVER and c.server_port is None and c.listen_fd >= 0:
            key = (c.tgid, c.listen_fd)
            if key not in self._listen_ports and self._sockets is not None:
                ino = socket_inode(c.tgid, c.listen_fd, self._proc)
                info = self._sockets.lookup(c.tgid, ino) if ino else None
                self._listen_ports[key] = info.local_port if info else None
                if len(self._listen_ports) > 4096:
                    self._listen_ports.clear()
            c.server_port = self._listen_ports.get(key)
        if (c.client_addr is None or c.server_port is None) and c.inode and self._sockets is not None:
            info = self._sockets.lookup(c.tgid, c.inode)
            if info is not None:
                if c.role == ROLE_SERVER:
                    c.server_port = c.server_port or info.local_port
                    c.client_addr = c.client_addr or info.remote_addr
                    c.client_port = c.client_port or info.remote_port
                else:
                    c.server_port = c.server_port or info.remote_port
                    c.client_addr = c.client_addr or info.local_addr
                    c.client_port = c.client_port or info.local_port
                c.inode = None
            elif final:
                self._metrics.inc("infersight.assembly.address.unresolved")
                c.inode = None  # two tries per connection: at its first request, and at its end

    def _on_proc(self, ev: ProcEvent) -> None:
        if ev.kind == PK_EXIT:
            for c in [c for c in self._conns.values() if c.tgid == ev.tgid]:
                self._forget(c, ev.ts_ns)
                if c.cur is not None and not c.cur.done:
                    self._finish(c, c.cur, None, process_exited=True)
            self._names.pop(ev.tgid, None)
        elif ev.kind == PK_EXEC:
            self._names.pop(ev.tgid, None)  # a new program name
        if self._on_proc_event is not None:
            self._on_proc_event(ev)

    def _name(self, tgid: int) -> str:
        n = self._names.get(tgid)
        if n is None:
            n = self._process_name(tgid) or ""
            if len(self._names) > 4096:
                self._names.clear()
            self._names[tgid] = n
        return n

    # ---- data --------------------------------------------------------------------
    def _on_data(self, ev: DataEvent) -> None:
        c = self._conn_for(ev.conn_id, ev.tgid, ev.fd, ev.role)
        is_req = (ev.dir == DIR_IN) == (c.role != ROLE_CLIENT)
        if ev.lost and c.cur is not None and not c.cur.done:
            c.cur.damaged = True
        if is_req:
            ex = c.cur
            if ex is None or ex.seq != ev.seq:
                if ex is not None and not ex.done:
                    # the previous response ended when this request began
                    self._finish(c, ex, None, next_request=True)
                ex = Exchange(ev.seq, ev.ts_ns)
                c.cur = ex
                c.last_seq = ev.seq
                if ev.index != 0:
                    ex.damaged = True  # the request's first read was lost
                if c.req_parser is None:
                    c.req_parser = http1.H1Parser("request", metrics=self._metrics, native_head=self._native_heads)
                if c.server_port is None or c.client_addr is None:
                    self._resolve_addresses(c)
            elif ex.done:
                return
            ex.last_news_ns = ev.ts_ns
            self._feed_request(c, ex, ev)
            return
        ex = c.cur
        if ex is None or ex.seq != ev.seq:
            if ev.seq > c.last_seq:
                # a response whose request records were all lost: the phase is
                # seen now, and will be counted lost when it ends
                if ex is not None and not ex.done:
                    self._finish(c, ex, None, next_request=True)
                ex = Exchange(ev.seq, ev.ts_ns)
                ex.damaged = True
                c.cur = ex
                c.last_seq = ev.seq
            else:
                self._metrics.inc("infersight.assembly.orphan.writes")
            return
        if ex.done:
            self._metrics.inc("infersight.assembly.orphan.writes")
            return
        ex.last_news_ns = ev.ts_ns
        self._feed_response(c, ex, ev)

    def _feed_request(self, c: Conn, ex: Exchange, ev: DataEvent) -> None:
        p = c.req_parser
        assert p is not None
        if not ev.flags & DF_NO_PAYLOAD and not ev.tail and len(ev.head) == ev.len:
            # the whole read, without the parser's events: a request read at once (the common
            # case), or more of a Content-Length body
            if ex.method is None and (got := p.take_request_head(ev.head)) is not None:
                self._request_head(c, ex, got[0], got[1], got[2])
                if got[3]:
                    self._request_body(ex, got[3])
                return
            if p.take_body(ev.head) is not None:
                self._request_body(ex, ev.head)
                return
        if ev.flags & DF_NO_PAYLOAD:
            p.feed_gap(ev.len)
        else:
            if ev.head:
                p.feed(ev.head)
            gap = ev.gap
            if gap:
                p.feed_gap(gap)
            if ev.tail:
                p.feed(ev.tail)
        while True:
            e = p.next_event()
            if e is http1.NEED_DATA:
                break
            if isinstance(e, http1.RequestHead):
                if ex.method is not None:
                    # a pipelined second request in the same phase: its timing is
                    # shared with the first; it is parsed on the next phase's data
                    self._metrics.inc("infersight.assembly.pipelined")
                    continue
                self._request_head(c, ex, e.method, e.target, http1.header(e.headers, "traceparent"))
            elif isinstance(e, http1.Body):
                self._request_body(ex, e.data)
            elif isinstance(e, http1.BodyGap):
                ex.req_gap = True

    def _request_head(self, c: Conn, ex: Exchange, method: str, target: str, traceparent: str | None) -> None:
        ex.method = method
        q = target.find("?")
        ex.path = path = target if q < 0 else target[:q]
        ex.traceparent = traceparent
        ex.api = llm.classify(method, path)
        self._set_active(c, ex)

    def _request_body(self, ex: Exchange, data: bytes) -> None:
        if ex.api is not None:  # kept only for an LLM API's fields (_finish)
            ex.req_prefix, ex.req_suffix = _kept(ex.req_prefix, ex.req_suffix, ex.req_gap, data,
                                                 self.config.max_body_capture)

    def _feed_response(self, c: Conn, ex: Exchange, ev: DataEvent) -> None:
        if c.resp_parser is None:
            c.resp_parser = http1.H1Parser("response", metrics=self._metrics, native_head=self._native_heads)
        p = c.resp_parser
        if ev.index == 0 or not ex.writes:
            p.expect_response_to(ex.method or "GET")
        ex.writes[ev.index] = ev.ts_ns
        ex.sampled_bytes += ev.len
        ex.max_sample_index = max(ex.max_sample_index, ev.index)
        ts = ev.ts_ns
        whole = not ev.tail and len(ev.head) == ev.len  # the write's bytes all captured
        if ev.flags & DF_NO_PAYLOAD:
            p.feed_gap(ev.len)
            self._drain_response(ex, p, ts)
        elif not ex.resp_head_seen and whole and (got := p.take_response_head(ev.head)) is not None:
            # the head of a framed response (the common case), without the parser's events
            self._response_head(ex, got[1], got[2])
            if got[0] < len(ev.head):
                p.feed(ev.head[got[0]:])
                self._drain_response(ex, p, ts)
        elif whole and (ended := p.take_body(ev.head)) is not None:
            # more of a Content-Length body (a JSON answer written after its head), without the
            # parser's events
            self._response_body(ex, ev.head, ts)
            if ended:
                self._response_end(ex, True, ts)
        elif (
            self._whole_event_writes
            and whole
            and p.at_chunk_start()
            and (obj := _one_event(ex.stream, ev.head)) is not None
        ):
            # One chunk holding one whole event (how servers stream): read in one step; the
            # HTTP/1 and SSE or NDJSON parsers are left as feeding it would leave them
            self._stream_event(ex, obj, False, ts)
        elif (
            self._whole_event_writes
            and whole
            and ex.api in llm.TYPED_APIS
            and p.at_chunk_start()
            and (named := _one_named_event(ex.stream, ev.head)) is not None
        ):
            # the same for a named event of the typed-event APIs, one per write as they stream
            assert ex.api is not None
            self._typed_event(ex, ex.api, named[0], named[1], ts)
        else:
            if ev.head:
                p.feed(ev.head)
                self._drain_response(ex, p, ts)
            gap = ev.gap
            if gap:
                p.feed_gap(gap)
                self._drain_response(ex, p, ts)
            if ev.tail:
                p.feed(ev.tail)
                self._drain_response(ex, p, ts)
        if ex.complete and not ex.done:
            ex.end_ns = ts
            self._finish(c, ex, None)

    def _drain_response(self, ex: Exchange, p: http1.H1Parser, ts: int) -> None:
        while True:
            e = p.next_event()
            if e is http1.NEED_DATA:
                return
            if isinstance(e, http1.ResponseHead):
                if e.status < 200 and e.status != 101:
                    continue  # informational: the final response follows
                self._response_head(ex, e.status, http1.header(e.headers, "content-type"))
                ex.resp_coding = http1.header(e.headers, "content-encoding")
            elif isinstance(e, http1.Body):
                self._response_body(ex, e.data, ts)
            elif isinstance(e, http1.BodyGap):
                if ex.stream is not None:
                    ex.stream.feed_gap(e.n)
                else:
                    ex.resp_gap = True
            elif isinstance(e, http1.EndOfMessage):
                self._response_end(ex, e.complete, ts)
            elif isinstance(e, http1.Upgrade):
                ex.complete = True

    def _response_body(self, ex: Exchange, data: bytes, ts: int) -> None:
        if ex.stream is not None:
            self._stream_events(ex, ex.stream.feed(data), ts)
        elif ex.api is not None:  # kept only for an LLM API's fields (_finish)
            ex.resp_prefix, ex.resp_suffix = _kept(ex.resp_prefix, ex.resp_suffix, ex.resp_gap, data,
                                                   self.config.max_body_capture)

    @staticmethod
    def _response_end(ex: Exchange, complete: bool, ts: int) -> None:
        if ex.resp_head_seen:
            ex.complete = complete
            if ex.end_ns is None:
                ex.end_ns = ts

    @staticmethod
    def _response_head(ex: Exchange, status: int, content_type: str | None) -> None:
        ex.status = status
        ex.resp_head_seen = True
        if content_type:
            ctype = content_type.lower()
            if "text/event-stream" in ctype:
                ex.stream = SSEParser()
                ex.streaming = True
            elif "ndjson" in ctype or "jsonlines" in ctype:
                ex.stream = NDJSONParser()
                ex.streaming = True

    def _stream_events(self, ex: Exchange, events: list, ts: int) -> None:
        api = ex.api
        if api is not None and api in llm.TYPED_APIS and isinstance(ex.stream, SSEParser):
            for se in events:
                if se.event is not None and not se.truncated:
                    self._typed_event(ex, api, se.event.encode(), se.data, ts)
                else:
                    self._stream_event(ex, se.data, se.truncated, ts)
            return
        for se in events:
            self._stream_event(ex, se.data, se.truncated, ts)

    def _typed_event(self, ex: Exchange, api: llm.Api, name: bytes, data: bytes, ts: int) -> None:
        """One whole event of a typed-event API (Responses, Messages): read from its name where
        that says what it holds (:func:`llm.typed_event`), else decoded."""
        info = llm.typed_event(api, name, data)
        if info is None:
            self._stream_event(ex, data, False, ts)
            return
        self._merge_info(ex, info)
        if info.output:
            self._count_output(ex, ts)

    @staticmethod
    def _count_output(ex: Exchange, ts: int) -> None:
        ex.events_output += 1
        if ex.first_output_ns is None:
            ex.first_output_ns = ts
        ex.last_output_ns = ts

    def _stream_event(self, ex: Exchange, data: bytes, truncated: bool, ts: int) -> None:
        api = ex.api
        if api is None:
            output: bool | None = True  # generic SSE/NDJSON: every event is output
        elif not truncated and (got := llm.openai_event(api, data)) is not None:
            # what parse_stream_event would say, without its EventInfo
            self._merge_fields(ex, got[1], got[2], got[3], got[4])
            output = got[0]
        else:
            info = llm.parse_stream_event(api, data, truncated)
            self._merge_info(ex, info)
            output = info.output
            if output is None:
                output = not (info.done or info.finish_reasons or info.output_tokens is not None)
        if output:
            self._count_output(ex, ts)

    @staticmethod
    def _merge_info(ex: Exchange, info: llm.EventInfo) -> None:
        if info.model and ex.resp_model is None:
            ex.resp_model = info.model
        for r in info.finish_reasons:
            if r not in ex.finish_reasons and len(ex.finish_reasons) < 16:
                ex.finish_reasons.append(r)
        if info.input_tokens is not None:
            ex.input_tokens = info.input_tokens
        if info.output_tokens is not None:
            ex.output_tokens = info.output_tokens
        if info.error:
            ex.error_reported = True

    # ---- HTTP/2 -----------------------------------------------------------------
    def _on_h2(self, ev: H2Event) -> None:
        c = self._conn_for(ev.conn_id, ev.tgid, ev.fd, ev.role)
        c.h2 = True
        for s in self._h2.feed(ev):
            self._h2_record(c, s)

    def _h2_evicted(self, conn_id: int, streams: list[H2Stream]) -> None:
        c = self._conns.get(conn_id)
        if c is not None:
            for s in streams:
                self._h2_record(c, s)

    def _h2_record(self, c: Conn, s: H2Stream) -> None:
        if c.role == ROLE_CLIENT and not self.config.client_spans:
            self._metrics.inc("infersight.assembly.client.requests.ignored")
            return
        if c.inode is not None:
            self._resolve_addresses(c, final=True)
        rec = stream_request(
            s,
            pid=c.tgid,
            command=self._name(c.tgid),
            span_kind="server" if c.role == ROLE_SERVER else "client",
            server_port=c.server_port,
            client_address=c.client_addr,
            client_port=c.client_port,
            to_unix_ns=self._clock.to_unix_ns,
            metrics=self._metrics,
        )
        if rec is not None:
            self._emit(rec)

    # ---- summaries and completion -----------------------------------------------
    def _on_summary(self, ev: SummaryEvent) -> None:
        c0 = self._conns.get(ev.conn_id)
        if c0 is not None and c0.h2:
            if ev.reason == SR_CLOSE:
                self._forget(c0, ev.ts_ns, lost=ev.lost)
            return
        if ev.flags & CF_FOREIGN:
            self._metrics.inc("infersight.assembly.foreign.summaries")
            return
        c = self._conns.get(ev.conn_id)
        if c is None:
            if ev.seq and ev.conn_id not in self._gone:
                # the first record of this phase to arrive: the rest were lost
                self._metrics.inc(LOST, 1, (("reason", "capture_lost"),))
                self._remember_gone(ev.conn_id)
            return
        ex = c.cur
        if ev.seq > c.last_seq:
            if ex is not None and not ex.done:
                self._finish(c, ex, None, next_request=True)
            self._metrics.inc(LOST, 1, (("reason", "capture_lost"),))
            c.last_seq = ev.seq
            ex = None
        if ex is not None and ex.seq == ev.seq and not ex.done:
            if ev.lost:
                ex.damaged = True
            self._finish(c, ex, ev)
        if ev.reason == SR_CLOSE:
            self._forget(c)

    def _forget(self, c: Conn, ts_ns: int | None = None, lost: int = 0) -> None:
        if c.h2 and self._h2.has(c.conn_id):
            # closed (seen or not), evicted or its process exited: its open streams end here
            for s in self._h2.close(c.conn_id, time.monotonic_ns() if ts_ns is None else ts_ns, lost=lost):
                self._h2_record(c, s)
        self._conns.pop(c.conn_id, None)
        if self._by_fd.get((c.tgid, c.fd)) == c.conn_id:
            self._by_fd.pop((c.tgid, c.fd), None)
        self._remember_gone(c.conn_id)

    def _remember_gone(self, conn_id: int) -> None:
        # connections already accounted for: a late summary must not count twice
        self._gone[conn_id] = None
        if len(self._gone) > 4096:
            self._gone.popitem(last=False)

    def _abandon(self, c: Conn, reason: str) -> None:
        if c.cur is not None and not c.cur.done:
            c.cur.done = True
            self._clear_active(c)
            self._metrics.inc(LOST, 1, (("reason", reason),))

    def _finish(
        self,
        c: Conn,
        ex: Exchange,
        s: SummaryEvent | None,
        *,
        next_request: bool = False,
        process_exited: bool = False,
    ) -> None:
        ex.done = True
        self._clear_active(c)
        p = c.resp_parser
        if s is not None and p is not None and ex.resp_head_seen and not ex.complete:
            # The writes the kernel only counted still went through the stream:
            # skip them in the parser (which keeps Content-Length framing across
            # the gap, and stays aligned for the connection's next response), and
            # end a read-to-close body at close. A chunked body whose terminator the
            # kernel saw at the end of its last write ends there, framing kept.
            if not (s.flags & CF_TERMINATED and p.end_chunked()):
                unseen = s.bytes_out - ex.sampled_bytes
                if unseen > 0:
                    p.feed_gap(unseen)
                if s.reason == SR_CLOSE:
                    p.close()
            self._drain_response(ex, p, s.resp_last_ns or s.ts_ns)
        if ex.method is None or ex.damaged:
            reason = "capture_lost" if ex.damaged else "request_unparsed"
            self._metrics.inc(LOST, 1, (("reason", reason),))
            return
        if c.role == ROLE_CLIENT and not self.config.client_spans:
            self._metrics.inc("infersight.assembly.client.requests.ignored")
            return
        sample = self.config.late_sample_writes if s is not None and s.flags & CF_LATE_OUTPUT \
            else self.config.sample_writes
        total_writes = len(ex.writes)
        flags = 0
        # ---- the tail ring: writes the kernel aggregated
        ring_n = 0
        ring_first_ts = 0
        walked: tuple[int, int, int | None, int | None] | None = None
        if s is not None:
            total_writes = s.writes
            flags = s.flags
            lo = max(sample, s.writes - self.config.tail_slots)
            if (ex.streaming and ex.first_output_ns is None and lo > sample
                    and ex.max_sample_index + 1 == sample and s.slots):
                self._late_sample(ex, s, sample)
            api = ex.api
            if self._native_ring and api is not None and s.slots:
                # the ring read in C, straight from the record; None leaves it to the walk below
                got = llm.ring_walk(api, s.raw, s.slots, lo, s.writes, sample, ex.max_sample_index + 1,
                                    ex.first_output_ns is not None)
                if got is not None:
                    ring_n, _, ring_first_ts, unseen, outputs, first, last, model, reasons, tin, tout = got
                    walked = (unseen, outputs, first, last)
                    self._merge_fields(ex, model, reasons, tin, tout)
            if walked is None:
                ring = s.ring  # the decoder gives write order
                if ring and (ring[0].index < lo or ring[-1].index >= s.writes):
                    ring = tuple([t for t in ring if lo <= t.index < s.writes])
                if ring:
                    ring_n = len(ring)
                    ring_first_ts = ring[0].ts_ns
                walked = self._walk_ring(ex, ring, total_writes, sample)
            if s.writes > ex.max_sample_index + 1 and not ring_n and s.writes > sample:
                self._metrics.inc("infersight.assembly.tails.missing")
        else:
            walked = self._walk_ring(ex, (), total_writes, sample)
        unseen_mid, ring_outputs, ring_first_output, ring_last_output = walked
        # ---- completion and end time
        complete = ex.complete or bool(flags & CF_TERMINATED) or next_request
        if s is not None and not complete and s.reason in (SR_TERMINATED, SR_NEXT_REQUEST):
            complete = True
        end_ns = ex.end_ns
        if s is not None and s.resp_last_ns:
            end_ns = max(end_ns or 0, s.resp_last_ns)
        if end_ns is None and ex.writes:
            end_ns = max(ex.writes.values())
        peer_gone = bool(flags & (CF_PEER_EOF | CF_READ_ERR | CF_WRITE_ERR))
        aborted = not complete and peer_gone
        if end_ns is None:
            end_ns = (s.eof_ns or s.ts_ns) if s is not None else ex.last_news_ns
        if aborted and s is not None and s.eof_ns:
            end_ns = max(end_ns, s.eof_ns)
        error_type: str | None = None
        if not complete and not aborted:
            error_type = "process_exit" if process_exited else (
                "no_response" if ex.status is None else "response_incomplete"
            )
        # ---- streaming metrics
        output_events: int | None = None
        ttft_ns: int | None = None
        tpot_s: float | None = None
        first_out = ex.first_output_ns
        last_out = ex.last_output_ns
        if ex.streaming:
            output_events = ex.events_output + unseen_mid + ring_outputs
            if first_out is None:
                if unseen_mid == 0 and ring_first_output is not None:
                    first_out = ring_first_output
                elif output_events:
                    self._metrics.inc("infersight.assembly.ttft.unresolved")
            if ring_last_output is not None:
                last_out = ring_last_output
            elif unseen_mid and ring_n:
                # the last output write went unseen; the first write after it bounds it
                last_out = ring_first_ts
            if first_out is not None:
                ttft_ns = first_out - ex.start_ns
                if last_out is not None and output_events and output_events >= 2:
                    tpot_s = max(0, last_out - first_out) / 1e9 / (output_events - 1)
        elif ex.api is not None and ex.status is not None:
            prefix, suffix = ex.resp_prefix, ex.resp_suffix if ex.resp_gap else None
            if ex.resp_coding is not None:
                prefix, suffix = self._decoded(ex.resp_coding, prefix), None
            info = llm.parse_response_body(ex.api, prefix, suffix)
            self._merge_info(ex, info)
        if error_type is None and ex.error_reported and ex.status is not None and ex.status < 400:
            # a success status, then the server's error in the body: a stream that failed part
            # way (the events before it counted), or an error object in a 200 body (a 4xx or
            # 5xx one is told by its status)
            error_type = "response_error"
        # ---- request metadata
        if ex.api is not None:
            rinfo = llm.parse_request_body(ex.api, ex.req_prefix, ex.req_suffix if ex.req_gap else None)
            ex.req_model = rinfo.model or llm.path_model(ex.api, ex.path or "")
            ex.req_stream = rinfo.stream
        if c.inode is not None:
            self._resolve_addresses(c, final=True)
        trace_id, parent = _parse_traceparent(ex.traceparent)
        clock = self._clock  # its method called directly: a bound method is a call through Python
        rec = Request(
            start_time_unix_nano=clock.to_unix_ns(ex.start_ns),
            end_time_unix_nano=clock.to_unix_ns(max(end_ns, ex.start_ns)),
            pid=c.tgid,
            command=self._name(c.tgid),
            method=ex.method,
            path=ex.path,
            status_code=ex.status,
            span_kind="server" if c.role == ROLE_SERVER else "client",
            server_port=c.server_port,
            client_address=c.client_addr,
            client_port=c.client_port,
            streaming=ex.streaming or bool(ex.req_stream and ex.stream is not None),
            output_events=output_events,
            time_to_first_token_s=None if ttft_ns is None else max(0, ttft_ns) / 1e9,
            time_per_output_token_s=tpot_s,
            operation=llm.operation_name(ex.api) if ex.api is not None else None,
            request_model=ex.req_model,
            response_model=ex.resp_model,
            input_tokens=ex.input_tokens,
            output_tokens=ex.output_tokens,
            finish_reasons=tuple(ex.finish_reasons) or None,
            aborted=aborted,
            error_type=error_type,
            ids=SpanIds(trace_id, drawn=False),  # the span's own ids, drawn when first read
            parent_span_id=parent,
            first_token_time_unix_nano=None if first_out is None else clock.to_unix_ns(first_out),
            gap_histogram_log2_us=s.gaps if s is not None and ex.streaming else (),
        )
        self._emit(rec)

    def _late_sample(self, ex: Exchange, s: SummaryEvent, sample: int) -> None:
        """No sampled write carried output and the ring has moved on: the write the summary
        keeps from just past the samples (index ``sample``) is read as one more sample, where a
        stream that opens with events carrying no output has its first."""
        ring = s.ring  # write order: the kept write, if there, comes first
        if not ring or ring[0].index != sample:
            return
        t = ring[0]
        ex.max_sample_index = sample
        k = self._fragment(ex, t)
        if k:
            ex.events_output += k
            ex.first_output_ns = ex.last_output_ns = t.ts_ns

    def _walk_ring(
        self, ex: Exchange, ring: tuple[TailSlot, ...], total_writes: int, sample: int
    ) -> tuple[int, int, int | None, int | None]:
        """The writes between the sampled ones and ``ring`` (the slots of the phase's last
        writes, in write order) that went unseen, the output writes the walk counts in
        ``ring``, and the times of its first and last; what the slots read say is merged into
        ``ex``. agent/_llmjson.c ``ring_walk`` reads the ring the same way (the tests compare).
        ``sample``: the writes the probe sent in full."""
        unseen_mid = 0
        if total_writes > sample:
            first_ring = ring[0].index if ring else total_writes
            unseen_mid = max(0, first_ring - max(sample, ex.max_sample_index + 1))
        ring_first_output: int | None = None
        ring_last_output: int | None = None
        ring_outputs = 0
        if ex.first_output_ns is not None or unseen_mid:
            # Walk back from the end: the last writes carry finish reason and
            # usage; once a write with output is found, the ones before it are
            # mid-stream writes, their events taken as output events (a write as
            # one, as the unseen middle's are). Parsing every tail costs more
            # than the answer needs.
            for i in range(len(ring) - 1, -1, -1):
                k = self._fragment(ex, ring[i])
                if k:
                    ring_outputs = k
                    for j in range(i):
                        ring_outputs += self._slot_events(ex, ring[j])
                    ring_last_output = ring[i].ts_ns
                    ring_first_output = ring[0].ts_ns
                    break
        else:
            for t in ring:
                k = self._fragment(ex, t)
                if k:
                    ring_outputs += k
                    if ring_first_output is None:
                        ring_first_output = t.ts_ns
                    ring_last_output = t.ts_ns
        return unseen_mid, ring_outputs, ring_first_output, ring_last_output

    @staticmethod
    def _write_events(ex: Exchange, t: TailSlot) -> int | None:
        """The events that start in one tail-ring write (its head and its tail), for SSE and
        NDJSON streams; None where a write is taken as one event (typed-event APIs, whose
        events are not all output, and other streams)."""
        if ex.api is not None and ex.api in llm.TYPED_APIS:
            return None
        stream = ex.stream
        if not isinstance(stream, (SSEParser, NDJSONParser)):
            return None
        ndjson = isinstance(stream, NDJSONParser)
        n = llm.write_events(t.head, ndjson)
        if t.tail:
            n += llm.write_events(t.tail, ndjson)
        return n

    def _slot_events(self, ex: Exchange, t: TailSlot) -> int:
        """The events of one tail-ring write that is not read: at least one."""
        n = self._write_events(ex, t)
        return 1 if n is None else max(1, n)

    def _decoded(self, coding: str, body: bytes) -> bytes:
        """The start of a compressed body, decompressed (gzip or deflate: Triton compresses its
        answers for clients that accept it), at most :data:`_MAX_DECODED` bytes; only the
        kept prefix is read (a compressed stream cannot be resumed past a gap). Empty, counted
        in ``infersight.parse.failures{reason="content_encoding"}``, for other codings (br,
        zstd) and damaged data."""
        c = coding.strip().lower()
        if c == "identity":
            return body
        if c in ("gzip", "x-gzip", "deflate"):
            for wbits in (47, -15):  # gzip or zlib, told by the header; then raw deflate
                try:
                    return zlib.decompressobj(wbits).decompress(body, _MAX_DECODED)
                except zlib.error:
                    if c != "deflate":
                        break
        self._metrics.inc("infersight.parse.failures", labels=(("reason", "content_encoding"),))
        return b""

    @staticmethod
    def _merge_fields(
        ex: Exchange, model: str | None, reasons: tuple[str, ...], input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        """:meth:`_merge_info` for the fields the C readers answer with (a streamed event's, or
        the ring walk's merge of the slots it read), with no EventInfo made."""
        if model and ex.resp_model is None:
            ex.resp_model = model
        for r in reasons:
            if r not in ex.finish_reasons and len(ex.finish_reasons) < 16:
                ex.finish_reasons.append(r)
        if input_tokens is not None:
            ex.input_tokens = input_tokens
        if output_tokens is not None:
            ex.output_tokens = output_tokens

    def _fragment(self, ex: Exchange, t: TailSlot) -> int:
        """Read one tail-ring write: the output events it holds (one at most, unless several
        events start in it)."""
        if t.len <= 7 and t.head.strip(b"\r\n") in (b"0", b""):
            return 0  # the chunked terminator alone, or a piece of it (its last CRLF)
        api = ex.api
        if api is None:
            return 1 if ex.stream is not None else 0
        n = self._write_events(ex, t)
        if n is not None and n > 1:
            return self._fragment_events(ex, api, t, isinstance(ex.stream, NDJSONParser))
        info = llm.parse_fragment(api, t.head)
        self._merge_info(ex, info)
        if t.tail:
            info2 = llm.parse_fragment(api, t.tail)
            self._merge_info(ex, info2)
            info = llm.merge_events(info, info2)
        return 1 if _carries_output(info) else 0

    def _fragment_events(self, ex: Exchange, api: llm.Api, t: TailSlot, ndjson: bool) -> int:
        """:meth:`_fragment` for a write in which several events start: each read apart, in
        order (a long write's head and tail too; what lies between them is not counted)."""
        outputs = 0
        for part in (t.head, t.tail):
            if not part:
                continue
            for piece, starts in llm.split_events(part, ndjson):
                info = llm.parse_fragment(api, piece)
                self._merge_info(ex, info)
                if starts and _carries_output(info):
                    outputs += 1
        return outputs

    # ---- in-flight requests and idle checks ---------------------------------------
    def _set_active(self, c: Conn, ex: Exchange) -> None:
        # A plain dict store per request (the GIL makes it atomic); the
        # ActiveRequest objects are built only when an exporter asks.
        if c.role == ROLE_CLIENT and not self.config.client_spans:
            return
        self._active[c.conn_id] = (c, ex)

    def _clear_active(self, c: Conn) -> None:
        active = self._active
        if c.conn_id in active:  # compiled, two native dict operations; pop(k, None) is a method call
            del active[c.conn_id]

    def active(self) -> list[ActiveRequest]:
        """Requests whose head was seen and whose response has not ended. Called
        from exporter threads: it reads a copy of the table, never mutates it."""
        for _ in range(3):
            try:
                snapshot = list(self._active.values())
                break
            except RuntimeError:  # resized while copied: try again
                continue
        else:
            return []
        to_unix = self._clock.to_unix_ns
        return [
            ActiveRequest(
                start_time_unix_nano=to_unix(ex.start_ns),
                pid=c.tgid,
                command=self._names.get(c.tgid, ""),
                server_port=c.server_port,
                method=ex.method,
                path=ex.path,
                request_model=None,
            )
            for c, ex in snapshot
            if not ex.done
        ]

    def sweep(self, now_mono_ns: int) -> None:
        """Close out requests whose connection the kernel no longer tracks
        (their close record was lost, or the process died)."""
        limit = int(self.config.idle_check_s * 1e9)
        stale = [
            c
            for c in self._conns.values()
            if c.cur is not None and not c.cur.done and now_mono_ns - c.cur.last_news_ns > limit
        ]
        for c in stale:
            if self._conn_alive is not None and self._conn_alive(c.tgid, c.fd, c.conn_id):
                assert c.cur is not None
                c.cur.last_news_ns = now_mono_ns  # still streaming: check again later
                continue
            self._forget(c)
            self._abandon(c, "close_lost")

    def open_requests(self) -> int:
        return sum(1 for c in self._conns.values() if c.cur is not None and not c.cur.done)


_MAX_DECODED: Final = 65536  # bytes of a compressed body's start decompressed, whatever it expands to


def _kept(prefix: bytes, suffix: bytes, gap: bool, data: bytes, cap: int) -> tuple[bytes, bytes]:
    """A body's kept bytes, ``prefix`` and ``suffix``, with ``data`` read: its first ``cap`` bytes,
    or, once part of it went unseen (``gap``), the last 1024 bytes after that."""
    if gap:
        return prefix, (suffix + data)[-1024:]
    if len(prefix) < cap:
        return prefix + data[: cap - len(prefix)], suffix
    return prefix, suffix


def _carries_output(info: llm.EventInfo) -> bool:
    """A tail-ring write's reading says output: its events carry text, or, where nothing
    tells, it is no ending (no done marker, finish reason or output count)."""
    if info.output is not None:
        return info.output
    return not (info.done or info.finish_reasons or info.output_tokens is not None)


def _one_event(stream: SSEParser | NDJSONParser | None, write: bytes) -> bytes | None:
    """The JSON object of a write that is one chunk holding one whole event of ``stream``, when
    ``stream`` is between events (the SSE parser is then told it took the event); else None."""
    if isinstance(stream, SSEParser):
        if stream.between_events():
            obj = llm.sse_chunk_event(write)
            if obj is not None:
                stream.took_event()
            return obj
    elif isinstance(stream, NDJSONParser) and stream.between_lines():
        return llm.ndjson_chunk_event(write)
    return None


def _one_named_event(stream: SSEParser | NDJSONParser | None, write: bytes) -> tuple[bytes, bytes] | None:
    """The name and JSON object of a write that is one chunk holding one whole named SSE event,
    when ``stream`` is an SSE parser between events (which is then told it took the event)."""
    if isinstance(stream, SSEParser) and stream.between_events():
        named = llm.sse_named_event(write)
        if named is not None:
            stream.took_event()
        return named
    return None


def _parse_traceparent(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None, None
    return m.group(2), m.group(3)
