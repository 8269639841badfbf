"""Model names from KServe v2 (Triton) gRPC messages, read from captured bytes.

The KServe v2 gRPC predict protocol (``inference.GRPCInferenceService``, the
``grpc_service.proto`` published with Triton's ``common`` repository) names
the model in field 1 of ``ModelInferRequest`` and of ``ModelInferResponse``
(``string model_name = 1``). ``ModelStreamInfer`` carries a stream of
``ModelInferRequest`` one way and ``ModelStreamInferResponse`` the other,
whose field 2 is the ``ModelInferResponse``.

Captures are bounded prefixes of a message, so this is a minimal protobuf
wire-format reader (https://protobuf.dev/programming-guides/encoding/), not
the generated module: it walks the fields it has, skips what it does not
need by length, and answers None for anything truncated or malformed. It
never raises on any input.

Threading: pure functions; safe from any thread.
"""

from __future__ import annotations

from typing import Final

from agent.http2 import H2Stream

__all__ = [
    "SERVICE",
    "model_name",
    "request_model",
    "response_model",
    "stream_model",
    "stream_response_model",
]

#: The gRPC service of the KServe v2 predict protocol.
SERVICE: Final = "inference.GRPCInferenceService"
_INFER_METHODS: Final = frozenset({"ModelInfer", "ModelStreamInfer"})

_MAX_NAME_BYTES = 1024  # a longer "model name" is not one
_MAX_FIELDS = 4096  # fields walked per message: bounds the work on hostile bytes
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """A base-128 varint at ``pos``: (value, next position), or None if cut or over 10 bytes."""
    value = shift = 0
    end = min(len(buf), pos + 10)
    while pos < end:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


def _field(buf: bytes, number: int) -> bytes | None:
    """The last complete length-delimited value of field ``number`` (proto3: the last wins)."""
    pos, n, found = 0, len(buf), None
    for _ in range(_MAX_FIELDS):
        if pos >= n:
            break
        tag = _varint(buf, pos)
        if tag is None:
            break
        key, pos = tag
        num, wire = key >> 3, key & 7
        if num == 0:
            return None  # field 0 does not exist: not protobuf
        if wire == _VARINT:
            v = _varint(buf, pos)
            if v is None:
                break
            pos = v[1]
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            ln = _varint(buf, pos)
            if ln is None:
                break
            length, pos = ln
            if pos + length > n:
                break  # cut by the capture
            if num == number:
                found = buf[pos : pos + length]
            pos += length
        else:
            return None  # groups (3, 4) are not in this protocol; 6 and 7 are invalid
    return found


def model_name(message: bytes) -> str | None:
    """``model_name`` (field 1) of a ``ModelInferRequest`` or ``ModelInferResponse``.

    ``message`` is the protobuf message (after gRPC's 5-byte prefix), whole or
    a prefix of it. None when the field is absent, empty, cut, not UTF-8 or
    longer than 1024 bytes.
    """
    raw = _field(bytes(message), 1)
    if not raw or len(raw) > _MAX_NAME_BYTES:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stream_response_model(message: bytes) -> str | None:
    """``infer_response.model_name`` of a ``ModelStreamInferResponse`` (field 2, then field 1)."""
    inner = _field(bytes(message), 2)
    return None if inner is None else model_name(inner)


def response_model(message: bytes, rpc_method: str | None) -> str | None:
    """The model named by a response message of ``ModelInfer`` or ``ModelStreamInfer``."""
    if rpc_method == "ModelStreamInfer":
        return stream_response_model(message)
    if rpc_method == "ModelInfer":
        return model_name(message)
    return None


def request_model(stream: H2Stream) -> str | None:
    """The model a KServe v2 inference stream asked for, from its first request message.

    None for other RPCs, a compressed message (``grpc-encoding``: the bytes are
    not protobuf) or a message whose capture does not reach the name.
    """
    if stream.rpc_service != SERVICE or stream.rpc_method not in _INFER_METHODS:
        return None
    if stream.request_compressed:
        return None
    return model_name(stream.request_message)


def stream_model(stream: H2Stream) -> tuple[str | None, str | None]:
    """(requested model, responding model) of a KServe v2 inference stream; see above."""
    if stream.rpc_service != SERVICE or stream.rpc_method not in _INFER_METHODS:
        return None, None
    response = (
        None if stream.response_compressed else response_model(stream.response_message, stream.rpc_method)
    )
    return request_model(stream), response
