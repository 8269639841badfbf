"""LLM API metadata from bounded, possibly truncated request and response bytes.

Which API a request calls (:func:`classify`), the model and ``stream`` flag it
asked for (:func:`parse_request_body`), and what each streamed event, captured
write tail or whole response says (:func:`parse_stream_event`,
:func:`parse_fragment`, :func:`parse_response_body`): whether it carries
generated output, terminal markers, finish reasons, model and token counts.

What comes back is metadata only: model names, counts, finish reasons and
booleans. The text of prompts and completions never leaves this module.

Captures are bounded, so bytes are often cut. Small inputs that look complete
are decoded (OpenAI-compatible and Ollama objects read in C by agent/_llmjson.c,
the rest with :func:`json.loads`); everything else is read with precompiled
patterns over at most :data:`MAX_SCAN_BYTES` bytes. The patterns only trust a
key whose quotes are unescaped (``"model"``, never ``\\"model\\"``): inside a
JSON string every quote is escaped, so text of a prompt or completion cannot
forge a key, even when a capture starts in the middle of that string.

Every function here is pure, thread-safe and never raises on any input bytes.
"""

from __future__ import annotations

import json
import json.scanner
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final
from urllib.parse import unquote

from agent.values import Value

try:  # OpenAI-compatible and Ollama bodies read in C (agent/_llmjson.c); json and _from_object: its reference
    from agent._llmjson import ndjson_chunk_event as _c_ndjson_chunk_event
    from agent._llmjson import ollama_event as _c_ollama_event
    from agent._llmjson import openai_event as _c_openai_event
    from agent._llmjson import request_fields as _c_request_fields
    from agent._llmjson import ring_walk as _c_ring_walk
    from agent._llmjson import sse_chunk_event as _c_sse_chunk_event
    from agent._llmjson import sse_named_event as _c_sse_named_event
    from agent._llmjson import whole_event as _c_whole_event

    NATIVE_JSON = True
except ImportError:  # not built: every body is decoded with json
    NATIVE_JSON = False
_NATIVE: Final = NATIVE_JSON  # Final: compiled, a constant rather than a lookup per record

__all__ = [
    "EMPTY_EVENT",
    "MAX_JSON_BYTES",
    "MAX_SCAN_BYTES",
    "TYPED_APIS",
    "Api",
    "EventInfo",
    "RequestInfo",
    "classify",
    "merge_events",
    "ndjson_chunk_event",
    "openai_event",
    "operation_name",
    "parse_fragment",
    "parse_request_body",
    "parse_response_body",
    "parse_stream_event",
    "path_model",
    "ring_walk",
    "sse_chunk_event",
    "sse_named_event",
    "typed_event",
]

#: Inputs up to this size that look complete are decoded as JSON.
MAX_JSON_BYTES: Final = 65536
#: Pattern scans read at most this many bytes of one input (the start of a
#: prefix, the end of a suffix or fragment).
MAX_SCAN_BYTES: Final = 65536
_MAX_MODEL_CHARS: Final = 256
_MAX_FINISH_REASONS: Final = 8
_MAX_TOKENS: Final = 1 << 40  # larger counts are not real


class Api(StrEnum):
    OPENAI_CHAT = "openai.chat"
    OPENAI_COMPLETIONS = "openai.completions"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    OLLAMA_GENERATE = "ollama.generate"
    OLLAMA_CHAT = "ollama.chat"
    TGI_GENERATE = "tgi.generate"
    TGI_GENERATE_STREAM = "tgi.generate_stream"
    TRITON_GENERATE = "triton.generate"
    TRITON_GENERATE_STREAM = "triton.generate_stream"
    TRITON_INFER = "triton.infer"
    OPENAI_RESPONSES = "openai.responses"
    ANTHROPIC_MESSAGES = "anthropic.messages"


_EXACT_PATHS: Final[dict[str, Api]] = {
    "/v1/chat/completions": Api.OPENAI_CHAT,
    "/v1/completions": Api.OPENAI_COMPLETIONS,
    "/v1/embeddings": Api.OPENAI_EMBEDDINGS,
    "/api/generate": Api.OLLAMA_GENERATE,
    "/api/chat": Api.OLLAMA_CHAT,
    "/generate": Api.TGI_GENERATE,
    "/generate_stream": Api.TGI_GENERATE_STREAM,
    "/v1/responses": Api.OPENAI_RESPONSES,
    "/v1/messages": Api.ANTHROPIC_MESSAGES,
}
_TRITON_PATH: Final = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/(generate_stream|generate|infer)")
_TRITON_APIS: Final = {
    "generate": Api.TRITON_GENERATE,
    "generate_stream": Api.TRITON_GENERATE_STREAM,
    "infer": Api.TRITON_INFER,
}
_OPERATIONS: Final[dict[Api, str]] = {
    Api.OPENAI_CHAT: "chat",
    Api.OLLAMA_CHAT: "chat",
    Api.OPENAI_COMPLETIONS: "text_completion",
    Api.OPENAI_EMBEDDINGS: "embeddings",
    Api.OPENAI_RESPONSES: "chat",
    Api.ANTHROPIC_MESSAGES: "chat",
}
# APIs whose streaming is fixed by the route, not by the body.
_ROUTE_STREAMING: Final[dict[Api, bool]] = {
    Api.OPENAI_EMBEDDINGS: False,
    Api.TGI_GENERATE: False,
    Api.TGI_GENERATE_STREAM: True,
    Api.TRITON_GENERATE: False,
    Api.TRITON_GENERATE_STREAM: True,
    Api.TRITON_INFER: False,
}
# Defaults when a complete body has no "stream" key.
_STREAM_DEFAULTS: Final[dict[Api, bool]] = {
    Api.OPENAI_CHAT: False,
    Api.OPENAI_COMPLETIONS: False,
    Api.OLLAMA_GENERATE: True,  # Ollama streams unless told "stream": false
    Api.OLLAMA_CHAT: True,
    Api.OPENAI_RESPONSES: False,
    Api.ANTHROPIC_MESSAGES: False,
}
_TRITON = (Api.TRITON_GENERATE, Api.TRITON_GENERATE_STREAM, Api.TRITON_INFER)


def _path_only(path: str) -> str:
    p = path.split("?", 1)[0].split("#", 1)[0]
    if p.startswith(("http://", "https://")):  # absolute-form target (RFC 9112 §3.2.2)
        slash = p.find("/", p.find("//") + 2)
        p = p[slash:] if slash >= 0 else "/"
    if len(p) > 1 and p.endswith("/"):
        p = p.rstrip("/") or "/"
    return p


def classify(method: str, path: str) -> Api | None:
    """The LLM API a request calls, or None. Only POST is an LLM call; the query is ignored."""
    if method != "POST":
        return None
    api = _EXACT_PATHS.get(path)  # the path as servers are called: nothing to take off it
    if api is not None:
        return api
    p = _path_only(path)
    api = _EXACT_PATHS.get(p)
    if api is not None:
        return api
    m = _TRITON_PATH.fullmatch(p)
    return _TRITON_APIS[m.group(2)] if m else None


def operation_name(api: Api) -> str:
    """The OpenTelemetry ``gen_ai.operation.name`` for ``api``."""
    return _OPERATIONS.get(api, "generate_content")


def path_model(api: Api, path: str) -> str | None:
    """The model named in the URL (Triton / KServe v2), or None."""
    if api not in _TRITON:
        return None
    m = _TRITON_PATH.fullmatch(_path_only(path))
    return _clean_model(unquote(m.group(1))) if m else None


# --- results ------------------------------------------------------------------


class RequestInfo(Value):
    """What a request body says (an immutable value, see agent/values.py)."""

    __slots__ = ("model", "stream")

    def __init__(self, model: str | None, stream: bool | None) -> None:
        self.model: Final = model  # the requested model, None when not visible
        self.stream: Final = stream  # whether a streamed response was asked for, None when unknown

    def _key(self) -> tuple[object, ...]:
        return (self.model, self.stream)


class EventInfo(Value):
    """What one event, fragment or body says (an immutable value, see agent/values.py)."""

    __slots__ = ("done", "error", "finish_reasons", "input_tokens", "model", "output", "output_tokens")

    def __init__(
        self,
        output: bool | None = None,
        done: bool = False,
        model: str | None = None,
        finish_reasons: tuple[str, ...] = (),
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        error: bool = False,
    ) -> None:
        self.output: Final = output  # carries generated output; None: cannot tell from what was captured
        self.done: Final = done  # a terminal marker: [DONE], Ollama "done":true, TGI details
        self.model: Final = model
        self.finish_reasons: Final = finish_reasons  # non-null finish reasons, in order, without repeats
        self.input_tokens: Final = input_tokens
        self.output_tokens: Final = output_tokens
        # the server reports an error in the body: a top-level "error" (OpenAI-compatible servers,
        # Ollama, TGI, Triton), an event of type "error" (Responses, Messages) or response.failed
        self.error: Final = error

    def _key(self) -> tuple[object, ...]:
        return (self.output, self.done, self.model, self.finish_reasons, self.input_tokens, self.output_tokens,
                self.error)


EMPTY_EVENT: Final = EventInfo()
_DONE_EVENT: Final = EventInfo(output=False, done=True)


def merge_events(first: EventInfo, later: EventInfo) -> EventInfo:
    """Combine what two parts of one response say.

    Output is True if either shows output, False if one shows none and neither
    shows some; ``done`` and ``error`` if either says so; the first model seen;
    finish reasons from both; token counts from ``later`` when it has them (usage
    arrives last, and servers that repeat it send growing counts).
    """
    if later is EMPTY_EVENT:
        return first
    if first is EMPTY_EVENT:
        return later
    if first.output or later.output:
        output: bool | None = True
    elif first.output is None and later.output is None:
        output = None
    else:
        output = False
    reasons = first.finish_reasons
    for r in later.finish_reasons:
        if r not in reasons and len(reasons) < _MAX_FINISH_REASONS:
            reasons = (*reasons, r)
    return EventInfo(
        output=output,
        done=first.done or later.done,
        model=first.model if first.model is not None else later.model,
        finish_reasons=reasons,
        input_tokens=later.input_tokens if later.input_tokens is not None else first.input_tokens,
        output_tokens=later.output_tokens if later.output_tokens is not None else first.output_tokens,
        error=first.error or later.error,
    )


# --- entry points -------------------------------------------------------------


def parse_request_body(api: Api, prefix: bytes, suffix: bytes | None = None) -> RequestInfo:
    """Model and stream flag from a request body.

    ``prefix`` is the start of the body (maybe cut); ``suffix`` the end of the
    body when its middle was not captured (None when ``prefix`` is the whole
    body). Both are searched: openai-python 1.x writes ``model`` after a long
    ``messages`` array (later versions write it first).
    """
    model: str | None = None
    stream: bool | None = None
    whole = False
    fields = _c_request_fields(prefix) if _NATIVE and suffix is None else None
    obj = _load_complete(prefix) if suffix is None and fields is None else None
    if fields is not None:
        whole = True
        model, stream = fields
    elif isinstance(obj, dict):
        whole = True
        model = _clean_model(obj.get("model"))
        s = obj.get("stream")
        stream = s if isinstance(s, bool) else None
    else:
        for part in _parts(prefix, suffix):
            if model is None:
                model = _find_string(_MODEL, part)
            if stream is None:
                stream = _find_stream(part)
    if api in _ROUTE_STREAMING:
        stream = _ROUTE_STREAMING[api]
    elif stream is None and whole:
        stream = _STREAM_DEFAULTS.get(api)
    return RequestInfo(model, stream)


def parse_stream_event(api: Api, data: bytes, truncated: bool = False) -> EventInfo:
    """What one SSE ``data`` payload or one NDJSON line says.

    ``truncated``: the payload was cut (bound or gap), so it is read with
    patterns instead of being decoded.
    """
    s = data.strip()
    if not s:
        return EMPTY_EVENT
    if s == b"[DONE]":
        return _DONE_EVENT
    if not truncated:
        info = _object_event(api, s)
        if info is not None:
            return info
    return _from_text(api, _head(s))


def parse_fragment(api: Api, fragment: bytes) -> EventInfo:
    """What the last bytes of one response write show.

    ``fragment`` starts anywhere (mid-JSON, mid chunk-size line) and may span
    several events: usage counts, finish reasons, done markers and visible
    output are merged. ``output`` is False when event bodies are visible and
    none carries output, None when nothing tells.
    """
    if api in TYPED_APIS:
        return _typed_fragment(api, fragment)
    if (len(fragment) <= _DONE_WRITE_MAX and fragment in _DONE_WRITES
            and api not in _OLLAMA and api not in _TGI):
        return _DONE_EVENT  # what the scan below finds in it, without the scan
    obj = _c_whole_event(fragment) if _NATIVE else _whole_event(fragment)
    if obj is not None:
        info = _object_event(api, obj)
        if info is not None:
            return info
    return _from_text(api, _tail(fragment))


def _event_starts(write: bytes, ndjson: bool) -> list[int]:
    """Where the events that start in ``write`` begin: each SSE ``data`` line that follows no
    other ``data`` line (an event's further ``data`` lines belong to it), or each NDJSON line
    that opens an object. A start moves back over the chunk-size line just before it, so the
    piece from one start to the next is one chunk of chunked coding."""
    mark = b"{" if ndjson else b"data:"
    starts: list[int] = []
    prev_start = -1  # where the line before this one starts
    prev_data = False  # that line is a data line
    pos = 0
    n = len(write)
    while pos < n:
        end = write.find(b"\n", pos)
        if end < 0:
            end = n
        is_data = write.startswith(mark, pos)
        if is_data and (ndjson or not prev_data):
            at = pos
            if prev_start >= 0 and _is_size_line(write[prev_start:pos]):
                at = prev_start
            starts.append(at)
        prev_start = pos
        prev_data = is_data
        pos = end + 1
    return starts


def _is_size_line(line: bytes) -> bool:
    """A chunk-size line of chunked coding, its line end included: 1 to 8 hex digits, CRLF."""
    if not 3 <= len(line) <= 10 or not line.endswith(b"\r\n"):
        return False
    for c in line[:-2]:
        if not (48 <= c <= 57 or 65 <= c <= 70 or 97 <= c <= 102):
            return False
    return True


def write_events(write: bytes, ndjson: bool) -> int:
    """How many events start in one write of an SSE (or, ``ndjson``, NDJSON) stream. A server
    writes one event per write until its socket backs up (a slow client, or a busy server):
    then several events leave in one write. agent/_llmjson.c ``ring_walk`` counts the same way
    for the writes of a tail ring it does not read (tests compare)."""
    if ndjson:
        if write.count(b"\n{") + (1 if write.startswith(b"{") else 0) <= 1:
            return 1 if write.startswith(b"{") or b"\n{" in write else 0
    elif write.count(b"data:") <= 1:
        return 1 if write.startswith(b"data:") or b"\ndata:" in write else 0
    return len(_event_starts(write, ndjson))


def split_events(write: bytes, ndjson: bool) -> list[tuple[bytes, bool]]:
    """``write`` cut before each event that starts in it (:func:`write_events`), each piece with
    whether an event starts it: the first piece may be the end of an earlier event."""
    starts = _event_starts(write, ndjson)
    if not starts:
        return [(write, False)]
    out: list[tuple[bytes, bool]] = []
    if starts[0] > 0:
        out.append((write[: starts[0]], False))
    for i, at in enumerate(starts):
        out.append((write[at : starts[i + 1] if i + 1 < len(starts) else len(write)], True))
    return out


def openai_event(
    api: Api, data: bytes
) -> tuple[bool, str | None, tuple[str, ...], int | None, int | None] | None:
    """What one whole OpenAI-compatible chat or completions object in ``data`` says, as
    :func:`parse_stream_event` reads it untruncated (output, model, finish reasons, input and
    output tokens), read in C; None for other APIs, where agent/_llmjson.c is not built, or
    where it does not decide (parse_stream_event then reads ``data``)."""
    if _NATIVE and api in _OPENAI_OBJECTS:
        return _c_openai_event(data, api is _CHAT)
    return None


RingWalk = tuple[int, int, int, int, int, int | None, int | None, str | None, tuple[str, ...], int | None,
                 int | None]


def ring_walk(api: Api, raw: bytes, slots: bytes, lo: int, hi: int, sample: int, seen: int,
              output_seen: bool) -> RingWalk | None:
    """A summary's tail ring read in C for the OpenAI-compatible chat and completions APIs
    (agent/_llmjson.c ``ring_walk``, which says what it returns); None for other APIs, where
    the module is not built, or where a slot is not one it decides."""
    if _NATIVE and api in _OPENAI_OBJECTS:
        return _c_ring_walk(raw, slots, lo, hi, sample, seen, output_seen, api is _CHAT)
    return None


# One whole write of one event: an optional chunk-size line (1-8 hex digits, CRLF), one SSE
# ``data`` line ("data:", an optional space) or one NDJSON line holding a JSON object, its one
# or two line ends (CRLF or LF), and the chunk's CRLF. That is the regular expression
#   (?:([0-9A-Fa-f]{1,8})\r\n)?((?:data: ?)?(\{[^\r\n]*\})(?:\r?\n){1,2}?)(\r\n)?
# matched whole (tests/test_llm.py holds it as the reference), read here with a few byte
# searches: the regular expression took 2.4 µs per streamed write, half the write's reading.
# After the object, what a fragment may hold, mapped to (bytes of line ends, chunk CRLF or not),
# in the order the expression tries them (its line ends lazily, one before two; its CRLF
# greedily): "\r\n\r\n" is one line end and the chunk's CRLF, not two line ends.
_ENDINGS: dict[bytes, tuple[int, bool]] = {}
for _n in (1, 2):
    for _ends in ((b"\r\n", b"\n") if _n == 1 else
                  (b"\r\n\r\n", b"\r\n\n", b"\n\r\n", b"\n\n")):
        for _crlf in (True, False):
            _ENDINGS.setdefault(_ends + (b"\r\n" if _crlf else b""), (len(_ends), _crlf))
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"


def _done_writes() -> frozenset[bytes]:
    # A write of one whole SSE [DONE] event, in each form _whole_event takes for an object:
    # an optional chunk-size line (its digits in either case) and its CRLF, "data:" and an
    # optional space, one or two line ends. Most streams end with one.
    out: set[bytes] = set()
    for space in (b"", b" "):
        for ends, (_, crlf) in _ENDINGS.items():
            body = b"data:" + space + b"[DONE]" + ends
            if not crlf:
                out.add(body)
                continue
            event = body[:-2]  # the line ends, the chunk's CRLF removed
            for size in (b"%x" % len(event), b"%X" % len(event)):
                out.add(size + b"\r\n" + body)
    return frozenset(out)


_DONE_WRITES: Final = _done_writes()
_DONE_WRITE_MAX: Final = max(len(w) for w in _DONE_WRITES)  # longer writes are not looked up (hashed)


def _whole_event(fragment: bytes) -> bytes | None:
    """The JSON object of a write that holds exactly one event, whole (most streamed writes:
    servers flush each event as it is made); None for anything else. Decoding it is faster
    than scanning it as cut text, and exact."""
    if len(fragment) > MAX_JSON_BYTES:
        return None
    pos = 0
    size = -1
    crlf = fragment.find(b"\r\n", 0, 10)
    if 1 <= crlf <= 8:
        digits = fragment[:crlf]
        if not digits.strip(_HEX_DIGITS):
            size = int(digits, 16)
            pos = crlf + 2
    body = pos
    if fragment.startswith(b"data:", pos):
        pos += 5
        if fragment.startswith(b" ", pos):
            pos += 1
    if not fragment.startswith(b"{", pos):
        return None
    # the object runs to the line's end, and ends the line with "}"
    lf = fragment.find(b"\n", pos)
    if lf < 0:
        return None
    cr = fragment.find(b"\r", pos, lf)
    end = cr if cr >= 0 else lf
    if end - pos < 2 or fragment[end - 1] != 0x7D:  # "}"
        return None
    ending = _ENDINGS.get(fragment[end:])
    if ending is None:
        return None
    ends, chunk_crlf = ending
    if size < 0:
        return None if chunk_crlf else fragment[pos:end]
    return fragment[pos:end] if chunk_crlf and size == end + ends - body else None


def sse_chunk_event(write: bytes) -> bytes | None:
    """The JSON object of a response write that is exactly one chunk (a size line, its data
    and CRLF) holding exactly one whole SSE ``data:`` event; None for anything else, and always
    None where agent/_llmjson.c is not built (agent/assemble.py then parses the write)."""
    return _c_sse_chunk_event(write) if _NATIVE else None


def sse_named_event(write: bytes) -> tuple[bytes, bytes] | None:
    """The name and JSON object of a response write that is exactly one chunk holding exactly
    one whole SSE event with an ``event:`` line (1-64 letters, digits, ``_`` or ``.``) before
    its ``data:`` line, as the typed-event APIs stream (:data:`TYPED_APIS`); None for anything
    else, and always None where agent/_llmjson.c is not built."""
    return _c_sse_named_event(write) if _NATIVE else None


def ndjson_chunk_event(write: bytes) -> bytes | None:
    """As :func:`sse_chunk_event`, for one whole NDJSON line (an object and its LF or CRLF)."""
    return _c_ndjson_chunk_event(write) if _NATIVE else None


def parse_response_body(api: Api, prefix: bytes, suffix: bytes | None = None) -> EventInfo:
    """What a non-streamed JSON response says (``prefix``/``suffix`` as in :func:`parse_request_body`)."""
    if suffix is None:
        info = _c_object_event(api, prefix)
        if info is not None:
            return info
        obj = _load_complete(prefix)
        if isinstance(obj, list) and obj and isinstance(obj[0], dict):
            obj = obj[0]  # TGI answers a list for batched inputs
        if isinstance(obj, dict):
            return _from_object(api, obj)
        return _from_text(api, _head(prefix))
    return merge_events(_from_text(api, _head(prefix)), _from_text(api, _tail(suffix)))


# --- decoded objects ----------------------------------------------------------

#: The APIs whose objects agent/_llmjson.c reads: OpenAI-compatible chunks and bodies, and
#: (with :data:`_OLLAMA`) Ollama's own NDJSON lines and bodies.
_OPENAI_OBJECTS: Final = (Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS)
_CHAT: Final = Api.OPENAI_CHAT  # a Final constant: compiled, `Api.OPENAI_CHAT` is two lookups


def _c_object_event(api: Api, s: bytes) -> EventInfo | None:
    """What agent/_llmjson.c reads in ``s``; None where it does not decide (or is not built)."""
    if _NATIVE:
        if api in _OPENAI_OBJECTS:
            got = _c_openai_event(s, api is _CHAT)
            if got is not None:
                return EventInfo(got[0], False, got[1], got[2], got[3], got[4])
        elif api in _OLLAMA:
            got6 = _c_ollama_event(s, api is Api.OLLAMA_CHAT)
            if got6 is not None:
                return EventInfo(got6[0], got6[1], got6[2], got6[3], got6[4], got6[5])
    return None


def _object_event(api: Api, s: bytes) -> EventInfo | None:
    """What ``s`` says when it is one whole JSON object; None when it is not."""
    info = _c_object_event(api, s)
    if info is not None:
        return info
    obj = _load_complete(s)
    if isinstance(obj, dict):
        return _from_object(api, obj)
    return None


def _from_object(api: Api, obj: dict[str, Any]) -> EventInfo:
    info = _from_object_fields(api, obj)
    if obj.get("error") is not None and api not in TYPED_APIS:
        # {"error": ...} in place of an event: vLLM, SGLang and llama.cpp ({"error": {"message",
        # "type", "code"}}), Ollama, TGI ({"error", "error_type"}) and Triton ({"error": "..."})
        return EventInfo(False, info.done, info.model, info.finish_reasons, info.input_tokens, info.output_tokens,
                         True)
    return info


def _from_object_fields(api: Api, obj: dict[str, Any]) -> EventInfo:
    output: bool | None = False
    done = False
    reasons: list[str] = []
    in_tok: int | None = None
    out_tok: int | None = None
    model = _clean_model(obj.get("model"))

    if api in (Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS):
        choices = obj.get("choices")
        if isinstance(choices, list):
            for c in choices[:256]:
                if not isinstance(c, dict):
                    continue
                if api is Api.OPENAI_CHAT:
                    d = c.get("delta")
                    if not isinstance(d, dict):
                        d = c.get("message")
                    if isinstance(d, dict) and _chat_output(d):
                        output = True
                elif _nonempty_str(c.get("text")):
                    output = True
                _add_reason(reasons, c.get("finish_reason"))
        in_tok, out_tok = _usage(obj.get("usage"))
    elif api is Api.OPENAI_EMBEDDINGS:
        data = obj.get("data")
        output = isinstance(data, list) and bool(data)
        in_tok, _ = _usage(obj.get("usage"))
    elif api in (Api.OLLAMA_GENERATE, Api.OLLAMA_CHAT):
        if api is Api.OLLAMA_GENERATE:
            output = _nonempty_str(obj.get("response")) or _nonempty_str(obj.get("thinking"))
        else:
            msg = obj.get("message")
            output = isinstance(msg, dict) and _chat_output(msg)
        done = obj.get("done") is True
        _add_reason(reasons, obj.get("done_reason"))
        in_tok = _count(obj.get("prompt_eval_count"))
        out_tok = _count(obj.get("eval_count"))
    elif api in (Api.TGI_GENERATE, Api.TGI_GENERATE_STREAM):
        token = obj.get("token")
        if isinstance(token, dict):
            output = _nonempty_str(token.get("text")) and token.get("special") is not True
        elif api is Api.TGI_GENERATE:
            output = _nonempty_str(obj.get("generated_text"))
        details = obj.get("details")
        if isinstance(details, dict):
            done = True
            _add_reason(reasons, details.get("finish_reason"))
            out_tok = _count(details.get("generated_tokens"))
            prefill = details.get("prefill")
            if isinstance(prefill, list) and prefill:
                in_tok = len(prefill)
    elif api in (Api.TRITON_GENERATE, Api.TRITON_GENERATE_STREAM):
        model = _clean_model(obj.get("model_name"))
        text = obj.get("text_output")
        if isinstance(text, list):
            output = any(_nonempty_str(t) for t in text[:256])
        else:
            output = _nonempty_str(text)
        _add_reason(reasons, obj.get("finish_reason"))
    elif api is Api.TRITON_INFER:
        model = _clean_model(obj.get("model_name"))
        outputs = obj.get("outputs")
        output = isinstance(outputs, list) and bool(outputs)
    elif api is Api.OPENAI_RESPONSES:
        return _responses_object(obj)
    elif api is Api.ANTHROPIC_MESSAGES:
        return _messages_object(obj)
    return EventInfo(output, done, model, tuple(reasons), in_tok, out_tok)


# --- typed-event APIs ---------------------------------------------------------
#
# The OpenAI Responses API (/v1/responses) and the Anthropic Messages API
# (/v1/messages), both served by vLLM, SGLang, llama.cpp and others, stream SSE
# events named by a "type" (and an "event:" line): the output is in the deltas,
# and the response's model, usage and end are in typed envelope events. A
# Responses stream's end event repeats the whole response, its text included,
# so only its envelope is read. Neither API has OpenAI's finish_reason: a
# response's status (its incomplete_details reason when incomplete) and a
# message's stop_reason are reported as the server gave them.

TYPED_APIS: Final = (Api.OPENAI_RESPONSES, Api.ANTHROPIC_MESSAGES)  # for :func:`typed_event`
#: Responses events that end a response, and the status each reports when its body is cut.
_RESPONSES_END: Final[dict[str, str]] = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "response.cancelled": "cancelled",
}
_MESSAGES_EVENT_NAMES: Final = frozenset((
    b"message_start", b"content_block_start", b"content_block_delta", b"content_block_stop", b"message_delta",
    b"message_stop", b"ping", b"error",
))
_MESSAGES_OUTPUT: Final = ("text", "thinking", "partial_json")


def _responses_reason(r: dict[str, Any]) -> str | None:
    status = r.get("status")
    if status == "incomplete":
        details = r.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return reason if isinstance(reason, str) else "incomplete"
    if status in ("completed", "failed", "cancelled"):
        return str(status)
    return None


def _responses_object(obj: dict[str, Any]) -> EventInfo:
    """One Responses API stream event, or a whole (non-streamed) response object."""
    t = obj.get("type")
    reasons: list[str] = []
    if t == "error":
        return _ERROR_EVENT
    if isinstance(t, str) and t.startswith("response."):
        output = t.endswith(".delta") and _nonempty_str(obj.get("delta"))
        done = t in _RESPONSES_END
        r = obj.get("response")
        if not isinstance(r, dict):
            return EventInfo(output, done, error=t == "response.failed")
        if done:
            _add_reason(reasons, _responses_reason(r))
    elif obj.get("object") == "response":
        r = obj
        items = r.get("output")
        output = isinstance(items, list) and bool(items)
        done = True
        _add_reason(reasons, _responses_reason(r))
    else:
        return EventInfo(False)
    in_tok, out_tok = _typed_usage(r.get("usage"))
    return EventInfo(output, done, _clean_model(r.get("model")), tuple(reasons), in_tok, out_tok,
                     t == "response.failed")


def _typed_usage(usage: object) -> tuple[int | None, int | None]:
    """Input and output tokens, as both typed-event APIs name them in their ``usage``."""
    if not isinstance(usage, dict):
        return None, None
    return _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))


def _messages_object(obj: dict[str, Any]) -> EventInfo:
    """One Messages API stream event, or a whole (non-streamed) message."""
    t = obj.get("type")
    if t == "content_block_delta":
        d = obj.get("delta")
        return EventInfo(isinstance(d, dict) and any(_nonempty_str(d.get(k)) for k in _MESSAGES_OUTPUT))
    if t == "content_block_start":
        b = obj.get("content_block")
        return EventInfo(isinstance(b, dict) and any(_nonempty_str(b.get(k)) for k in _MESSAGES_OUTPUT))
    if t == "message_stop":
        return EventInfo(False, True)
    if t == "error":
        return _ERROR_EVENT
    reasons: list[str] = []
    if t == "message_start":
        m = obj.get("message")
        if not isinstance(m, dict):
            return EventInfo(False)
        output = False
    elif t == "message_delta":
        m = obj
        d = obj.get("delta")
        if isinstance(d, dict):
            _add_reason(reasons, d.get("stop_reason"))
        output = False
    elif t == "message":
        m = obj
        content = obj.get("content")
        output = isinstance(content, list) and bool(content)
        _add_reason(reasons, obj.get("stop_reason"))
    else:
        return EventInfo(False)
    in_tok, out_tok = _typed_usage(m.get("usage"))
    return EventInfo(output, t == "message", _clean_model(m.get("model")), tuple(reasons), in_tok, out_tok)


# an ``event:`` line's field and name, matched where a line starts (:func:`_event_names`)
_EVENT_LINE = re.compile(rb"event: ?([A-Za-z0-9_.]{1,64})\r?(?=\n|$)")
_TYPE_FIELD = re.compile(rb'"type"\s*:\s*"([A-Za-z0-9_.]{1,64})"')
_INPUT_TOKENS = re.compile(rb'"input_tokens"\s*:\s*(\d{1,15})(?=\s*[,}])')
_OUTPUT_TOKENS = re.compile(rb'"output_tokens"\s*:\s*(\d{1,15})(?=\s*[,}])')
_STOP_REASON = re.compile(rb'"stop_reason"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')
_INCOMPLETE_REASON = re.compile(rb'"incomplete_details"\s*:\s*\{\s*"reason"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')
_SSE_META: Final = (b"event:", b"id:", b"retry:", b":")


def _unescaped(s: bytes, pattern: re.Pattern[bytes]) -> list[re.Match[bytes]]:
    """The matches of ``pattern`` (which opens with a quote) that are keys, not string content."""
    return [m for m in pattern.finditer(s) if not (m.start() and s[m.start() - 1] == 0x5C)]


_NOTHING: Final = EventInfo(False)
_ERROR_EVENT: Final = EventInfo(False, error=True)
_MESSAGE_STOP: Final = EventInfo(False, True)
_OUTPUT: Final = EventInfo(True)


def typed_event(api: Api, name: bytes, data: bytes) -> EventInfo | None:
    """What a typed event named ``name`` says when its name and a glance at ``data`` tell it all,
    without decoding it; None when ``data`` must be read. A Responses event named for an output
    item, content part or text (``response.output_text.done``, ``...content_part.added``)
    carries no output and nothing the record takes: the whole text, at times. A delta is output
    unless its ``delta`` string is empty (found as the key itself: in JSON text every quote is
    escaped)."""
    if api is Api.OPENAI_RESPONSES:
        if name.count(b".") < 2 or not name.startswith(b"response."):
            return None  # the response's own events: model, status, usage
        if not name.endswith(b".delta"):
            return _NOTHING
        if data.find(b'"delta":""') >= 0:
            return _NOTHING
        return _OUTPUT if data.find(b'"delta":"') >= 0 else None
    if api is Api.ANTHROPIC_MESSAGES:
        if name == b"ping" or name == b"content_block_stop":
            return _NOTHING
        if name == b"message_stop":
            return _MESSAGE_STOP
    return None


def _name_line(fragment: bytes) -> tuple[bytes, int] | None:
    """The name in a fragment that opens (after an optional chunk-size line) with an ``event:``
    line, and where the line after it starts; None when it does not."""
    pos = 0
    crlf = fragment.find(b"\r\n", 0, 12)
    if 1 <= crlf <= 10 and not fragment[:crlf].strip(_HEX_DIGITS):
        pos = crlf + 2
    if not fragment.startswith(b"event:", pos):
        return None
    lf = fragment.find(b"\n", pos, pos + 80)
    if lf < 0:
        return None
    return fragment[pos + 6:lf].strip(), lf + 1


def _typed_fragment(api: Api, fragment: bytes) -> EventInfo:
    """:func:`parse_fragment` for the typed-event APIs: each whole ``data:`` object decoded,
    and what is cut read with patterns; a write of one event whose name says all
    (:func:`typed_event`) is not decoded."""
    named = _name_line(fragment)
    if named is not None and fragment.find(b"\nevent:", named[1]) < 0:
        got = typed_event(api, named[0], fragment[named[1]:])
        if got is not None:
            return got
    info = EMPTY_EVENT
    cut = False
    for line in fragment[-MAX_SCAN_BYTES:].split(b"\n")[:1024]:
        line = line.rstrip(b"\r")
        if not line:
            continue
        if line.startswith(b"data:"):
            obj = _load_complete(line[5:])
            if isinstance(obj, dict):
                info = merge_events(info, _from_object(api, obj))
                continue
        elif line.startswith(_SSE_META) or (len(line) <= 8 and not line.strip(_HEX_DIGITS)):
            continue  # an SSE field that is not data, or a chunk-size line
        cut = True
    if cut or info is EMPTY_EVENT:
        info = merge_events(info, _typed_from_text(api, fragment[-MAX_SCAN_BYTES:]))
    return info


def _event_names(s: bytes) -> list[bytes]:
    """The names of the ``event:`` lines in ``s``: each occurrence found with a byte search
    and matched where it starts a line (a pattern that also matched the line start tried every
    position of ``s``, at several times the cost)."""
    names: list[bytes] = []
    pos = s.find(b"event:")
    while pos >= 0:
        if pos == 0 or s[pos - 1] == 0x0A:
            m = _EVENT_LINE.match(s, pos)
            if m is not None:
                names.append(m.group(1))
        pos = s.find(b"event:", pos + 6)
    return names


def _typed_from_text(api: Api, s: bytes) -> EventInfo:
    """What cut bytes of a typed-event stream show: the events named in them (an ``event:``
    line, or a ``type`` key naming an event), usage counts, the model and the end. Each pattern
    runs only where its key is in ``s`` (a byte search is far cheaper than a scan)."""
    responses = api is Api.OPENAI_RESPONSES
    names: list[bytes] = []
    if s.find(b"event:") >= 0:
        names = _event_names(s)
    if s.find(b'"type"') >= 0:
        names += [m.group(1) for m in _unescaped(s, _TYPE_FIELD)]
    reasons: list[str] = []
    output: bool | None = None
    done = error = False
    for name in names:
        if name == b"error" or name == b"response.failed":
            error = True
        if responses:
            if not name.startswith(b"response."):
                continue  # an item's or a part's own type
            is_output = name.endswith(b".delta")
            end = _RESPONSES_END.get(name.decode())
            if end is not None:
                done = True
                if end == "incomplete":
                    # its reason, where visible; the part of the event that shows it
                    # (near the response's start) says so when the ring keeps it
                    found = _unescaped(s, _INCOMPLETE_REASON) if s.find(b'"incomplete_details"') >= 0 else []
                    end = found[-1].group(1).decode() if found else None
                _add_reason(reasons, end)
        else:
            if name not in _MESSAGES_EVENT_NAMES:
                continue  # a content block's or a delta's own type
            is_output = name == b"content_block_delta"
            done = done or name == b"message_stop"
        output = True if is_output else (output or False)
    if not responses and s.find(b'"stop_reason"') >= 0:
        for m in _unescaped(s, _STOP_REASON):
            _add_reason(reasons, m.group(1).decode())
    ins = _unescaped(s, _INPUT_TOKENS) if s.find(b'"input_tokens"') >= 0 else []
    outs = _unescaped(s, _OUTPUT_TOKENS) if s.find(b'"output_tokens"') >= 0 else []
    return EventInfo(
        output, done, _find_string(_MODEL, s) if s.find(b'"model"') >= 0 else None, tuple(reasons),
        _count(int(ins[-1].group(1))) if ins else None, _count(int(outs[-1].group(1))) if outs else None, error,
    )


def _chat_output(d: dict[str, Any]) -> bool:
    # A role-only first chunk ({"role":"assistant","content":""}) and the
    # finish chunk ({}) carry no output.
    for key in ("content", "reasoning_content", "reasoning", "thinking", "refusal"):
        if _nonempty_str(d.get(key)):
            return True
    tool_calls = d.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        return True
    fc = d.get("function_call")
    return isinstance(fc, dict) and bool(fc)


def _usage(usage: object) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _nonempty_str(v: object) -> bool:
    return isinstance(v, str) and v != ""


def _count(v: object) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_TOKENS:
        return v
    return None


_REASON_CHARS: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _add_reason(reasons: list[str], v: object) -> None:
    # Finish reasons become label values: keep only short, plain tokens.
    if (
        isinstance(v, str)
        and v not in reasons
        and len(reasons) < _MAX_FINISH_REASONS
        and _REASON_CHARS.fullmatch(v)
    ):
        reasons.append(v)


def _clean_model(v: object) -> str | None:
    if isinstance(v, str) and 0 < len(v) <= _MAX_MODEL_CHARS and v.isprintable():
        return v
    return None


# json's C scanner, called directly: ``json.loads`` reaches it through three Python-level
# functions (encoding detection, decode, raw_decode), which cost as much as the scan of a
# streamed chunk. Inputs here start with "{" or "[", so they are UTF-8 (RFC 8259 §8.1).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def _load_complete(s: bytes) -> Any:
    """``json.loads`` for small inputs that look like one whole object or array."""
    if len(s) > MAX_JSON_BYTES:
        return None
    s = s.strip()
    if s[:1] not in (b"{", b"[") or s[-1:] not in (b"}", b"]"):
        return None
    try:
        text = s.decode("utf-8")
        obj, end = _SCAN(text, 0)
    except (ValueError, RecursionError, StopIteration):
        return None
    return obj if end == len(text) else None


# --- patterns over cut bytes --------------------------------------------------
#
# One pass over the bytes finds every key of interest with its value. The
# pattern opens with a literal quote, so the regex engine skips ahead quickly;
# a key whose opening quote follows a backslash is string content (inside a
# JSON string every quote is escaped) and is ignored.

_KEYS = (
    b"model_name|model|finish_reason|done_reason|prompt_tokens|completion_tokens|prompt_eval_count|"
    b"eval_count|generated_tokens|done|details|token|text_output|text|special|content|reasoning_content|"
    b"reasoning|thinking|refusal|tool_calls|function_call|delta|message|choices|response|generated_text|"
    b"outputs|data|error"
)
_FIELD = re.compile(
    rb'"(%s)"\s*:\s*(?:'
    # a string: its visible start (at most 512 bytes) and whether it closes
    rb'"((?:[^"\\]|\\.){0,512})("?)'
    # a number, with the terminator that proves it is not cut
    rb"|(\d{1,15})(?=\s*[,}\]])"
    rb"|(true|false|null)(?![A-Za-z0-9_])"
    # the start of an object or array, and its first token
    rb"|([\[{])(?=\s*([\[{\]}\"]?)))" % _KEYS
)
_LIST_STRING = re.compile(rb'\s*"(.?)', re.DOTALL)  # the first character of a list's first string
_FLAT_OBJECT = re.compile(rb"\{[^{}]*\}")  # an object without nested objects, wholly visible
_MODEL: Final = re.compile(rb'"model"\s*:\s*"((?:[^"\\\x00-\x1f]|\\.){1,512})"')
_STREAM = re.compile(rb'"stream"\s*:\s*(true|false)(?![A-Za-z0-9_])')
_DONE_MARK = re.compile(rb"(?:^|data: ?)\[DONE\]", re.MULTILINE)

# Per API: keys whose non-empty string value is generated output, and keys whose
# non-empty list or object is (tool calls, embeddings, Triton outputs).
_OUTPUT_STRINGS: dict[Api, frozenset[bytes]] = {
    Api.OPENAI_CHAT: frozenset((b"content", b"reasoning_content", b"reasoning", b"thinking", b"refusal")),
    Api.OPENAI_COMPLETIONS: frozenset((b"text",)),
    Api.OPENAI_EMBEDDINGS: frozenset(),
    Api.OLLAMA_GENERATE: frozenset((b"response", b"thinking")),
    Api.OLLAMA_CHAT: frozenset((b"content", b"thinking")),
    Api.TGI_GENERATE: frozenset((b"generated_text",)),
    Api.TGI_GENERATE_STREAM: frozenset(),  # read from the token object instead
    Api.TRITON_GENERATE: frozenset((b"text_output",)),
    Api.TRITON_GENERATE_STREAM: frozenset((b"text_output",)),
    Api.TRITON_INFER: frozenset(),
}
_OUTPUT_LISTS: dict[Api, frozenset[bytes]] = {
    Api.OPENAI_CHAT: frozenset((b"tool_calls", b"function_call")),
    Api.OLLAMA_CHAT: frozenset((b"tool_calls",)),
    Api.OPENAI_EMBEDDINGS: frozenset((b"data",)),
    Api.TRITON_INFER: frozenset((b"outputs",)),
}
_NO_KEYS: frozenset[bytes] = frozenset()
_INPUT_KEYS = frozenset((b"prompt_tokens", b"prompt_eval_count"))
_OUTPUT_KEYS = frozenset((b"completion_tokens", b"eval_count", b"generated_tokens"))
_OLLAMA: Final = (Api.OLLAMA_GENERATE, Api.OLLAMA_CHAT)
_TGI: Final = (Api.TGI_GENERATE, Api.TGI_GENERATE_STREAM)


def _from_text(api: Api, s: bytes) -> EventInfo:
    """What cut JSON shows, read in one pass of :data:`_FIELD` (see the section comment)."""
    if not s:
        return EMPTY_EVENT
    if api in TYPED_APIS:
        return _typed_from_text(api, s)
    ollama, tgi = api in _OLLAMA, api in _TGI
    # find() rather than `in`: on bytes, `in` first tries its operand as an int, and the
    # TypeError it then clears costs more than the search (CPython 3.11)
    if s.find(b'"') < 0:
        # every key pattern opens with a quote: only a [DONE] marker can tell anything
        if not ollama and not tgi and s.find(b"[DONE]") >= 0 and _DONE_MARK.search(s):
            return _DONE_EVENT
        return EMPTY_EVENT
    out_strings = _OUTPUT_STRINGS[api]
    out_lists = _OUTPUT_LISTS.get(api, _NO_KEYS)
    model_key = b"model_name" if api in _TRITON else b"model"
    seen_output = seen_empty = done = error = False
    model: str | None = None
    reasons: list[str] = []
    in_tok: int | None = None
    out_tok: int | None = None

    for m in _FIELD.finditer(s):
        start = m.start()
        if start and s[start - 1] == 0x5C:  # an escaped quote: this is text inside a string
            continue
        key, text, closed, number, literal, opener, first = m.groups()
        if key == b"error":
            error = error or text is not None or opener == b"{"
        elif text is not None:
            if key in out_strings:
                if text:
                    seen_output = True
                elif closed:
                    seen_empty = True
            elif key == model_key:
                if model is None and closed:
                    model = _decode_model(text)
            elif key in (b"finish_reason", b"done_reason"):
                if closed:
                    _add_reason(reasons, text.decode("latin-1"))
                    done = done or (ollama and key == b"done_reason")
            elif key == b"generated_text" and tgi:
                done = True  # set only on the final event, beside details
        elif number is not None:
            if key in _INPUT_KEYS:
                in_tok = _count(int(number))
            elif key in _OUTPUT_KEYS:
                out_tok = _count(int(number))
                done = done or (ollama and key == b"eval_count") or (tgi and key == b"generated_tokens")
        elif literal is not None:
            if key == b"done" and ollama and literal == b"true":
                done = True
            elif key in out_strings and literal == b"null":
                seen_empty = True
        elif opener is not None:
            if key in out_lists:
                if first == b"{" or first == b'"':
                    seen_output = True
                elif first == b"]":
                    seen_empty = True
            elif key in out_strings and opener == b"[":
                item = _LIST_STRING.match(s, m.end())  # a list of strings (Triton text_output)
                if item is not None:
                    if item.group(1) == b'"':
                        seen_empty = True
                    elif item.group(1):
                        seen_output = True
            elif key == b"choices" and first == b"]":
                seen_empty = True  # the usage-only chunk
            elif key in (b"delta", b"message") and opener == b"{":
                if _FLAT_OBJECT.match(s, m.start(6)):
                    seen_empty = True  # a whole delta; output keys inside it are scanned too
            elif key == b"token" and api is Api.TGI_GENERATE_STREAM and opener == b"{":
                obj = _FLAT_OBJECT.match(s, m.start(6))
                if obj is not None:
                    token = _from_tgi_token(obj.group())
                    seen_output = seen_output or token
                    seen_empty = seen_empty or not token
            elif key == b"details" and tgi and opener == b"{":
                done = True

    if not ollama and not tgi and s.find(b"[DONE]") >= 0 and _DONE_MARK.search(s):
        done = True
        seen_empty = True  # the [DONE] event carries no output
    output = True if seen_output else (False if seen_empty else None)
    if error and not seen_output:
        output = False  # the error event carries none
    return EventInfo(output, done, model, tuple(reasons), in_tok, out_tok, error)


_TOKEN_TEXT = re.compile(rb'"text"\s*:\s*"(?:[^"\\]|\\.)')
_TOKEN_SPECIAL = re.compile(rb'"special"\s*:\s*true')


def _from_tgi_token(obj: bytes) -> bool:
    """Whether a whole TGI ``token`` object is output: non-empty text, not special."""
    return _TOKEN_TEXT.search(obj) is not None and _TOKEN_SPECIAL.search(obj) is None


_PLAIN_ASCII: Final = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7f]*")  # JSON string text that is its own value


def _decode_model(raw: bytes) -> str | None:
    if _PLAIN_ASCII.fullmatch(raw) is not None:
        # no escape, control character or UTF-8 beyond ASCII: its JSON text is its bytes, and
        # json.loads costs more than the rest
        return _clean_model(raw.decode("ascii"))
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return _clean_model(value)


def _find_string(pattern: re.Pattern[bytes], s: bytes) -> str | None:
    for m in pattern.finditer(s):
        if m.start() and s[m.start() - 1] == 0x5C:
            continue
        model = _decode_model(m.group(1))
        if model is not None:
            return model
    return None


def _find_stream(s: bytes) -> bool | None:
    for m in _STREAM.finditer(s):
        if m.start() and s[m.start() - 1] == 0x5C:
            continue
        return m.group(1) == b"true"
    return None


def _head(b: bytes) -> bytes:
    return b[:MAX_SCAN_BYTES]


def _tail(b: bytes) -> bytes:
    return b[-MAX_SCAN_BYTES:]


def _parts(prefix: bytes, suffix: bytes | None) -> tuple[bytes, ...]:
    # Scanned apart, never joined: a match across the missing middle would be invented.
    return (_head(prefix),) if suffix is None else (_head(prefix), _tail(suffix))
