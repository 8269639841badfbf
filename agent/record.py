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
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.frozen import copier

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


@dataclass(frozen=True, slots=True)
class Request:
    """One request served (or, for ``span_kind == "client"``, made) by a traced process."""

    start_time_unix_nano: int
    end_time_unix_nano: int
    pid: int
    command: str
    method: str | None
    path: str | None
    status_code: int | None
    span_kind: str = "server"
    server_port: int | None = None
    client_address: str | None = None
    client_port: int | None = None
    streaming: bool = False
    output_events: int | None = None
    time_to_first_token_s: float | None = None
    time_per_output_token_s: float | None = None
    operation: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reasons: tuple[str, ...] | None = None
    aborted: bool = False
    # Set when the response did not complete for a reason other than a client
    # abort (the server closed early, or capture lost part of it).
    error_type: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    # Monotonic kernel time of the first output event; exporters place the
    # "first token" span event with it (already converted to wall-clock ns).
    first_token_time_unix_nano: int | None = None
    # log2 histogram of gaps between response writes, bucket i counts gaps in
    # [2^i, 2^(i+1)) microseconds. Empty for non-streamed responses.
    gap_histogram_log2_us: tuple[int, ...] = ()
    # Attributes added by later stages (k8s.*, gpu.*); exporters pass them on.
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @property
    def duration_s(self) -> float:
        return max(0, self.end_time_unix_nano - self.start_time_unix_nano) / 1e9

    def with_attributes(self, extra: Mapping[str, Any]) -> Request:
        """A copy with ``extra`` merged over the existing attributes."""
        merged = dict(self.attributes)
        merged.update(extra)
        return _copy_request(self, attributes=MappingProxyType(merged))

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


_copy_request = copier(Request)  # once per request when the join adds attributes (agent/frozen.py)
