"""Server-sent events (``text/event-stream``), parsed incrementally from body bytes.

Follows the WHATWG HTML "event stream interpretation": lines end in CRLF, LF or
a lone CR (a CRLF split across feeds counts once); ``data:`` with or without the
space; several ``data`` lines join with ``\\n``; lines starting with ``:`` are
comments (keep-alives); ``event``, ``id`` and ``retry`` fields; a blank line
dispatches the event, and an event without any ``data`` field is not
dispatched. ``data: [DONE]`` is an ordinary event whose data is ``b"[DONE]"``.

Two deliberate differences for an observer:

- :attr:`SSEEvent.id` is the ``id`` given in *this* event (None otherwise),
  not the browser's sticky "last event ID".
- Memory is bounded: an event keeps at most ``max_event_bytes`` of data, the
  rest is dropped and the event is marked ``truncated`` (counted as
  ``infersight.parse.failures{reason="sse_event_too_large"}``). Bytes lost to a
  capture gap (:meth:`SSEParser.feed_gap`) also mark the event in progress
  truncated; parsing continues with the next bytes.

Threading: one parser per response stream, used from one thread. Nothing here
raises on any input bytes.
"""

from __future__ import annotations

import re
from typing import Final

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from agent.values import Value

__all__ = ["SSEEvent", "SSEParser"]

_EOL: Final = re.compile(rb"\r\n|\r|\n")
# What an inference server writes per token: one `data` line and the blank line, LF or CRLF.
_SIMPLE_EVENT: Final = re.compile(rb"data: ?([^\r\n]*)(?:\n\n|\r\n\r\n)")
_BOM: Final = b"\xef\xbb\xbf"
_MAX_FIELD_TEXT: Final = 256  # event type and id are labels, not payloads


class SSEEvent(Value):
    """One dispatched event (an immutable value, see agent/values.py)."""

    __slots__ = ("data", "event", "id", "truncated")

    def __init__(self, data: bytes, event: str | None, id: str | None, truncated: bool) -> None:
        self.data: Final = data  # the data lines joined by b"\n"
        self.event: Final = event  # the `event` field, None when absent or empty
        self.id: Final = id  # the `id` field of this event, None when absent
        self.truncated: Final = truncated  # data exceeded the bound, or bytes were lost to a gap

    def _key(self) -> tuple[object, ...]:
        return (self.data, self.event, self.id, self.truncated)


class SSEParser:
    """Incremental ``text/event-stream`` parser; see the module docstring."""

    def __init__(
        self, max_event_bytes: int = 65536, *, metrics: SelfMetrics = SELF_METRICS, whole_events: bool = True
    ) -> None:
        """``whole_events``: take whole ``data:`` events at the start of a feed in one match
        (False: always line by line, the reading the tests compare that against)."""
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        # A line is at most a field name, a colon, a space and the kept data.
        self._max_line = max_event_bytes + 16
        self._metrics = metrics
        self._partial = bytearray()  # the current incomplete line
        self._partial_cut = False  # the current line went past _max_line
        self._skip_lf = False  # the last line ended in CR: a following LF belongs to it
        self._first_line = True  # a UTF-8 BOM may open the stream
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data plus joining newlines
        self._has_data = False
        self._event: str | None = None
        self._id: str | None = None
        self._truncated = False
        self._oversize = False
        self._whole = whole_events

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse body bytes; return the events they complete, in order."""
        out: list[SSEEvent] = []
        if not data:
            return out
        pos = 0
        if (
            self._whole
            and not self._partial
            and not self._has_data
            and not self._skip_lf
            and self._event is None
            and self._id is None
            and not self._truncated
            and not (self._first_line and data.startswith(_BOM))
        ):
            # Between events, with nothing pending: each whole `data:` event is one match.
            # What is left (another kind of line, a partial event) goes line by line below.
            limit = self._max
            while True:
                m = _SIMPLE_EVENT.match(data, pos)
                if m is None:
                    break
                value = m.group(1)
                if len(value) > limit:
                    break
                out.append(SSEEvent(value, None, None, False))
                pos = m.end()
                self._first_line = False
            if pos == len(data):
                return out
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == 0x0A:
                pos = 1
        n = len(data)
        while pos < n:
            m = _EOL.search(data, pos)
            if m is None:
                self._add_partial(data, pos, n)
                break
            if self._partial:
                self._add_partial(data, pos, m.start())
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = data[pos : m.start()]
                if len(line) > self._max_line:
                    line = line[: self._max_line]
                    self._partial_cut = True
            cut, self._partial_cut = self._partial_cut, False
            if m.end() == n and data[n - 1] == 0x0D:
                self._skip_lf = True
            pos = m.end()
            self._line(line, cut, out)
        return out

    def between_events(self) -> bool:
        """Nothing pending: the next byte starts the first line of a new event."""
        return (
            not self._partial
            and not self._has_data
            and not self._skip_lf
            and self._event is None
            and self._id is None
            and not self._truncated
        )

    def took_event(self) -> None:
        """One whole ``data:`` event (a line and a blank line) was read for this parser, outside
        :meth:`feed` (agent/assemble.py reads a write of one whole event in one step): the
        state is what feeding it would have left."""
        self._first_line = False

    @property
    def buffered(self) -> int:
        """Bytes held for the event in progress (at most about twice ``max_event_bytes``)."""
        return len(self._partial) + self._size

    def feed_gap(self, n: int) -> None:
        """``n`` bytes were lost: the event in progress is marked truncated and continues."""
        if n > 0:
            self._truncated = True
            self._skip_lf = False

    def _add_partial(self, data: bytes, start: int, end: int) -> None:
        room = self._max_line - len(self._partial)
        if end - start > room:
            end = start + max(room, 0)
            self._partial_cut = True
        self._partial += data[start:end]

    def _line(self, line: bytes, cut: bool, out: list[SSEEvent]) -> None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[3:]
        if not line:
            self._dispatch(out)
            return
        if line[0] == 0x3A:  # ':' comment, used as keep-alive
            return
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            self._add_data(value, cut)
        elif field == b"event":
            self._event = value[:_MAX_FIELD_TEXT].decode("utf-8", "replace") or None
        elif field == b"id":
            if b"\x00" not in value:  # WHATWG: an id containing NULL is ignored
                self._id = value[:_MAX_FIELD_TEXT].decode("utf-8", "replace")
        # `retry` and unknown fields are ignored.

    def _add_data(self, value: bytes, cut: bool) -> None:
        sep = 1 if self._has_data else 0
        self._has_data = True
        room = self._max - self._size - sep
        if cut or len(value) > room:
            self._oversize = True
            if room < 0:
                return
            value = value[:room]
        if sep:
            self._data.append(b"\n")
        self._data.append(value)
        self._size += sep + len(value)

    def _dispatch(self, out: list[SSEEvent]) -> None:
        if self._has_data:
            if self._oversize:
                self._metrics.inc("infersight.parse.failures", 1, (("reason", "sse_event_too_large"),))
            out.append(
                SSEEvent(b"".join(self._data), self._event, self._id, self._truncated or self._oversize)
            )
        # A blank line ends the event either way; what follows starts clean.
        self._data = []
        self._size = 0
        self._has_data = False
        self._event = None
        self._id = None
        self._truncated = False
        self._oversize = False
