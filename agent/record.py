"""The per-request record: the one data type that travels the whole pipeline.

Assembly (``agent/assemble.py``) builds a :class:`Request` from kernel events;
the join adds ``k8s.*`` and ``gpu.*`` attributes through :meth:`Request.with_attributes`;
exporters only read it.

Times are wall-clock nanoseconds since the Unix epoch (converted once, from the
kernel's monotonic clock, by :mod:`agent.clock`). Durations are seconds.
A value the wire did not show is ``None``; nothing is invented.

The record never holds request or response bodies: prompts and completions stay
inside the parsers, which keep only bounded metadata.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

# The JSON keys of the record, in output order. This list is the contract of
# `infersight run --jsonl`; tests check that every record carries every key.
RECORD_KEYS: tuple[str, ...] = (
    "start_time_unix_nano",
    "end_time_unix_nano",
    "duration_s",
    "process.pid",
    "process.command",
    "server.port",
    "client.address",
    "client.port",
    "http.request.method",
    "url.path",
    "http.response.status_code",
    "streaming",
    "output_events",
    "time_to_first_token_s",
    "time_per_output_token_s",
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "aborted",
    "trace_id",
    "span_id",
    "parent_span_id",
)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


#: The fields of :class:`Request`, in the order its constructor takes them.
REQUEST_FIELDS: tuple[str, ...] = (
    "start_time_unix_nano",
    "end_time_unix_nano",
    "pid",
    "command",
    "method",
    "path",
    "status_code",
    "span_kind",
    "server_port",
    "client_address",
    "client_port",
    "streaming",
    "output_events",
    "time_to_first_token_s",
    "time_per_output_token_s",
    "operation",
    "request_model",
    "response_model",
    "input_tokens",
    "output_tokens",
    "finish_reasons",
    "aborted",
    "error_type",
    "trace_id",
    "span_id",
    "parent_span_id",
    "first_token_time_unix_nano",
    "gap_histogram_log2_us",
    "attributes",
)


# Request's own slots: its fields, but the two ids, which it reads from a shared SpanIds
_SLOTS: Final = (*(f for f in REQUEST_FIELDS if f not in ("trace_id", "span_id")), "_ids")

_DRAW_LOCK: Final = threading.Lock()


class SpanIds:
    """A record's trace id and span id. Given (``drawn``), they are what was given, ``None``
    included. Not drawn, they are drawn (:func:`new_ids`) when first read, not when the record
    is made: where neither span export nor JSONL is on, nobody reads them, and the draw and its
    formatting were a tenth of a JSON request's cost to the agent. A trace id given to one not
    drawn (the client's, from its traceparent) is kept; only the span id is drawn then. Copies
    of a record share its ``SpanIds``, so the record and its copies show one pair."""

    __slots__ = ("_drawn", "_span_id", "_trace_id")

    def __init__(self, trace_id: str | None = None, span_id: str | None = None, drawn: bool = True) -> None:
        self._trace_id = trace_id
        self._span_id = span_id
        self._drawn = drawn

    def _draw(self) -> None:
        with _DRAW_LOCK:  # two threads reading a record's ids first at once see one pair
            if not self._drawn:
                trace, span = new_ids()
                if self._trace_id is None:
                    self._trace_id = trace
                self._span_id = span
                self._drawn = True

    @property
    def trace_id(self) -> str | None:
        if not self._drawn:
            self._draw()
        return self._trace_id

    @property
    def span_id(self) -> str | None:
        if not self._drawn:
            self._draw()
        return self._span_id


class Request:
    """One request served (or, for ``span_kind == "client"``, made) by a traced process.

    Immutable: every field is ``Final``. This is a plain class rather than a
    frozen dataclass because one is built per request: a frozen dataclass's
    ``__init__`` sets each of the 29 fields through ``object.__setattr__``
    (about 5 µs), while compiled (``agent.native``) this constructor is a few
    stores, and assigning to a field raises ``AttributeError``. Run as plain
    Python, mypy is what keeps the fields unassigned.
    """

    __slots__ = _SLOTS

    def __init__(
        self,
        start_time_unix_nano: int,
        end_time_unix_nano: int,
        pid: int,
        command: str,
        method: str | None,
        path: str | None,
        status_code: int | None,
        span_kind: str = "server",
        server_port: int | None = None,
        client_address: str | None = None,
        client_port: int | None = None,
        streaming: bool = False,
        output_events: int | None = None,
        time_to_first_token_s: float | None = None,
        time_per_output_token_s: float | None = None,
        operation: str | None = None,
        request_model: str | None = None,
        response_model: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        finish_reasons: tuple[str, ...] | None = None,
        aborted: bool = False,
        error_type: str | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        parent_span_id: str | None = None,
        first_token_time_unix_nano: int | None = None,
        gap_histogram_log2_us: tuple[int, ...] = (),
        attributes: Mapping[str, Any] = _EMPTY,
        ids: SpanIds | None = None,
    ) -> None:
        self.start_time_unix_nano: Final = start_time_unix_nano
        self.end_time_unix_nano: Final = end_time_unix_nano
        self.pid: Final = pid
        self.command: Final = command
        self.method: Final = method
        self.path: Final = path
        self.status_code: Final = status_code
        self.span_kind: Final = span_kind
        self.server_port: Final = server_port
        self.client_address: Final = client_address
        self.client_port: Final = client_port
        self.streaming: Final = streaming
        self.output_events: Final = output_events
        self.time_to_first_token_s: Final = time_to_first_token_s
        self.time_per_output_token_s: Final = time_per_output_token_s
        self.operation: Final = operation
        self.request_model: Final = request_model
        self.response_model: Final = response_model
        self.input_tokens: Final = input_tokens
        self.output_tokens: Final = output_tokens
        self.finish_reasons: Final = finish_reasons
        self.aborted: Final = aborted
        # Set when the response did not complete for a reason other than a client
        # abort (the server closed early, or capture lost part of it).
        self.error_type: Final = error_type
        # ``ids``, where given, holds the two ids in place of ``trace_id`` and ``span_id``
        self._ids: Final = ids if ids is not None else SpanIds(trace_id, span_id)
        self.parent_span_id: Final = parent_span_id
        # Monotonic kernel time of the first output event; exporters place the
        # "first token" span event with it (already converted to wall-clock ns).
        self.first_token_time_unix_nano: Final = first_token_time_unix_nano
        # log2 histogram of gaps between response writes, bucket i counts gaps in
        # [2^i, 2^(i+1)) microseconds, up to the last bucket counted. Empty for
        # non-streamed responses.
        self.gap_histogram_log2_us: Final = gap_histogram_log2_us
        # Attributes added by later stages (k8s.*, gpu.*); exporters pass them on.
        self.attributes: Final = attributes

    @property
    def trace_id(self) -> str | None:
        return self._ids.trace_id

    @property
    def span_id(self) -> str | None:
        return self._ids.span_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in REQUEST_FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Request(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in REQUEST_FIELDS) + ")"

    def replace(self, **changes: Any) -> Request:
        """A copy with ``changes`` applied (as ``dataclasses.replace`` would)."""
        values = {f: getattr(self, f) for f in REQUEST_FIELDS}
        for k in changes:
            if k not in values:
                raise TypeError(f"Request has no field {k!r}")
        values.update(changes)
        return Request(**values)

    @property
    def duration_s(self) -> float:
        return max(0, self.end_time_unix_nano - self.start_time_unix_nano) / 1e9

    def with_attributes(self, extra: Mapping[str, Any]) -> Request:
        """A copy with ``extra`` merged over the existing attributes (and the same ids)."""
        merged = dict(self.attributes)
        merged.update(extra)
        return Request(
            self.start_time_unix_nano,
            self.end_time_unix_nano,
            self.pid,
            self.command,
            self.method,
            self.path,
            self.status_code,
            self.span_kind,
            self.server_port,
            self.client_address,
            self.client_port,
            self.streaming,
            self.output_events,
            self.time_to_first_token_s,
            self.time_per_output_token_s,
            self.operation,
            self.request_model,
            self.response_model,
            self.input_tokens,
            self.output_tokens,
            self.finish_reasons,
            self.aborted,
            self.error_type,
            None,
            None,
            self.parent_span_id,
            self.first_token_time_unix_nano,
            self.gap_histogram_log2_us,
            MappingProxyType(merged),
            self._ids,  # the same ids, drawn or not
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSONL contract spells it (see ``RECORD_KEYS``)."""
        d: dict[str, Any] = {
            "start_time_unix_nano": self.start_time_unix_nano,
            "end_time_unix_nano": self.end_time_unix_nano,
            "duration_s": round(self.duration_s, 9),
            "process.pid": self.pid,
            "process.command": self.command,
            "server.port": self.server_port,
            "client.address": self.client_address,
            "client.port": self.client_port,
            "http.request.method": self.method,
            "url.path": self.path,
            "http.response.status_code": self.status_code,
            "streaming": self.streaming,
            "output_events": self.output_events,
            "time_to_first_token_s": _round(self.time_to_first_token_s),
            "time_per_output_token_s": _round(self.time_per_output_token_s),
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": self.request_model,
            "gen_ai.response.model": self.response_model,
            "gen_ai.usage.input_tokens": self.input_tokens,
            "gen_ai.usage.output_tokens": self.output_tokens,
            "gen_ai.response.finish_reasons": list(self.finish_reasons) if self.finish_reasons else None,
            "aborted": self.aborted,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
        }
        if self.span_kind != "server":
            d["span.kind"] = self.span_kind
        if self.error_type is not None:
            d["error.type"] = self.error_type
        for k, v in self.attributes.items():
            d[k] = v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def parse_hex_id(value: str | None, nbytes: int) -> int:
    """The integer of a record's hex trace/span id, 0 when absent or malformed (W3C: all-zero
    is invalid). The exporters read two per record: here, it runs compiled."""
    if not value or len(value) != nbytes * 2:
        return 0
    try:
        return int(value, 16)
    except ValueError:
        return 0


_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


def new_ids() -> tuple[str, str]:
    """A new random trace id (32 hex digits) and span id (16), from one draw of 192 bits
    (two draws and two formattings cost twice as much). Neither is all zeros, which W3C
    Trace Context holds invalid."""
    # randbytes() is Python code around getrandbits(); hex() of bytes formats faster than an
    # int's f"{:048x}"
    s = random.getrandbits(192).to_bytes(24, "big").hex()
    trace, span = s[:32], s[32:]
    if trace == _ZERO_TRACE:
        trace = _ZERO_TRACE[:31] + "1"
    if span == _ZERO_SPAN:
        span = _ZERO_SPAN[:15] + "1"
    return trace, span


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 9)


@dataclass(frozen=True, slots=True)
class ActiveRequest:
    """A request whose head has been seen and whose response has not ended.

    The assembler lists these on demand; exporters derive in-flight gauges
    (``http.server.active_requests``) from them at collection time.
    """

    start_time_unix_nano: int
    pid: int
    command: str
    server_port: int | None
    method: str | None
    path: str | None
    request_model: str | None
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

