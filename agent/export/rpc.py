"""RPC records (gRPC over HTTP/2) as the exporters see them, and the one error rule for every record.

A record is an RPC when its ``attributes`` carry ``rpc.system`` (the HTTP/2
parser sets ``rpc.system``, ``rpc.service``, ``rpc.method`` and, once the
trailers showed it, ``rpc.grpc.status_code``). Such a record gets the RPC
conventions of OpenTelemetry instead of the HTTP ones: it counts in
``rpc.server.duration``, not ``http.server.*``, and its span is named
``{rpc.service}/{rpc.method}`` (semconv RPC spans, "Span name"). The HTTP/2
facts (``:method``, ``:path``, ``:status``) stay on the span as transport
attributes, which the RPC conventions allow ("Distinction from HTTP spans").

Which gRPC codes are errors depends on the side: for a server only
UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS
are (semconv gRPC, server span, ``rpc.response.status_code`` note); NOT_FOUND
or INVALID_ARGUMENT are the client's mistakes, as a 4xx is for HTTP.

Pure functions; none raises.
"""

from __future__ import annotations

from typing import Any

from agent.record import Request

RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

#: gRPC status names by code (grpc/doc/statuscodes.md).
GRPC_STATUS_NAMES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip

#: Codes that make a gRPC *server* span an error (semconv gRPC, server span).
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})

# A span name is not a metric label, but it is an index key in trace backends:
# a method name a client made up must not make it unbounded in size.
_MAX_NAME = 256


def rpc_system(r: Request) -> str | None:
    """The record's ``rpc.system`` ("grpc"), or None for a plain HTTP record."""
    a = r.attributes
    if not a:  # a plain HTTP record outside Kubernetes: no lookup
        return None
    value = a.get(RPC_SYSTEM)
    return str(value) if value not in (None, "") else None


def grpc_status_code(r: Request) -> int | None:
    """The record's ``rpc.grpc.status_code`` as an int, or None when absent or not an integer."""
    value: Any = r.attributes.get(RPC_GRPC_STATUS_CODE)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def span_name(r: Request) -> str | None:
    """``{rpc.service}/{rpc.method}`` for an RPC record that names both, else None (HTTP naming applies)."""
    if rpc_system(r) is None:
        return None
    service = r.attributes.get(RPC_SERVICE)
    method = r.attributes.get(RPC_METHOD)
    if not service or not method:
        return None
    return f"{service}/{method}"[:_MAX_NAME]


def error_type(r: Request) -> str | None:
    """``error.type`` of a server record, or None when it did not fail.

    The record's own ``error_type`` first (a reset, a lost capture, or the gRPC
    status name the parser set), then a server-error gRPC code the parser did
    not name, then an HTTP 5xx status. The same rule drives metric labels,
    span status and the sampler's "always keep errors".
    """
    if r.error_type:
        return r.error_type
    if rpc_system(r) == "grpc":
        code = grpc_status_code(r)
        if code is not None and code in GRPC_SERVER_ERRORS:
            return GRPC_STATUS_NAMES[code]
    if r.status_code is not None and r.status_code >= 500:
        return str(r.status_code)
    return None
