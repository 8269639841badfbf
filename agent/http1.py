"""HTTP/1.1 message framing for a passive observer (sans-IO, in the manner of h11).

The agent sees bounded copies of what a server read and wrote, not a socket: a
request head and a prefix of its body, the first response writes, then only the
tails of later writes, with the bytes in between reported as gaps. This parser
turns such a stream into events::

    p = H1Parser("response")
    p.expect_response_to("POST")
    p.feed(captured)            # any split: a whole pipeline or one byte at a time
    p.feed_gap(lost)            # n bytes were written but not captured
    while (ev := p.next_event()) is not NEED_DATA:
        ...

A request read whole, or a response head framed by chunked coding or a
Content-Length, can also be read in one C call without events
(:meth:`H1Parser.take_request_head`, :meth:`H1Parser.take_response_head`), where
only its framing and one field matter; the parser is left as feeding it would leave it.

Differences from an endpoint parser (h11), all because nothing here can answer
or close the connection:

- Nothing raises on bad input. Bytes that cannot be framed are discarded as
  :class:`Skipped` events while the parser looks for the next start line
  (*resync*), and are counted in :data:`~agent.selfmetrics.SELF_METRICS`
  (``infersight.parse.skipped.bytes`` and ``infersight.parse.failures``, both
  labelled by ``reason``). The same resync handles a capture attached in the
  middle of a connection and non-HTTP traffic (TLS, the HTTP/2 preface, binary).
- A gap inside known body framing (the rest of a Content-Length body, or inside
  one chunk's data) keeps framing and yields :class:`BodyGap`. A gap anywhere
  else loses framing: the current message ends with
  ``EndOfMessage(complete=False)`` and the parser resyncs. Framing lost to a
  gap is an expected consequence of bounded capture, not a parse failure: it is
  counted as ``infersight.parse.resyncs{reason="gap"}`` and its discarded bytes
  as ``infersight.parse.skipped.bytes{reason="gap"}``. A chunked body whose
  terminator the capture saw past the gap is ended by :meth:`H1Parser.end_chunked`
  instead, its framing kept. A head cut by a gap
  after its whole start line is still reported (with the header lines that
  were complete) and ended the same way, so a request whose headers outgrow
  the capture keeps its method and path (``infersight.parse.cut.heads``).
- Input is consumed eagerly in :meth:`H1Parser.feed`, so internal buffers never
  hold more than ``max_head_bytes`` plus a small constant; events wait in a
  queue for :meth:`H1Parser.next_event`. Call ``next_event()`` until it returns
  :data:`NEED_DATA` after each feed: the queue holds what was fed and not yet
  taken. Because parsing is eager, a response parser must be told the request
  method (:meth:`H1Parser.expect_response_to`) *before* the response bytes are
  fed; without one, a response is framed as if it answered a GET.

Reasons used in ``Skipped`` and the failure counter: ``tls``, ``http2`` and
``not_http`` (bytes at a message boundary that do not start an HTTP/1.x
message), ``head_too_large``, ``bad_head`` (an unparsable header line),
``bad_framing`` (an invalid Content-Length or request Transfer-Encoding),
``bad_chunk`` (an invalid or huge chunk size, chunk data not followed by CRLF,
oversized trailers), ``truncated`` (the connection closed inside a head or a
framed body), and ``gap`` (not a failure, see above). The failure counter also counts
``conflicting_framing`` (Content-Length beside Transfer-Encoding; chunked wins,
RFC 9112 §6.3) and ``pending_methods_full``.

Threading: a parser belongs to one connection direction and is not thread-safe;
use it from one thread. No method raises on any input bytes; the constructor
raises ``ValueError`` for an invalid ``role`` or ``max_head_bytes``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Literal

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from agent.values import Value

try:  # the common head read in C (agent/_httphead.c); the reading below is its reference
    from agent._httphead import parse_request_head as _c_request_head
    from agent._httphead import parse_response_head as _c_response_head
    from agent._httphead import request_fields as _c_request_fields
    from agent._httphead import response_fields as _c_response_fields

    NATIVE_HEAD = True
except ImportError:  # not built: every head is read by the Python below
    NATIVE_HEAD = False

__all__ = [
    "NEED_DATA",
    "Body",
    "BodyGap",
    "EndOfMessage",
    "Event",
    "H1Parser",
    "NeedData",
    "RequestHead",
    "ResponseHead",
    "Skipped",
    "Upgrade",
    "header",
]

Headers = tuple[tuple[str, str], ...]


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`H1Parser.next_event` when no event is ready.
NEED_DATA: Final = NeedData()


# The events are immutable values (agent/values.py).


class RequestHead(Value):
    __slots__ = ("headers", "method", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: Headers) -> None:
        self.method: Final = method
        self.target: Final = target
        self.version: Final = version  # "1.0" or "1.1"
        self.headers: Final = headers  # names lowercased, in wire order

    def _key(self) -> tuple[object, ...]:
        return (self.method, self.target, self.version, self.headers)


class ResponseHead(Value):
    """A response head. ``100 <= status < 200`` (except 101) is informational:
    no body and no ``EndOfMessage`` follow it; the final response comes next."""

    __slots__ = ("headers", "reason", "status", "version")

    def __init__(self, status: int, reason: str, version: str, headers: Headers) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.version: Final = version
        self.headers: Final = headers

    def _key(self) -> tuple[object, ...]:
        return (self.status, self.reason, self.version, self.headers)


class Body(Value):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: Final = data  # de-chunked body bytes, in order; one event per contiguous captured run

    def _key(self) -> tuple[object, ...]:
        return (self.data,)


class BodyGap(Value):
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n: Final = n  # body bytes that were not captured; framing continues after them

    def _key(self) -> tuple[object, ...]:
        return (self.n,)


class EndOfMessage(Value):
    __slots__ = ("complete",)

    def __init__(self, complete: bool) -> None:
        self.complete: Final = complete  # False: ended by close, gap or resync rather than by its own framing

    def _key(self) -> tuple[object, ...]:
        return (self.complete,)


class Skipped(Value):
    __slots__ = ("n", "reason")

    def __init__(self, n: int, reason: str) -> None:
        self.n: Final = n
        self.reason: Final = reason

    def _key(self) -> tuple[object, ...]:
        return (self.n, self.reason)


class Upgrade(Value):
    """101 Switching Protocols or a 2xx answer to CONNECT: the rest of the
    connection is not HTTP/1.1. The parser discards what follows (counted as
    ``infersight.parse.skipped.bytes{reason="upgraded"}``, not as a failure)."""

    __slots__ = ()


Event = RequestHead | ResponseHead | Body | BodyGap | EndOfMessage | Skipped | Upgrade


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive), or None."""
    name = name.lower()
    for k, v in headers:
        if k == name:
            return v
    return None


# --- wire grammar (RFC 9112) ------------------------------------------------

_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_TARGET = rb"[^\x00-\x20\x7f]"
# A prefix of "HTTP/1.x\r" (the tail of a request line).
_VERSION_PREFIX = rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?"

_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"{1,32}) (" + _TARGET + rb"+) HTTP/(1\.[01])\r?\n")
_REQUEST_LINE_PREFIX = re.compile(
    _TCHAR + rb"{1,32}(?: " + _TARGET + rb"*(?: (?:" + _VERSION_PREFIX + rb")?)?)?"
)
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?\r?\n")
_STATUS_LINE_PREFIX = re.compile(
    rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01](?: (?:[0-9]{0,2}|[0-9]{3}(?: [^\r\n]*)?\r?))?)?)?)?)?)?)?)?"
)
_HEAD_END = re.compile(rb"\n\r?\n")
_FIELD_NAME = re.compile(_TCHAR + rb"+")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
_CHUNK_LINE_PREFIX = re.compile(rb"[0-9A-Fa-f]{1,16}(?:[ \t]*(?:;[^\r\n]*)?\r?)?")

# Resync only trusts the registered methods; extension methods parse only when
# framing was never lost. The match may start anywhere (not only at a line
# start): a JSON body rarely ends with a newline, and the next message follows
# it directly.
_KNOWN_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
_METHOD_ALT = b"|".join(_KNOWN_METHODS)
_METHOD_PREFIXES = sorted({m[:i] for m in _KNOWN_METHODS for i in range(1, len(m))}, key=len, reverse=True)
_REQUEST_SYNC = re.compile(rb"(?:" + _METHOD_ALT + rb") " + _TARGET + rb"+ HTTP/1\.[01]\r?\n")
# The earliest position whose rest could still grow into a _REQUEST_SYNC match.
_REQUEST_SYNC_PARTIAL = re.compile(
    rb"(?:(?:%s)(?: (?:%s+(?: (?:%s)?)?)?)?|%s)\Z"
    % (_METHOD_ALT, _TARGET, _VERSION_PREFIX, b"|".join(_METHOD_PREFIXES))
)
_RESPONSE_SYNC = re.compile(rb"HTTP/1\.[01] [0-9]{3}")
_RESPONSE_SYNC_PARTIAL = re.compile(rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01](?: [0-9]{0,2})?)?)?)?)?)?)?)?\Z")

# Non-HTTP signatures, checked when a message boundary holds something else.
_SIGNATURES = (
    (b"\x16\x03", "tls"),  # TLS record header: handshake, version 3.x (RFC 8446 §5.1)
    (b"PRI * HTTP/2.0", "http2"),  # the HTTP/2 connection preface (RFC 9113 §3.4)
)

_MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions; longer is treated as garbage
_MAX_CHUNK_SIZE = 1 << 40  # larger sizes are not real traffic: treat as a framing error
_MAX_PENDING_METHODS = 128  # pipelined requests awaiting a response

# States.
# (Final: compiled, each is a constant, not a lookup in the module's globals)
_HEAD: Final = 0
_LENGTH: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_CRLF: Final = 4
_TRAILER: Final = 5
_TO_CLOSE: Final = 6
_RESYNC: Final = 7
_UPGRADED: Final = 8
_CLOSED: Final = 9


class H1Parser:
    """Frames one direction of an HTTP/1.x connection; see the module docstring."""

    def __init__(
        self,
        role: Literal["request", "response"],
        *,
        max_head_bytes: int = 16384,
        metrics: SelfMetrics = SELF_METRICS,
        native_head: bool = True,
    ) -> None:
        """``native_head``: read common heads with agent/_httphead.c when it is built (False:
        always with the Python reading, which the tests compare it against)."""
        if role not in ("request", "response"):
            raise ValueError(f"role must be 'request' or 'response', not {role!r}")
        if max_head_bytes < 64:
            raise ValueError("max_head_bytes must be at least 64")
        self._request = role == "request"
        self._max_head = max_head_bytes
        self._metrics = metrics
        # events not yet taken are _events[_taken:]; a list and an index rather than a deque,
        # whose methods compiled code calls through a lookup each
        self._events: list[Event] = []
        self._taken = 0
        self._buf = b""  # unconsumed bytes: a partial head, chunk line, trailer or resync candidate
        self._state = _HEAD
        self._remaining = 0  # body or chunk bytes still expected
        self._trailer_bytes = 0
        self._head_scanned = 0  # bytes of the current partial head already searched for its end
        self._native = native_head and NATIVE_HEAD
        self._reason = ""  # why the current resync started
        self._methods: list[str] = []  # pending request methods, oldest first (a few at most)
        self._sync = _REQUEST_SYNC if self._request else _RESPONSE_SYNC
        self._sync_partial = _REQUEST_SYNC_PARTIAL if self._request else _RESPONSE_SYNC_PARTIAL

    # --- public interface -------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse captured bytes, in stream order. Ignored after :meth:`close`."""
        if self._state == _CLOSED or not data:
            return
        buf = self._buf + data if self._buf else bytes(data)
        self._buf = b""
        pos = 0
        more = True
        # an if-chain rather than a table of bound methods: compiled, these are direct calls
        while more:
            state = self._state
            if state == _HEAD:
                pos, more = self._on_head(buf, pos)
            elif state == _LENGTH:
                pos, more = self._on_length(buf, pos)
            elif state == _CHUNK_SIZE:
                pos, more = self._on_chunk_size(buf, pos)
            elif state == _CHUNK_DATA:
                pos, more = self._on_chunk_data(buf, pos)
            elif state == _CHUNK_CRLF:
                pos, more = self._on_chunk_crlf(buf, pos)
            elif state == _TRAILER:
                pos, more = self._on_trailer(buf, pos)
            elif state == _TO_CLOSE:
                pos, more = self._on_to_close(buf, pos)
            elif state == _RESYNC:
                pos, more = self._on_resync(buf, pos)
            else:
                pos, more = self._on_upgraded(buf, pos)
        self._buf = buf[pos:]

    def feed_gap(self, n: int) -> None:
        """Record that ``n`` bytes of the stream were not captured."""
        if self._state == _CLOSED or n <= 0:
            return
        state = self._state
        if state in (_LENGTH, _CHUNK_DATA):
            take = min(n, self._remaining)
            self._emit(BodyGap(take))
            self._remaining -= take
            n -= take
            if self._remaining == 0:
                if state == _LENGTH:
                    self._emit(EndOfMessage(True))
                    self._state = _HEAD
                else:
                    self._state = _CHUNK_CRLF
            if n == 0:
                return
            state = self._state
        if state == _TO_CLOSE:
            self._emit(BodyGap(n))
            return
        if state == _UPGRADED:
            self._metrics.inc("infersight.parse.skipped.bytes", n, (("reason", "upgraded"),))
            return
        if state == _RESYNC:
            # Still looking for a start line, for the same reason; a candidate
            # held at the end of the buffer cannot continue across the gap.
            self._skip(len(self._buf), self._reason)
            self._buf = b""
            return
        # Framing is lost: whatever was buffered cannot be completed.
        if self._buf:
            if state == _HEAD and self._emit_cut_head(self._buf):
                self._emit(EndOfMessage(False))
            else:
                self._skip(len(self._buf), "gap")
            self._buf = b""
        if state in (_CHUNK_SIZE, _CHUNK_CRLF, _TRAILER, _CHUNK_DATA):
            self._emit(EndOfMessage(False))
        self._head_scanned = 0
        self._state = _RESYNC
        self._reason = "gap"
        self._metrics.inc("infersight.parse.resyncs", 1, (("reason", "gap"),))

    def close(self) -> None:
        """The connection ended: finish a read-to-close body, flush what is pending."""
        state = self._state
        if state == _CLOSED:
            return
        if state == _TO_CLOSE:
            self._emit(EndOfMessage(True))
        elif state in (_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER):
            if self._buf:
                self._skip(len(self._buf), "truncated")
            self._emit(EndOfMessage(False))
            self._fail("truncated")
        elif self._buf:
            if state == _RESYNC:
                self._skip(len(self._buf), self._reason)
            elif state == _HEAD:
                self._skip(len(self._buf), "truncated")
                self._fail("truncated")
        self._buf = b""
        self._state = _CLOSED

    def end_chunked(self) -> bool:
        """End a chunked body whose terminator was seen in bytes this parser was not fed (the
        capture checks the end of every write for it): the message ends complete, and the
        parser expects the next head, framing kept without a resync. False, changing nothing,
        when the parser is not inside a chunked body."""
        if self._state not in (_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER):
            return False
        self._buf = b""
        self._remaining = 0
        self._trailer_bytes = 0
        self._head_scanned = 0
        self._emit(EndOfMessage(True))
        self._state = _HEAD
        return True

    def expect_response_to(self, method: str) -> None:
        """Queue the method of a request on this connection (response role).

        Responses to HEAD have no body, and a 2xx to CONNECT is an upgrade.
        Call it before feeding the response. At most 128 are kept; beyond that
        the oldest is dropped and counted.
        """
        if len(self._methods) >= _MAX_PENDING_METHODS:
            self._methods.pop(0)
            self._metrics.inc("infersight.parse.failures", 1, (("reason", "pending_methods_full"),))
        self._methods.append(method)

    def at_chunk_start(self) -> bool:
        """Between the chunks of a chunked body, nothing buffered or pending: a whole chunk fed
        now would leave the parser as it is, after one :class:`Body` event."""
        return self._state == _CHUNK_SIZE and not self._buf and not self._events

    def take_request_head(self, data: bytes) -> tuple[str, str, str | None, bytes] | None:
        """A whole request at the start of ``data``, read without events: its method, target,
        first ``traceparent`` value (or None) and the body bytes ``data`` holds after the head.

        The parser is left as feeding ``data`` and taking its events would leave it: between
        messages, or inside the body when ``data`` ends before its Content-Length. None,
        changing nothing, for anything else, which :meth:`feed` reads instead: a parser not
        between messages (bytes held, events not taken), a head other than the common form
        (agent/_httphead.c), a Transfer-Encoding, an invalid Content-Length, or bytes past
        the body's end (a pipelined request). :meth:`feed` is the reference it is tested
        against."""
        if not (self._native and self._request and self._between_messages()):
            return None
        got = _c_request_fields(data, 0, self._max_head)
        if got is None:
            return None
        end, method, target, length, traceparent = got
        avail = len(data) - end
        if avail > length:
            return None
        if avail < length:
            self._remaining = length - avail
            self._state = _LENGTH
        return method, target, traceparent, data[end:]

    def take_response_head(self, data: bytes) -> tuple[int, int, str | None] | None:
        """A response head at the start of ``data``, read without events: the index just past
        it, the status and the first ``content-type`` value (or None). The parser then
        expects the body (chunked, or of its Content-Length), with the method queued for it
        (:meth:`expect_response_to`) taken; feed it the rest of ``data``.

        None, changing nothing, where :meth:`feed` has more to say: a parser not between
        messages, a head other than the common form, an informational, 204 or 304 status, an
        answer to HEAD or CONNECT, a body read to the connection's close, a coding other
        than chunked alone, both framings, a Content-Length that is 0 or invalid, or a
        Content-Encoding (the caller reads it from the complete head)."""
        if not (self._native and not self._request and self._between_messages()):
            return None
        got = _c_response_fields(data, 0, self._max_head)
        if got is None:
            return None
        end, status, length, ctype = got
        methods = self._methods
        method = methods[0] if methods else None
        if status < 200 or status == 204 or status == 304 or length == 0 or method == "HEAD" or method == "CONNECT":
            return None
        if methods:
            methods.pop(0)
        if length < 0:
            self._state = _CHUNK_SIZE
        else:
            self._remaining = length
            self._state = _LENGTH
        return end, status, ctype

    def take_body(self, data: bytes) -> bool | None:
        """``data`` read as bytes of the Content-Length body the parser is inside of, without
        events: True when they end it (the parser is then between messages), False when more
        of it is expected. Feeding ``data`` would give one :class:`Body` of all of it, then
        ``EndOfMessage(True)`` where True is returned, and leave the parser as this does.

        None, changing nothing, where :meth:`feed` has more to say: a parser not inside such
        a body, holding bytes or events not taken, empty ``data``, or ``data`` running past
        the body's end (a pipelined message follows)."""
        n = len(data)
        if self._state != _LENGTH or self._buf or self._events or n == 0 or n > self._remaining:
            return None
        self._remaining -= n
        if self._remaining:
            return False
        self._state = _HEAD
        return True

    def _between_messages(self) -> bool:
        """Expecting a head, with nothing held, half-read or waiting to be taken."""
        return self._state == _HEAD and not self._buf and not self._head_scanned and not self._events

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for more (at most ``max_head_bytes`` plus a small constant)."""
        return len(self._buf)

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA` when none is ready."""
        events = self._events
        i = self._taken
        if i >= len(events):
            return NEED_DATA
        ev = events[i]
        if i + 1 == len(events):  # the last one: the list starts again
            events.clear()
            self._taken = 0
        else:
            self._taken = i + 1
        return ev

    # --- bookkeeping --------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        self._events.append(ev)

    def _skip(self, n: int, reason: str) -> None:
        """Report ``n`` discarded bytes, merged into a preceding Skipped of the same reason."""
        if n <= 0:
            return
        events = self._events
        if events:
            last = events[-1]
            if isinstance(last, Skipped) and last.reason == reason:
                events[-1] = Skipped(last.n + n, reason)
                self._metrics.inc("infersight.parse.skipped.bytes", n, (("reason", reason),))
                return
        events.append(Skipped(n, reason))
        self._metrics.inc("infersight.parse.skipped.bytes", n, (("reason", reason),))

    def _fail(self, reason: str) -> None:
        self._metrics.inc("infersight.parse.failures", 1, (("reason", reason),))

    def _resync(self, reason: str) -> None:
        self._fail(reason)
        self._reason = reason
        self._head_scanned = 0
        self._state = _RESYNC

    def _abandon_head(self, buf: bytes, pos: int, reason: str) -> tuple[int, bool]:
        """The bytes at ``pos`` do not start a message: drop one byte and resync.

        Dropping at least one byte guarantees progress when the resync pattern
        matches where the stricter head grammar did not.
        """
        self._resync(reason)
        self._skip(1, reason)
        return pos + 1, True

    # --- state handlers: (buf, pos) -> (new pos, keep going) -----------------

    def _on_head(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        if pos >= n:
            return pos, False
        c = buf[pos]
        # RFC 9112 §2.2: ignore empty lines before a request line (clients
        # send a stray CRLF after a body); harmless before a status line.
        if c == 0x0A:
            return pos + 1, True
        if c == 0x0D:
            if pos + 1 >= n:
                return pos, False
            if buf[pos + 1] == 0x0A:
                return pos + 2, True
        limit = pos + self._max_head
        if self._native and self._head_scanned == 0:
            # the common head in one C call; None leaves anything else to the reading below
            if self._request:
                req = _c_request_head(buf, pos, limit)
                if req is not None:
                    self._emit(RequestHead(req[1], req[2], req[3], req[4]))
                    self._frame_request(req[4])
                    return req[0], True
            else:
                resp = _c_response_head(buf, pos, limit)
                if resp is not None:
                    self._frame_response(ResponseHead(resp[2], resp[3], resp[1], resp[4]))
                    return resp[0], True
        line_end = buf.find(b"\n", pos, limit)
        if line_end < 0:
            prefix = _REQUEST_LINE_PREFIX if self._request else _STATUS_LINE_PREFIX
            if prefix.fullmatch(buf, pos, min(n, limit)) is None:
                return self._not_a_message(buf, pos)
            if n >= limit:
                return self._abandon_head(buf, pos, "head_too_large")
            return pos, False
        line = (_REQUEST_LINE if self._request else _STATUS_LINE).fullmatch(buf, pos, line_end + 1)
        if line is None:
            return self._not_a_message(buf, pos)
        start = max(line_end, pos + self._head_scanned - 2)
        end = _HEAD_END.search(buf, start, limit)
        if end is None:
            if n >= limit:
                return self._abandon_head(buf, pos, "head_too_large")
            self._head_scanned = n - pos
            return pos, False
        self._head_scanned = 0
        headers = _parse_fields(buf[line_end + 1 : end.start() + 1])
        if headers is None:
            return self._abandon_head(buf, pos, "bad_head")
        if self._request:
            method = line.group(1).decode("ascii")
            target = line.group(2).decode("utf-8", "replace")
            self._emit(RequestHead(method, target, line.group(3).decode("ascii"), headers))
            self._frame_request(headers)
        else:
            reason = line.group(3)
            self._frame_response(
                ResponseHead(
                    int(line.group(2)),
                    reason.decode("latin-1") if reason else "",
                    line.group(1).decode("ascii"),
                    headers,
                )
            )
        return end.end(), True

    def _emit_cut_head(self, buf: bytes) -> bool:
        """Report a head cut by a gap when its start line is whole; False if it is not.

        Captures are bounded: a request with large headers (cookies, tokens)
        loses its end to a gap. Its method, target or status still name the
        message; the header fields on complete lines are reported, the cut
        line is dropped, and ``EndOfMessage(complete=False)`` follows.
        """
        line_end = buf.find(b"\n")
        if line_end < 0:
            return False
        line = (_REQUEST_LINE if self._request else _STATUS_LINE).fullmatch(buf, 0, line_end + 1)
        if line is None:
            return False
        last = buf.rfind(b"\n")
        headers = _parse_fields(buf[line_end + 1 : last + 1])
        if headers is None:
            return False
        self._metrics.inc(
            "infersight.parse.cut.heads", 1, (("role", "request" if self._request else "response"),)
        )
        if self._request:
            self._emit(
                RequestHead(
                    line.group(1).decode("ascii"),
                    line.group(2).decode("utf-8", "replace"),
                    line.group(3).decode("ascii"),
                    headers,
                )
            )
            return True
        reason = line.group(3)
        status = int(line.group(2))
        if status >= 200 or status == 101:
            if self._methods:
                self._methods.pop(0)
        self._emit(
            ResponseHead(
                status, reason.decode("latin-1") if reason else "", line.group(1).decode("ascii"), headers
            )
        )
        return True

    def _not_a_message(self, buf: bytes, pos: int) -> tuple[int, bool]:
        rest = buf[pos : pos + 16]
        reason = "not_http"
        for sig, name in _SIGNATURES:
            if rest.startswith(sig):
                reason = name
                break
            if sig.startswith(rest):
                return pos, False  # too few bytes to tell which foreign protocol this is
        return self._abandon_head(buf, pos, reason)

    def _frame_request(self, headers: Headers) -> None:
        te = _transfer_coding(headers)
        if te is not None:
            if te == "chunked":
                if header(headers, "content-length") is not None:
                    self._fail("conflicting_framing")
                self._state = _CHUNK_SIZE
                return
            # RFC 9112 §6.3: a request whose final coding is not chunked cannot be framed.
            self._emit(EndOfMessage(False))
            self._resync("bad_framing")
            return
        self._frame_length(headers, default_to_close=False)

    def _frame_response(self, head: ResponseHead) -> None:
        status = head.status
        self._emit(head)
        if 100 <= status < 200 and status != 101:
            self._state = _HEAD  # informational: the final response follows
            return
        method = self._methods.pop(0) if self._methods else None
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self._emit(Upgrade())
            self._state = _UPGRADED
            return
        if method == "HEAD" or status in (204, 304):
            self._emit(EndOfMessage(True))
            self._state = _HEAD
            return
        te = _transfer_coding(head.headers)
        if te is not None:
            if header(head.headers, "content-length") is not None:
                self._fail("conflicting_framing")  # RFC 9112 §6.3: Transfer-Encoding wins
            self._state = _CHUNK_SIZE if te == "chunked" else _TO_CLOSE
            return
        self._frame_length(head.headers, default_to_close=True)

    def _frame_length(self, headers: Headers, *, default_to_close: bool) -> None:
        values = [v for k, v in headers if k == "content-length"]
        if not values:
            if default_to_close:
                self._state = _TO_CLOSE
            else:
                self._remaining = 0
                self._state = _LENGTH
            return
        length = _content_length(values)
        if length is None:
            self._emit(EndOfMessage(False))
            self._resync("bad_framing")
            return
        self._remaining = length
        self._state = _LENGTH

    def _on_length(self, buf: bytes, pos: int) -> tuple[int, bool]:
        if self._remaining == 0:
            self._emit(EndOfMessage(True))
            self._state = _HEAD
            return pos, True
        avail = len(buf) - pos
        if avail <= 0:
            return pos, False
        take = min(avail, self._remaining)
        self._emit(Body(buf[pos : pos + take]))
        self._remaining -= take
        return pos + take, True

    def _on_chunk_size(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        if pos >= n:
            return pos, False
        end = buf.find(b"\n", pos, pos + _MAX_CHUNK_LINE)
        if end < 0:
            if n - pos >= _MAX_CHUNK_LINE or _CHUNK_LINE_PREFIX.fullmatch(buf, pos) is None:
                return self._bad_chunk(pos)
            return pos, False
        m = _CHUNK_LINE.fullmatch(buf, pos, end + 1)
        if m is None:
            return self._bad_chunk(pos)
        size = int(m.group(1), 16)
        if size > _MAX_CHUNK_SIZE:
            return self._bad_chunk(pos)
        if size == 0:
            self._trailer_bytes = 0
            self._state = _TRAILER
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return end + 1, True

    def _bad_chunk(self, pos: int) -> tuple[int, bool]:
        # The bytes at pos are rescanned: a response that follows a body
        # missing its last chunk is found again at once.
        self._emit(EndOfMessage(False))
        self._resync("bad_chunk")
        return pos, True

    def _on_chunk_data(self, buf: bytes, pos: int) -> tuple[int, bool]:
        avail = len(buf) - pos
        if avail <= 0:
            return pos, False
        take = min(avail, self._remaining)
        self._emit(Body(buf[pos : pos + take]))
        self._remaining -= take
        if self._remaining == 0:
            self._state = _CHUNK_CRLF
        return pos + take, True

    def _on_chunk_crlf(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        if pos >= n:
            return pos, False
        c = buf[pos]
        if c == 0x0A:
            self._state = _CHUNK_SIZE
            return pos + 1, True
        if c == 0x0D:
            if pos + 1 >= n:
                return pos, False
            if buf[pos + 1] == 0x0A:
                self._state = _CHUNK_SIZE
                return pos + 2, True
        return self._bad_chunk(pos)

    def _on_trailer(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        if pos >= n:
            return pos, False
        end = buf.find(b"\n", pos)
        if end < 0:
            if self._trailer_bytes + n - pos > self._max_head:
                return self._bad_chunk(pos)
            return pos, False
        self._trailer_bytes += end + 1 - pos
        if self._trailer_bytes > self._max_head:
            return self._bad_chunk(pos)
        if end == pos or (end == pos + 1 and buf[pos] == 0x0D):
            self._emit(EndOfMessage(True))
            self._state = _HEAD
        return end + 1, True  # trailer fields are not reported

    def _on_to_close(self, buf: bytes, pos: int) -> tuple[int, bool]:
        if pos < len(buf):
            self._emit(Body(buf[pos:]))
        return len(buf), False

    def _on_upgraded(self, buf: bytes, pos: int) -> tuple[int, bool]:
        if pos < len(buf):
            self._metrics.inc("infersight.parse.skipped.bytes", len(buf) - pos, (("reason", "upgraded"),))
        return len(buf), False

    def _on_resync(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        if pos >= n:
            return pos, False
        m = self._sync.search(buf, pos)
        # A start line longer than a whole head cannot begin a message; skipping
        # it here keeps the result independent of how the stream was split.
        while m is not None and m.end() - m.start() > self._max_head:
            m = self._sync.search(buf, m.start() + 1)
        if m is not None:
            self._skip(m.start() - pos, self._reason)
            self._state = _HEAD
            return m.start(), True
        # Keep the earliest tail that could still become a start line; the
        # window bounds the buffer (and the rescans) to max_head_bytes.
        p = self._sync_partial.search(buf, max(pos, n - self._max_head))
        keep = n if p is None else p.start()
        self._skip(keep - pos, self._reason)
        return keep, False


# A block of well-formed header lines, checked in one C-speed match: the common case.
_PLAIN_FIELDS = re.compile(rb"(?:" + _TCHAR + rb"+:[^\r\n]*\r?\n)*")


def _parse_fields(block: bytes) -> Headers | None:
    """Header lines (each ending in LF) to lowercased (name, value) pairs; None if malformed."""
    if not block:
        return ()
    if _PLAIN_FIELDS.fullmatch(block) is not None:
        # every line is `token: value`: split without checking each name again
        fields = []
        for line in block.decode("latin-1").split("\n")[:-1]:
            name, _, value = line.partition(":")
            fields.append((name.lower(), value.strip(" \t\r")))
        return tuple(fields)
    return _parse_fields_slowly(block)


def _parse_fields_slowly(block: bytes) -> Headers | None:
    """Line by line: obsolete folding, and the exact place of a malformed line."""
    out: list[tuple[str, str]] = []
    for raw in block.split(b"\n")[:-1]:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            return None
        if raw[0] in (0x20, 0x09):
            # Obsolete line folding (RFC 9112 §5.2): a recipient may replace it with a space.
            if not out:
                return None
            name, value = out[-1]
            out[-1] = (name, (value + " " + raw.strip(b" \t").decode("latin-1")).strip())
            continue
        colon = raw.find(b":")
        if colon <= 0 or _FIELD_NAME.fullmatch(raw, 0, colon) is None:
            return None
        out.append((raw[:colon].decode("ascii").lower(), raw[colon + 1 :].strip(b" \t").decode("latin-1")))
    return tuple(out)


def _transfer_coding(headers: Headers) -> str | None:
    """The final transfer coding, lowercased, or None without Transfer-Encoding."""
    present = 0
    value = ""
    for k, v in headers:
        if k == "transfer-encoding":
            present += 1
            value = v
    if not present:  # most responses: no list built
        return None
    if present == 1 and value == "chunked":  # what streaming servers send
        return value
    codings = [c.strip().lower() for k, v in headers if k == "transfer-encoding" for c in v.split(",")]
    codings = [c for c in codings if c]
    return codings[-1] if codings else None


def _content_length(values: list[str]) -> int | None:
    """RFC 9112 §6.3: identical repeated values are one length; anything else is invalid."""
    if len(values) == 1:
        text = values[0]
        if text.isdigit() and text.isascii() and len(text) <= 18:  # the common form, as below
            return int(text)
    found: set[str] = {p.strip() for v in values for p in v.split(",")}
    if len(found) != 1:
        return None
    (text,) = found
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        return None
    return int(text)
