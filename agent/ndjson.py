"""Newline-delimited JSON (Ollama's streaming format), split into lines incrementally.

Lines end in LF (a trailing CR is removed); blank lines are ignored. The JSON
itself is not decoded here: :mod:`agent.llm` reads what it needs from each line.

Memory is bounded: a line keeps at most ``max_line_bytes``, the rest is dropped
and the line is marked ``truncated`` (counted as
``infersight.parse.failures{reason="ndjson_line_too_large"}``). Ollama's last
line can carry a large ``context`` array, so the bound is expected to cut it;
:func:`agent.llm.parse_stream_event` reads truncated lines with patterns. A
capture gap (:meth:`NDJSONParser.feed_gap`) marks the line in progress (or the
next one, when the gap fell between lines) truncated.

Threading: one parser per response stream, used from one thread. Nothing here
raises on any input bytes.
"""

from __future__ import annotations

from typing import Final

from agent.selfmetrics import SELF_METRICS, SelfMetrics
from agent.values import Value

__all__ = ["NDJSONLine", "NDJSONParser"]

_BLANK = b" \t\r"


class NDJSONLine(Value):
    """One line (an immutable value, see agent/values.py)."""

    __slots__ = ("data", "truncated")

    def __init__(self, data: bytes, truncated: bool) -> None:
        self.data: Final = data  # the line without its line end
        self.truncated: Final = truncated  # longer than the bound, or bytes were lost to a gap

    def _key(self) -> tuple[object, ...]:
        return (self.data, self.truncated)


class NDJSONParser:
    """Incremental NDJSON line splitter; see the module docstring."""

    def __init__(self, max_line_bytes: int = 65536, *, metrics: SelfMetrics = SELF_METRICS) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self._max = max_line_bytes
        self._metrics = metrics
        self._partial = bytearray()
        self._oversize = False
        self._gap = False

    def feed(self, data: bytes) -> list[NDJSONLine]:
        """Split body bytes; return the lines they complete, in order."""
        out: list[NDJSONLine] = []
        pos, n = 0, len(data)
        while pos < n:
            end = data.find(b"\n", pos)
            if end < 0:
                self._add(data, pos, n)
                break
            if self._partial:
                self._add(data, pos, end)
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = data[pos:end]
                if len(line) > self._max + 1:  # + 1: a CR that is removed below
                    line = line[: self._max + 1]
                    self._oversize = True
            pos = end + 1
            self._line(line, out)
        return out

    def between_lines(self) -> bool:
        """Nothing pending: the next byte starts a line, and no gap or cut marks it."""
        return not self._partial and not self._gap and not self._oversize

    @property
    def buffered(self) -> int:
        """Bytes held for the line in progress (at most ``max_line_bytes`` + 1)."""
        return len(self._partial)

    def feed_gap(self, n: int) -> None:
        """``n`` bytes were lost: the current (or next) line is marked truncated."""
        if n > 0:
            self._gap = True

    def _add(self, data: bytes, start: int, end: int) -> None:
        room = self._max + 1 - len(self._partial)
        if end - start > room:
            end = start + max(room, 0)
            self._oversize = True
        self._partial += data[start:end]

    def _line(self, line: bytes, out: list[NDJSONLine]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max:
            line = line[: self._max]
            self._oversize = True
        if not line.strip(_BLANK):
            # A blank line carries nothing; a gap before it stays pending.
            self._oversize = False
            return
        if self._oversize:
            self._metrics.inc("infersight.parse.failures", 1, (("reason", "ndjson_line_too_large"),))
        out.append(NDJSONLine(line, self._gap or self._oversize))
        self._gap = False
        self._oversize = False
