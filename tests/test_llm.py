"""LLM API metadata extraction (agent/llm.py) from whole, cut and fragmentary bytes.

Streams are built in the shapes real servers send (vLLM's OpenAI server, Ollama,
TGI, Triton's generate extension) and also run through the wire parsers, so the
same bytes are checked whole, byte by byte, chunked and not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import llm
from agent.http1 import Body, BodyGap, EndOfMessage, H1Parser, NeedData, RequestHead, ResponseHead, header
from agent.llm import (
    EMPTY_EVENT,
    Api,
    EventInfo,
    RequestInfo,
    classify,
    merge_events,
    operation_name,
    parse_fragment,
    parse_request_body,
    parse_response_body,
    parse_stream_event,
    path_model,
)
from agent.ndjson import NDJSONParser
from agent.selfmetrics import SelfMetrics
from agent.sse import SSEParser
from tests.conftest import IN_CI

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SECRET = "SECRET-TEXT"  # prompt and completion text; must never come back


def j(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- realistic streams -------------------------------------------------------------


def vllm_chat_chunks(words: list[str], *, usage_null: bool = False) -> list[bytes]:
    """vLLM /v1/chat/completions with stream_options.include_usage: role chunk, content, finish, usage."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1718000000, "model": MODEL}
    extra = {"usage": None} if usage_null else {}

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish:
            choice["stop_reason"] = None
        return j({**base, "choices": [choice], **extra})

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": w}) for w in words]
    out.append(chunk({"content": ""}, "stop"))
    out.append(
        j(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": 12,
                    "total_tokens": 12 + len(words),
                    "completion_tokens": len(words),
                },
            }
        )
    )
    return out


def sse(payloads: list[bytes], *, space: bool = True) -> list[bytes]:
    prefix = b"data: " if space else b"data:"
    return [prefix + p + b"\n\n" for p in payloads]


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


OLLAMA_CONTEXT = list(range(128000, 128000 + 3000))


def ollama_generate_lines(words: list[str]) -> list[bytes]:
    lines = [
        j({"model": "llama3.2", "created_at": "2024-09-01T00:00:00Z", "response": w, "done": False})
        for w in words
    ]
    lines.append(
        j(
            {
                "model": "llama3.2",
                "created_at": "2024-09-01T00:00:01Z",
                "response": "",
                "done": True,
                "done_reason": "stop",
                "context": OLLAMA_CONTEXT,
                "total_duration": 5589157167,
                "load_duration": 3013701500,
                "prompt_eval_count": 26,
                "prompt_eval_duration": 130079000,
                "eval_count": len(words),
                "eval_duration": 2450436000,
            }
        )
    )
    return lines


def ollama_chat_lines(words: list[str]) -> list[bytes]:
    head = {"model": "llama3.2", "created_at": "2024-09-01T00:00:00Z"}
    lines = [j({**head, "message": {"role": "assistant", "content": w}, "done": False}) for w in words]
    lines.append(
        j(
            {
                **head,
                "message": {"role": "assistant", "content": ""},
                "done_reason": "stop",
                "done": True,
                "total_duration": 4883583458,
                "prompt_eval_count": 26,
                "eval_count": len(words),
            }
        )
    )
    return lines


def tgi_stream_events(words: list[str]) -> list[bytes]:
    out = [
        j(
            {
                "index": i + 1,
                "token": {"id": 100 + i, "text": w, "logprob": -0.1, "special": False},
                "generated_text": None,
                "details": None,
            }
        )
        for i, w in enumerate(words)
    ]
    out.append(
        j(
            {
                "index": len(words) + 1,
                "token": {"id": 128009, "text": "<|eot_id|>", "logprob": -0.01, "special": True},
                "generated_text": "".join(words),
                "details": {"finish_reason": "eos_token", "generated_tokens": len(words) + 1, "seed": None},
            }
        )
    )
    return out


def triton_stream_events(words: list[str]) -> list[bytes]:
    return [
        j(
            {
                "model_name": "ensemble",
                "model_version": "1",
                "sequence_end": False,
                "sequence_id": 0,
                "sequence_start": False,
                "text_output": w,
            }
        )
        for w in words
    ]


WORDS = [f" {SECRET}", " is", " here", "."]


def fold(api: Api, payloads: list[bytes]) -> tuple[EventInfo, int]:
    """Merge what every event says; count output events (as the assembler does)."""
    total = EMPTY_EVENT
    outputs = 0
    for p in payloads:
        info = parse_stream_event(api, p)
        outputs += bool(info.output)
        total = merge_events(total, info)
    return total, outputs


# --- classify, operation_name, path_model --------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v1/chat/completions", Api.OPENAI_CHAT),
        ("POST", "/v1/chat/completions?stream=1", Api.OPENAI_CHAT),
        ("POST", "/v1/chat/completions/", Api.OPENAI_CHAT),
        ("POST", "http://vllm:8000/v1/completions", Api.OPENAI_COMPLETIONS),
        ("POST", "/v1/embeddings", Api.OPENAI_EMBEDDINGS),
        ("POST", "/api/generate", Api.OLLAMA_GENERATE),
        ("POST", "/api/chat", Api.OLLAMA_CHAT),
        ("POST", "/generate", Api.TGI_GENERATE),
        ("POST", "/generate_stream", Api.TGI_GENERATE_STREAM),
        ("POST", "/v2/models/ensemble/generate", Api.TRITON_GENERATE),
        ("POST", "/v2/models/ensemble/versions/3/generate_stream", Api.TRITON_GENERATE_STREAM),
        ("POST", "/v2/models/bert/infer", Api.TRITON_INFER),
        ("POST", "/v1/responses", Api.OPENAI_RESPONSES),
        ("POST", "/v1/messages?beta=true", Api.ANTHROPIC_MESSAGES),
        ("POST", "/v1/responses/resp_123/cancel", None),
        ("POST", "/v1/messages/count_tokens", None),
        ("GET", "/v1/chat/completions", None),
        ("post", "/v1/chat/completions", None),
        ("POST", "/v1/models", None),
        ("POST", "/v1/chat/completions/extra", None),
        ("POST", "/v2/models/a/b/generate", None),
        ("POST", "/metrics", None),
    ],
)
def test_classify(method: str, path: str, api: Api | None) -> None:
    assert classify(method, path) is api


def test_operation_names() -> None:
    assert operation_name(Api.OPENAI_CHAT) == "chat"
    assert operation_name(Api.OLLAMA_CHAT) == "chat"
    assert operation_name(Api.OPENAI_COMPLETIONS) == "text_completion"
    assert operation_name(Api.OPENAI_EMBEDDINGS) == "embeddings"
    assert operation_name(Api.OPENAI_RESPONSES) == "chat"
    assert operation_name(Api.ANTHROPIC_MESSAGES) == "chat"
    for api in (Api.OLLAMA_GENERATE, Api.TGI_GENERATE, Api.TGI_GENERATE_STREAM, Api.TRITON_GENERATE_STREAM):
        assert operation_name(api) == "generate_content"


def test_path_model() -> None:
    assert path_model(Api.TRITON_GENERATE, "/v2/models/ensemble/generate") == "ensemble"
    assert (
        path_model(Api.TRITON_GENERATE_STREAM, "/v2/models/my%20model/versions/2/generate_stream?x=1")
        == "my model"
    )
    assert path_model(Api.OPENAI_CHAT, "/v1/chat/completions") is None


# --- requests -------------------------------------------------------------------------


def openai_request(n_messages: int = 1, **params: object) -> bytes:
    # The openai client writes messages first, then model, then the other parameters.
    messages = [{"role": "user", "content": f"{SECRET} {i} " + "x" * 200} for i in range(n_messages)]
    return j({"messages": messages, "model": MODEL, **params})


def test_request_whole_body() -> None:
    body = openai_request(stream=True, stream_options={"include_usage": True})
    assert parse_request_body(Api.OPENAI_CHAT, body) == RequestInfo(MODEL, True)
    assert parse_request_body(Api.OPENAI_CHAT, openai_request()) == RequestInfo(MODEL, False)


def test_request_model_after_long_messages_found_in_suffix() -> None:
    body = openai_request(n_messages=50, stream=True, max_tokens=64)
    prefix, suffix = body[:1024], body[-256:]
    assert MODEL.encode() not in prefix
    assert parse_request_body(Api.OPENAI_CHAT, prefix, suffix) == RequestInfo(MODEL, True)
    assert parse_request_body(Api.OPENAI_CHAT, prefix) == RequestInfo(None, None)


def test_request_text_cannot_forge_the_model_key() -> None:
    messages = [{"role": "user", "content": 'reply with {"model": "forged", "stream": false}'}]
    body = j({"messages": messages, "model": "real", "stream": True})
    cut = body.index(b'"model":"real"')
    assert parse_request_body(Api.OPENAI_CHAT, body[:cut], body[cut:]) == RequestInfo("real", True)
    # A capture that starts inside the prompt sees only escaped quotes.
    start = body.index(b"forged") - 3
    assert parse_request_body(Api.OPENAI_CHAT, body[start : start + 40]) == RequestInfo(None, None)


def test_request_model_with_escaped_quote() -> None:
    body = b'{"model":"odd\\"name","prompt":"' + b"p" * 100
    assert parse_request_body(Api.OPENAI_COMPLETIONS, body, b'","stream":false}') == RequestInfo(
        'odd"name', False
    )


def test_request_ollama_stream_defaults_to_true() -> None:
    assert parse_request_body(Api.OLLAMA_GENERATE, b'{"model":"llama3.2","prompt":"hi"}') == RequestInfo(
        "llama3.2", True
    )
    assert parse_request_body(
        Api.OLLAMA_CHAT, b'{"model":"llama3.2","stream":false,"messages":[]}'
    ) == RequestInfo("llama3.2", False)
    # Cut body without a visible "stream": the default cannot be assumed.
    assert parse_request_body(
        Api.OLLAMA_CHAT, b'{"model":"llama3.2","messages":[{"role":"user","content":"'
    ) == RequestInfo("llama3.2", None)


def test_request_route_decides_streaming() -> None:
    assert parse_request_body(Api.TGI_GENERATE_STREAM, b'{"inputs":"hi","parameters":{}}') == RequestInfo(
        None, True
    )
    assert parse_request_body(Api.TGI_GENERATE, b'{"inputs":"hi","stream":true}') == RequestInfo(None, False)
    assert parse_request_body(Api.TRITON_GENERATE_STREAM, b'{"text_input":"hi"}') == RequestInfo(None, True)
    assert parse_request_body(Api.OPENAI_EMBEDDINGS, b'{"model":"e5","input":"hi"}') == RequestInfo(
        "e5", False
    )


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"{", b'{"model":123}', b'{"model":"' + b"m" * 1000 + b'"}', b"[1,2]"]
)
def test_request_without_usable_model(body: bytes) -> None:
    assert parse_request_body(Api.OPENAI_CHAT, body).model is None


# --- stream events --------------------------------------------------------------------


def test_vllm_chat_stream_events() -> None:
    role, *content, finish, usage = vllm_chat_chunks(WORDS)
    assert parse_stream_event(Api.OPENAI_CHAT, role) == EventInfo(output=False, model=MODEL)
    assert parse_stream_event(Api.OPENAI_CHAT, content[0]) == EventInfo(output=True, model=MODEL)
    assert parse_stream_event(Api.OPENAI_CHAT, finish) == EventInfo(
        output=False, model=MODEL, finish_reasons=("stop",)
    )
    assert parse_stream_event(Api.OPENAI_CHAT, usage) == EventInfo(
        output=False, model=MODEL, input_tokens=12, output_tokens=len(WORDS)
    )
    assert parse_stream_event(Api.OPENAI_CHAT, b"[DONE]") == EventInfo(output=False, done=True)


@pytest.mark.parametrize("usage_null", [False, True])
def test_vllm_chat_stream_folded(usage_null: bool) -> None:
    total, outputs = fold(Api.OPENAI_CHAT, [*vllm_chat_chunks(WORDS, usage_null=usage_null), b"[DONE]"])
    assert outputs == len(WORDS)
    assert total == EventInfo(True, True, MODEL, ("stop",), 12, len(WORDS))
    assert SECRET not in repr(total)


def test_chat_tool_calls_and_reasoning_are_output() -> None:
    tool = j(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}
    )
    reasoning = j({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]})
    nulls = j({"choices": [{"index": 0, "delta": {"role": None, "content": None, "tool_calls": None}}]})
    assert parse_stream_event(Api.OPENAI_CHAT, tool).output is True
    assert parse_stream_event(Api.OPENAI_CHAT, reasoning).output is True
    assert parse_stream_event(Api.OPENAI_CHAT, nulls).output is False


def test_completions_stream() -> None:
    def chunk(text: str, finish: str | None) -> bytes:
        return j(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": "m",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }
        )

    assert parse_stream_event(Api.OPENAI_COMPLETIONS, chunk(" hi", None)) == EventInfo(output=True, model="m")
    assert parse_stream_event(Api.OPENAI_COMPLETIONS, chunk("", "length")) == EventInfo(
        output=False, model="m", finish_reasons=("length",)
    )


def test_ollama_generate_stream_folded() -> None:
    total, outputs = fold(Api.OLLAMA_GENERATE, ollama_generate_lines(WORDS))
    assert outputs == len(WORDS)
    assert total == EventInfo(True, True, "llama3.2", ("stop",), 26, len(WORDS))


def test_ollama_final_line_cut_by_the_line_bound() -> None:
    final = ollama_generate_lines(WORDS)[-1]
    lines = NDJSONParser(1024, metrics=SelfMetrics()).feed(final + b"\n")
    assert lines[0].truncated
    info = parse_stream_event(Api.OLLAMA_GENERATE, lines[0].data, lines[0].truncated)
    # The counts sit after the context array, beyond the bound; done and the reason are visible.
    assert info == EventInfo(output=False, done=True, model="llama3.2", finish_reasons=("stop",))


def test_ollama_chat_stream_folded() -> None:
    total, outputs = fold(Api.OLLAMA_CHAT, ollama_chat_lines(WORDS))
    assert outputs == len(WORDS)
    assert total == EventInfo(True, True, "llama3.2", ("stop",), 26, len(WORDS))


def test_tgi_stream() -> None:
    events = tgi_stream_events(WORDS)
    assert parse_stream_event(Api.TGI_GENERATE_STREAM, events[0]) == EventInfo(output=True)
    assert parse_stream_event(Api.TGI_GENERATE_STREAM, events[-1]) == EventInfo(
        output=False, done=True, finish_reasons=("eos_token",), output_tokens=len(WORDS) + 1
    )
    total, outputs = fold(Api.TGI_GENERATE_STREAM, events)
    assert (outputs, total.done, total.output_tokens) == (len(WORDS), True, len(WORDS) + 1)
    assert SECRET not in repr(total)


def test_triton_generate_stream() -> None:
    total, outputs = fold(Api.TRITON_GENERATE_STREAM, triton_stream_events(WORDS))
    assert outputs == len(WORDS)
    assert total == EventInfo(output=True, model="ensemble")
    empty = j({"model_name": "ensemble", "text_output": ""})
    assert parse_stream_event(Api.TRITON_GENERATE_STREAM, empty).output is False


def test_truncated_events_use_patterns() -> None:
    content = vllm_chat_chunks([" word"])[1]
    cut = content[:-20]  # cut inside the choices array
    assert parse_stream_event(Api.OPENAI_CHAT, cut, truncated=True) == EventInfo(output=True, model=MODEL)
    role = vllm_chat_chunks([])[0]
    assert parse_stream_event(Api.OPENAI_CHAT, role[:-2], truncated=True).output is False
    # Nothing about the delta is visible: cannot tell.
    assert parse_stream_event(Api.OPENAI_CHAT, content[:60], truncated=True).output is None


REALISTIC_EVENTS = [
    *[(Api.OPENAI_CHAT, e) for e in vllm_chat_chunks(WORDS)],
    *[(Api.OPENAI_CHAT, e) for e in vllm_chat_chunks(WORDS[:1], usage_null=True)],
    (
        Api.OPENAI_CHAT,
        j(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]},
                    }
                ]
            }
        ),
    ),
    (
        Api.OPENAI_CHAT,
        j({"choices": [{"index": 0, "delta": {"role": None, "content": None, "reasoning_content": "r"}}]}),
    ),
    (Api.OPENAI_CHAT, j({"choices": [{"index": 0, "delta": {"function_call": {"arguments": "{"}}}]})),
    (Api.OPENAI_CHAT, j({"choices": [{"index": 0, "delta": {"content": None, "tool_calls": []}}]})),
    (
        Api.OPENAI_COMPLETIONS,
        j({"model": "m", "choices": [{"index": 0, "text": " a", "finish_reason": None}]}),
    ),
    (
        Api.OPENAI_COMPLETIONS,
        j({"model": "m", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
    ),
    *[(Api.OLLAMA_GENERATE, e) for e in ollama_generate_lines(WORDS[:2])],
    *[(Api.OLLAMA_CHAT, e) for e in ollama_chat_lines(WORDS[:2])],
    *[(Api.TGI_GENERATE_STREAM, e) for e in tgi_stream_events(WORDS[:2])],
    *[(Api.TRITON_GENERATE_STREAM, e) for e in triton_stream_events(WORDS[:2])],
    (Api.TRITON_GENERATE_STREAM, j({"model_name": "ensemble", "text_output": [" a", " b"]})),
    (Api.TRITON_GENERATE_STREAM, j({"model_name": "ensemble", "text_output": [""]})),
]


@pytest.mark.parametrize(("api", "data"), REALISTIC_EVENTS)
def test_patterns_agree_with_json_on_whole_events(api: Api, data: bytes) -> None:
    # truncated=True forces the pattern path; on whole events it must read what json.loads reads.
    assert parse_stream_event(api, data, truncated=True) == parse_stream_event(api, data)
    spaced = data.replace(b'":', b'" : ').replace(b",", b", ")
    assert parse_fragment(api, spaced) == parse_stream_event(api, data)


@pytest.mark.parametrize(("api", "data"), REALISTIC_EVENTS)
def test_a_write_of_one_whole_event_is_decoded_and_reads_as_the_scan_does(api: Api, data: bytes) -> None:
    ndjson = api in (Api.OLLAMA_GENERATE, Api.OLLAMA_CHAT)
    event = data + b"\n" if ndjson else b"data: " + data + b"\n\n"
    for write in (b"%x\r\n%s\r\n" % (len(event), event), event):  # chunked, and read-to-close
        assert llm._whole_event(write) == data
        # the decoded path and the cut-text scan (what any other write gets) agree
        assert parse_fragment(api, write) == llm._from_text(api, write) == parse_stream_event(api, data)


@pytest.mark.parametrize("api", list(Api))
def test_a_write_of_one_done_event_reads_as_the_scan_does(api: Api) -> None:
    # parse_fragment answers these writes without the scan; the answer must be the scan's
    writes = sorted(llm._DONE_WRITES)
    assert b"e\r\ndata: [DONE]\n\n\r\n" in writes and b"data: [DONE]\n\n" in writes
    for write in writes:
        assert parse_fragment(api, write) == llm._from_text(api, write), write
        body = write.split(b"\r\n", 1)[1] if not write.startswith(b"data") else write
        assert body.split(b"[DONE]")[0] in (b"data:", b"data: "), write
    if api in (Api.OLLAMA_GENERATE, Api.OLLAMA_CHAT, Api.TGI_GENERATE, Api.TGI_GENERATE_STREAM,
               Api.OPENAI_RESPONSES, Api.ANTHROPIC_MESSAGES):
        assert parse_fragment(api, b"data: [DONE]\n\n") == EMPTY_EVENT  # no [DONE] in these APIs
    else:
        assert parse_fragment(api, b"e\r\ndata: [DONE]\n\n\r\n") == EventInfo(output=False, done=True)
    # a chunk whose size disagrees is not one of them, and is scanned
    assert b"f\r\ndata: [DONE]\n\n\r\n" not in llm._DONE_WRITES


def test_writes_that_are_not_one_whole_event_are_scanned() -> None:
    event = b"data: " + j({"model": MODEL, "choices": [{"delta": {"content": "hi"}}]}) + b"\n\n"
    for write in (
        b"%x\r\n%s\r\n" % (len(event) + 1, event),  # the chunk size disagrees
        b"%x\r\n%s" % (len(event), event),  # the chunk's CRLF is missing
        event + event,  # two events
        event[:-8] + b"\n\n",  # the object is cut
        b"event: delta\n" + event,  # a field besides data
    ):
        assert llm._whole_event(write) is None, write
    assert parse_fragment(Api.OPENAI_CHAT, event + event).output is True


# The reading of a whole-event write, as one regular expression matched whole: the
# definition agent/llm.py's byte scan must agree with.
_ONE_EVENT = re.compile(rb"(?:([0-9A-Fa-f]{1,8})\r\n)?((?:data: ?)?(\{[^\r\n]*\})(?:\r?\n){1,2}?)(\r\n)?")


def _whole_event_reference(fragment: bytes) -> bytes | None:
    if len(fragment) > llm.MAX_JSON_BYTES:
        return None
    m = _ONE_EVENT.fullmatch(fragment)
    if m is None:
        return None
    size, body, obj, crlf = m.groups()
    if size is None:
        return obj if crlf is None else None
    return obj if crlf is not None and int(size, 16) == len(body) else None


_PIECES = st.sampled_from([b"{", b"}", b"\r", b"\n", b"\r\n", b" ", b"a", b'"x":1', b"data:", b"data: ",
                           b"0", b"f", b"A", b"\r\n\r\n", b"\n\n", b"event: e\n"])


@st.composite
def _event_writes(draw: st.DrawFn) -> bytes:
    """Writes near the one-event shape: a data line (or an NDJSON line) of an object-like run,
    line ends, a chunk size that is right, wrong or malformed, a trailing CRLF or not; and
    arbitrary runs of the pieces those are made of."""
    if draw(st.booleans()):
        return b"".join(draw(st.lists(_PIECES, max_size=12)))
    prefix = draw(st.sampled_from([b"", b"data:", b"data: ", b"data:  ", b"event: e\n", b"dat"]))
    obj = b"{" + b"".join(draw(st.lists(_PIECES, max_size=5))) + draw(st.sampled_from([b"}", b"", b"}}"]))
    ends = b"".join(draw(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), min_size=0, max_size=3)))
    body = prefix + obj + ends
    kind = draw(st.sampled_from(["none", "right", "off", "upper", "long", "junk"]))
    size = {"none": b"", "right": b"%x\r\n" % len(body), "off": b"%x\r\n" % (len(body) + 1),
            "upper": b"%X\r\n" % len(body), "long": b"%09x\r\n" % len(body), "junk": b"xz\r\n"}[kind]
    return size + body + draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n", b"\n"]))


@settings(max_examples=3000, deadline=None)
@given(_event_writes())
def test_whole_event_scan_agrees_with_its_regular_expression(write: bytes) -> None:
    assert llm._whole_event(write) == _whole_event_reference(write), write
    if llm.NATIVE_JSON:
        assert llm._c_whole_event(write) == _whole_event_reference(write), write


def test_whole_event_scan_edges() -> None:
    obj = b'{"a":1}'
    for write, expected in [
        (b"data: " + obj + b"\n\n", obj),
        (b"data:" + obj + b"\r\n", obj),
        # without a chunk size, CRLF CRLF reads as a line end and a chunk's CRLF: not one event
        # (the cut-text scan reads such a write)
        (b"data:" + obj + b"\r\n\r\n", None),
        (obj + b"\n", obj),  # an NDJSON line
        (b"%x\r\ndata: %s\n\n\r\n" % (len(obj) + 8, obj), obj),
        (b"%X\r\n%s\n\r\n" % (len(obj) + 1, obj), obj),
        (b"%x\r\ndata: %s\r\n\r\n" % (len(obj) + 8, obj), obj),  # one line end, then the chunk's CRLF
        (b"data: " + obj + b"\r\n\r\n\r\n", None),  # no chunk size, so no chunk CRLF either
        (b"%x\r\ndata: %s\n\n\r\n" % (len(obj) + 9, obj), None),
        (b"%09x\r\n%s\n\r\n" % (len(obj) + 1, obj), None),  # nine hex digits
        (b"data: " + obj + b"\n\n" + b"data: " + obj + b"\n\n", None),
        (b"data: " + obj + b"\rx\n", None),
        (b"data: {}\n", b"{}"),
        (b"data: {\n", None),
        (b"data: " + obj, None),  # no line end
    ]:
        assert llm._whole_event(write) == expected == _whole_event_reference(write), write
        if llm.NATIVE_JSON:
            assert llm._c_whole_event(write) == expected, write


# --- OpenAI-compatible objects read in C (agent/_llmjson.c) against json -----------------


def test_the_c_json_reader_is_built_where_ci_runs() -> None:
    if IN_CI:
        assert llm.NATIVE_JSON, "agent/_llmjson.c is not built: python -m agent.native build"


def _json_reference(api: Api, data: bytes) -> EventInfo | None:
    obj = llm._load_complete(data)
    return llm._from_object(api, obj) if isinstance(obj, dict) else None


def _c_event(api: Api, data: bytes) -> EventInfo | None:
    got = llm._c_openai_event(data, api is Api.OPENAI_CHAT)
    return None if got is None else EventInfo(got[0], False, got[1], got[2], got[3], got[4])


def _assert_c_reads_as_json(read: Callable[[Api, bytes], EventInfo | None], events: list[tuple[Api, bytes]]) -> None:
    """Each event is decided in C, as json and the stream reading decide it."""
    for api, data in events:
        got = read(api, data)
        assert got is not None, data
        assert got == _json_reference(api, data) == parse_stream_event(api, data), data


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_c_json_reader_answers_what_servers_send() -> None:
    events = [(api, data) for api, data in REALISTIC_EVENTS if api in llm._OPENAI_OBJECTS]
    events += [
        # text beyond ASCII, raw or escaped, and escaped quotes, where only emptiness matters
        (Api.OPENAI_CHAT, b'{"model":"m","choices":[{"delta":{"content":"caf\xc3\xa9 \\u00e9 \\"q\\""}}]}'),
        (Api.OPENAI_CHAT, b'{"choices":[{"message":{"content":"\xf0\x9f\x98\x80"},"finish_reason":"stop"}],'
                          b'"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}'),
        (Api.OPENAI_CHAT, b' {"choices":[],"usage":{"prompt_tokens":0,"completion_tokens":-0}}\n'),
        (Api.OPENAI_COMPLETIONS, b'{"choices":[{"text":"\\n","finish_reason":"length"},{"text":""}],"model":"a b"}'),
    ]
    _assert_c_reads_as_json(_c_event, events)
    # a request body: the model and stream flag, whatever the messages hold
    body = j({"messages": [{"role": "user", "content": SECRET + " \u00e9\n"}], "model": MODEL, "stream": True})
    assert llm._c_request_fields(body) == (MODEL, True)
    assert llm._c_request_fields(b'{"model":"x","stream":1}') == ("x", None)
    assert parse_request_body(Api.OPENAI_CHAT, body) == RequestInfo(MODEL, True)


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_c_json_reader_leaves_what_it_does_not_decide_to_json() -> None:
    for data in (
        b'{"model":"caf\xc3\xa9","choices":[]}',  # a returned value beyond ASCII
        b'{"model":"m\\u0065","choices":[]}',  # an escaped returned value
        b'{"mod\\u0065l":"m"}',  # an escaped key
        b'{"x":NaN}',
        b'{"x":-Infinity}',
        b'[{"model":"m"}]',  # not an object (TGI answers lists)
        b'{"x":1}x',
        b'{"x":"\xff"}',  # not UTF-8
        b'{"x":"\xed\xa0\x80"}',  # an encoded surrogate
        b'{"x":"a\x01"}',  # a raw control character
        b'{"x":1,}',
        b'{"x":01}',
        b'{"x":1.}',
        b'{"x":"\\x"}',
        b'{"x":' + b"[" * 200 + b"]" * 200 + b"}",  # deeper than the C reader goes
        b'{"x":' + b"9" * 2000 + b"}",
    ):
        assert _c_event(Api.OPENAI_CHAT, data) is None, data
        assert llm._c_request_fields(data) is None, data
        # and the Python reading still answers as before
        ref = _json_reference(Api.OPENAI_CHAT, data)
        assert parse_stream_event(Api.OPENAI_CHAT, data) == (ref if ref is not None else llm._from_text(Api.OPENAI_CHAT, data))
    # an escaped finish reason is left to json; a request's reading does not look there
    data = b'{"choices":[{"finish_reason":"st\\u006fp"}]}'
    assert _c_event(Api.OPENAI_CHAT, data) is None
    assert parse_stream_event(Api.OPENAI_CHAT, data) == EventInfo(output=False, finish_reasons=("stop",))
    assert llm._c_request_fields(data) == (None, None)
    with pytest.raises(TypeError):
        llm._c_openai_event("{}", True)  # type: ignore[arg-type]


# JSON text near what OpenAI-compatible servers send: objects made of (key, value) pairs, keys
# repeated or escaped, values of every kind, raw and escaped text, numbers at the edges of a
# token count, then sometimes cut, spliced with a stray byte or followed by junk.
_J_PLAIN = st.sampled_from([b'""', b'"stop"', b'"length"', b'"tok "', b'"bench-llm"', b"0", b"7", b"null", b"true",
                            b"false", b"1099511627775"])
_J_RARE = st.sampled_from([
    b'""', b'"stop"', b'"length"', b'"tool_calls"', b'"tok "', b'"a b"', b'"\x7f"', b'"st op"', b'"' + b"x" * 65 + b'"',
    b'"' + b"m" * 256 + b'"', b'"' + b"m" * 257 + b'"', b'"bench-llm"', b'"\\u00e9"', b'"\xc3\xa9"', b'"\\"q\\""', b'"\\/"', b'"\\u0000"',
    b"0", b"-0", b"7", b"-7", b"1.5", b"2e3", b"1E+2", b"1099511627775", b"1099511627776",
    b"12345678901234567890", b"true", b"false", b"null", b"NaN", b"-Infinity",
])
_J_SCALAR = st.one_of(_J_PLAIN, _J_PLAIN, _J_RARE)
_J_WS = st.sampled_from([b"", b"", b" ", b"\n", b"\t ", b"\r\n"])


def _j_object(*pairs: st.SearchStrategy[tuple[bytes, bytes]]) -> st.SearchStrategy[bytes]:
    """An object of up to five members, each drawn from one of ``pairs`` (key, value)."""
    member = st.tuples(_J_WS, st.one_of(*pairs), _J_WS)
    return st.lists(member, max_size=5).map(
        lambda ms: b"{" + b",".join(a + kv[0] + b + b":" + kv[1] for a, kv, b in ms) + b"}")


def _j_array(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(values, max_size=4).map(lambda vs: b"[" + b", ".join(vs) + b"]")


def _j_keys(*keys: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([b'"' + k + b'"' for k in keys])


_J_ANY = st.recursive(
    _J_SCALAR,
    lambda inner: st.one_of(_j_array(inner), _j_object(st.tuples(_j_keys(b"x", b"content", b"\xc3\xa9"), inner))),
    max_leaves=6,
)
_J_DELTA = _j_object(
    st.tuples(_j_keys(b"content", b"reasoning_content", b"reasoning", b"thinking", b"refusal", b"role", b"text"),
              _J_SCALAR),
    st.tuples(_j_keys(b"tool_calls", b"function_call"),
              st.one_of(_J_SCALAR, _j_array(_J_SCALAR), _j_object(st.tuples(_j_keys(b"name"), _J_SCALAR)))),
    st.tuples(_j_keys(b"x"), _J_ANY),
    st.tuples(_j_keys(b"con\\u0074ent"), _J_SCALAR),
)
_J_CHOICE = _j_object(
    st.tuples(_j_keys(b"delta", b"message"), st.one_of(_J_DELTA, _J_DELTA, _J_SCALAR)),
    st.tuples(_j_keys(b"text", b"finish_reason", b"index"), _J_SCALAR),
    st.tuples(_j_keys(b"logprobs", b"finish_re\\u0061son"), _J_ANY),
)
_J_USAGE = _j_object(st.tuples(_j_keys(b"prompt_tokens", b"completion_tokens", b"total_tokens"), _J_SCALAR))
_J_TOP = _j_object(
    st.tuples(_j_keys(b"choices"), st.one_of(_j_array(st.one_of(_J_CHOICE, _J_CHOICE, _J_SCALAR)), _J_CHOICE)),
    st.tuples(_j_keys(b"choices"), _j_array(_J_CHOICE)),
    st.tuples(_j_keys(b"usage"), st.one_of(_J_USAGE, _J_SCALAR)),
    st.tuples(_j_keys(b"model", b"stream"), _J_SCALAR),
    st.tuples(_j_keys(b"id", b"mod\\u0065l", b"object"), st.one_of(_J_SCALAR, _J_ANY)),
)



@st.composite
def _j_chunk(draw: st.DrawFn) -> bytes:
    """A chunk shaped as servers send them (members in any order), its values drawn."""
    def obj(members: list[tuple[bytes, bytes]]) -> bytes:
        members = draw(st.permutations(members))
        return b"{" + b",".join(b'"%s"%s:%s' % (k, draw(_J_WS), v) for k, v in members) + b"}"

    def choice() -> bytes:
        key = draw(st.sampled_from([b"content", b"reasoning_content", b"refusal", b"tool_calls", b"text"]))
        delta = obj([(b"role", draw(_J_SCALAR)), (key, draw(st.one_of(_J_SCALAR, _j_array(_J_SCALAR))))])
        holder = draw(st.sampled_from([b"delta", b"message", b"text"]))
        return obj([(b"index", b"0"), (holder, draw(st.one_of(_J_SCALAR, st.just(delta)))),
                    (b"finish_reason", draw(_J_SCALAR))])

    choices = b"[" + b",".join(choice() for _ in range(draw(st.integers(1, 3)))) + b"]"
    usage = obj([(b"prompt_tokens", draw(_J_SCALAR)), (b"completion_tokens", draw(_J_SCALAR))])
    return obj([(b"id", b'"chatcmpl-1"'), (b"model", draw(_J_SCALAR)), (b"choices", choices),
                (b"usage", draw(st.one_of(st.just(usage), _J_SCALAR)))])


@st.composite
def _openai_json(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A document and whether it was left as generated."""
    doc = draw(_J_WS) + draw(st.one_of(_J_TOP, _j_chunk())) + draw(_J_WS)
    kind = draw(st.sampled_from(["whole", "whole", "whole", "cut", "splice", "junk"]))
    if kind == "cut":
        doc = doc[: draw(st.integers(0, len(doc)))]
    elif kind == "splice":
        at = draw(st.integers(0, len(doc)))
        doc = doc[:at] + draw(st.sampled_from([b",", b"}", b"]", b"\x00", b"\xff", b"\xc3", b"\\", b'"', b"0"])) + doc[at:]
    elif kind == "junk":
        doc += draw(st.sampled_from([b"x", b"\x0b", b"}", b"\xa0"]))
    return doc, kind == "whole"


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@settings(max_examples=4000, deadline=None)
@given(_openai_json(), st.booleans())
def test_the_c_json_reader_agrees_with_json(case: tuple[bytes, bool], chat: bool) -> None:
    doc, whole = case
    api = Api.OPENAI_CHAT if chat else Api.OPENAI_COMPLETIONS
    ref = _json_reference(api, doc)
    got = _c_event(api, doc)
    if got is not None:
        assert got == ref, doc
    # assembly's reading of a whole event says what parse_stream_event says, where it answers
    quick = llm.openai_event(api, doc)
    assert (quick is None) == (llm._c_openai_event(doc, chat) is None), doc
    if quick is not None:
        info = llm.parse_stream_event(api, doc)
        want = (info.output, info.model, info.finish_reasons, info.input_tokens, info.output_tokens)
        assert quick == want, doc
    obj = llm._load_complete(doc)
    fields = llm._c_request_fields(doc)
    if fields is not None:
        assert isinstance(obj, dict), doc
        stream = obj.get("stream")
        assert fields == (llm._clean_model(obj.get("model")), stream if isinstance(stream, bool) else None), doc
    # plain documents (ASCII, no escapes, no NaN or Infinity) are decided here, not left to json
    plain = whole and doc.isascii() and b"\\" not in doc and b"NaN" not in doc and b"Infinity" not in doc
    if plain:
        assert (got is None) == (ref is None), doc
        assert (fields is None) == (not isinstance(obj, dict)), doc


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_c_reader_finds_a_strings_end_and_escapes_wherever_they_lie() -> None:
    # agent/_llmjson.c scans strings sixteen bytes at a time: a quote, a backslash escape, a
    # control character, DEL or UTF-8 at every position of strings up to 40 bytes long, in a
    # value that is returned (model), one that is only checked (content) and one skipped (id)
    specials = [b"", b'\\"', b"\\\\", b"\\n", b"\\u00e9", b"\x01", b"\x1f", b"\x7f", "é".encode(), b"\xff"]
    for n in range(41):
        for at in range(n + 1):
            for sp in specials:
                text = b"a" * at + sp + b"b" * (n - at)
                for field in (b"model", b"content", b"id"):
                    if field == b"content":
                        doc = b'{"model":"m","choices":[{"delta":{"content":"' + text + b'"},"finish_reason":null}]}'
                    else:
                        doc = b'{"' + field + b'":"' + text + b'","choices":[{"delta":{"content":"x"}}]}'
                    got = _c_event(Api.OPENAI_CHAT, doc)
                    if got is not None:
                        assert got == _json_reference(Api.OPENAI_CHAT, doc), doc
                    elif sp == b"" or (sp == b"\\n" and field != b"model"):
                        raise AssertionError(f"plain JSON left to json: {doc!r}")


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_names_the_c_reader_has_made_before_are_answered_as_their_own() -> None:
    # agent/_llmjson.c hands out the str it made for the same bytes lately (64 entries, replaced
    # on a miss): many names in turn, twice, some past its 64-character bound, each answered
    # as itself, whichever entry it collides with
    names = [f"model-{i}" for i in range(150)] + ["m" * 64, "m" * 65, "x" * 200, "a", "A"]
    for _ in range(2):
        for i, name in enumerate(names):
            reason = f"reason_{i % 90}"
            doc = json.dumps({"model": name, "choices": [{"delta": {"content": "t"}, "finish_reason": reason}]})
            assert llm._c_openai_event(doc.encode(), True) == (True, name, (reason,), None, None)
    # one name, twice: the same object
    doc = b'{"model":"bench-llm","choices":[{"delta":{},"finish_reason":"stop"}]}'
    first, second = llm._c_openai_event(doc, True), llm._c_openai_event(doc, True)
    assert first is not None and second is not None and first[1] is second[1] and first[2][0] is second[2][0]


# --- Ollama's own objects read in C (agent/_llmjson.c) against json ----------------------


def _c_ollama(api: Api, data: bytes) -> EventInfo | None:
    got = llm._c_ollama_event(data, api is Api.OLLAMA_CHAT)
    return None if got is None else EventInfo(*got)


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_c_json_reader_answers_what_ollama_sends() -> None:
    events = [(Api.OLLAMA_GENERATE, e) for e in ollama_generate_lines(WORDS)]
    events += [(Api.OLLAMA_CHAT, e) for e in ollama_chat_lines(WORDS)]
    events += [
        # a thinking model's generate line; a chat line with a tool call and no content
        (Api.OLLAMA_GENERATE, j({"model": "qwen3", "response": "", "thinking": "hm", "done": False})),
        (Api.OLLAMA_CHAT, j({"model": "qwen3", "message": {"role": "assistant", "content": "",
                                                         "tool_calls": [{"function": {"name": "f"}}]},
                             "done": False})),
        # a non-streamed answer, and a load-only answer (no prompt): done, no output, no counts
        (Api.OLLAMA_CHAT, j({"model": "llama3.2", "message": {"role": "assistant", "content": SECRET},
                             "done": True, "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 3})),
        (Api.OLLAMA_GENERATE, j({"model": "llama3.2", "response": "", "done": True, "done_reason": "load"})),
        # text beyond ASCII, raw or escaped, where only emptiness matters; counts that are not counts
        (Api.OLLAMA_GENERATE, b'{"response":"caf\xc3\xa9 \\u00e9","done":false,"eval_count":1.5}'),
        (Api.OLLAMA_CHAT, b'{"message":"text","done":1,"prompt_eval_count":-1,"eval_count":true}'),
    ]
    _assert_c_reads_as_json(_c_ollama, events)
    # the final lines carry what the record needs
    final = _c_ollama(Api.OLLAMA_GENERATE, ollama_generate_lines(WORDS)[-1])
    assert final == EventInfo(output=False, done=True, model="llama3.2", finish_reasons=("stop",),
                              input_tokens=26, output_tokens=len(WORDS))
    # and what it does not decide goes to json, as for OpenAI objects
    for data in (b'{"done_reason":"st\\u006fp","done":true}', b'{"d\\u006fne":true}', b'{"model":"caf\xc3\xa9"}',
                 b'{"response":"x"', b'[{"response":"x"}]'):
        assert _c_ollama(Api.OLLAMA_GENERATE, data) is None, data
    with pytest.raises(TypeError):
        llm._c_ollama_event("{}", True)  # type: ignore[arg-type]


_J_OLLAMA = _j_object(
    st.tuples(_j_keys(b"model", b"response", b"thinking", b"done", b"done_reason", b"prompt_eval_count",
                      b"eval_count"), _J_SCALAR),
    st.tuples(_j_keys(b"message"), st.one_of(_J_DELTA, _J_DELTA, _J_SCALAR)),
    st.tuples(_j_keys(b"context", b"created_at", b"d\\u006fne", b"eval_c\\u006funt"), st.one_of(_J_SCALAR, _J_ANY)),
)


@st.composite
def _ollama_line(draw: st.DrawFn) -> bytes:
    """A line shaped as Ollama sends them (members in any order), its values drawn."""
    members = [(b"model", draw(_J_SCALAR)), (b"created_at", b'"2024-09-01T00:00:00Z"'),
               (b"done", draw(_J_SCALAR)), (b"done_reason", draw(_J_SCALAR)),
               (b"prompt_eval_count", draw(_J_SCALAR)), (b"eval_count", draw(_J_SCALAR))]
    if draw(st.booleans()):
        members.append((b"message", draw(st.one_of(_J_DELTA, _J_SCALAR))))
    else:
        members += [(b"response", draw(_J_SCALAR)), (b"thinking", draw(_J_SCALAR))]
    members = draw(st.permutations(members))[: draw(st.integers(1, len(members)))]
    return b"{" + b",".join(b'"%s"%s:%s' % (k, draw(_J_WS), v) for k, v in members) + b"}"


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@settings(max_examples=3000, deadline=None)
@given(st.one_of(_J_OLLAMA, _ollama_line()), st.sampled_from(["whole", "whole", "whole", "cut", "junk"]),
       st.booleans())
def test_the_c_json_reader_agrees_with_json_on_ollama_objects(doc: bytes, kind: str, chat: bool) -> None:
    if kind == "cut":
        doc = doc[: len(doc) // 2]
    elif kind == "junk":
        doc += b"x"
    api = Api.OLLAMA_CHAT if chat else Api.OLLAMA_GENERATE
    ref = _json_reference(api, doc)
    got = _c_ollama(api, doc)
    if got is not None:
        assert got == ref, doc
    # plain documents (ASCII, no escapes, no NaN or Infinity) are decided here, not left to json
    plain = kind == "whole" and doc.isascii() and b"\\" not in doc and b"NaN" not in doc and b"Infinity" not in doc
    if plain:
        assert (got is None) == (ref is None), doc


# the server's error in place of an event, as each server writes it
ERROR_EVENTS = [
    (Api.OPENAI_CHAT, {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}),  # vLLM
    (Api.OPENAI_CHAT, {"error": {"code": 500, "message": "boom", "type": "server_error"}}),  # llama.cpp
    (Api.OPENAI_COMPLETIONS, {"object": "error", "error": {"message": "boom"}}),
    (Api.OLLAMA_CHAT, {"error": "an error was encountered while running the model"}),
    (Api.OLLAMA_GENERATE, {"error": "boom"}),
    (Api.TGI_GENERATE_STREAM, {"error": "Request failed during generation", "error_type": "generation"}),
    (Api.TRITON_GENERATE_STREAM, {"error": "the model refused"}),
    (Api.OPENAI_RESPONSES, {"type": "error", "code": "server_error", "message": "boom", "sequence_number": 4}),
    (Api.ANTHROPIC_MESSAGES, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
]


@pytest.mark.parametrize(("api", "obj"), ERROR_EVENTS, ids=[f"{a.value}-{i}" for i, (a, _) in enumerate(ERROR_EVENTS)])
def test_an_error_event_reports_the_error_and_no_output(api: Api, obj: dict[str, object]) -> None:
    assert parse_stream_event(api, j(obj)) == EventInfo(output=False, error=True)
    # cut, as the probe may keep a long one: its key is still seen
    data = j(obj)
    assert parse_stream_event(api, data[:-1], truncated=True).error
    assert parse_fragment(api, b"\r\ndata: " + data + b"\n\n\r\n").error


def test_a_null_or_nested_error_is_no_error() -> None:
    # a Responses end event's response carries "error": null
    done = j({"type": "response.completed", "response": {"object": "response", "status": "completed",
                                                         "error": None, "model": "m"}})
    assert not parse_stream_event(Api.OPENAI_RESPONSES, done).error
    assert not parse_stream_event(Api.OPENAI_CHAT, j({"choices": [], "error": None})).error
    assert not parse_fragment(Api.OPENAI_CHAT, b'"usage":{"prompt_tokens":3},"error":null}\n\n').error
    # the text "error": inside generated content is escaped, not a key
    chunk = j({"choices": [{"index": 0, "delta": {"content": 'say "error": {x}'}}]})
    assert parse_stream_event(Api.OPENAI_CHAT, chunk) == EventInfo(output=True)
    assert not parse_fragment(Api.OPENAI_CHAT, chunk[10:]).error
    # a failed response is an error, with its status as the finish reason
    failed = j({"type": "response.failed", "response": {"object": "response", "status": "failed", "model": "m"}})
    assert parse_stream_event(Api.OPENAI_RESPONSES, failed) == EventInfo(False, True, "m", ("failed",), error=True)


# --- fragments (tails of response writes) -----------------------------------------------


def test_fragment_of_final_vllm_write() -> None:
    *_, finish, usage = vllm_chat_chunks(WORDS)
    write = b"".join(sse([finish, usage, b"[DONE]"]))
    info = parse_fragment(Api.OPENAI_CHAT, write[-256:])
    assert (info.input_tokens, info.output_tokens, info.done, info.output) == (12, len(WORDS), True, False)
    # These 256 bytes start at 'ason":"stop"': a cut key is not read.
    assert info.finish_reasons == ()
    assert parse_fragment(Api.OPENAI_CHAT, write[-320:]).finish_reasons == ("stop",)


def test_fragment_of_chunked_write_starting_mid_number() -> None:
    usage = b'{"choices":[],"usage":{"prompt_tokens":15,"total_tokens":35,"completion_tokens":20}}'
    write = chunked(sse([usage, b"[DONE]"]))
    frag = write[write.index(b'5,"total_tokens"') :]
    info = parse_fragment(Api.OPENAI_CHAT, frag)
    assert (info.input_tokens, info.output_tokens, info.done) == (None, 20, True)


def test_fragment_shows_output() -> None:
    write = b"".join(sse(vllm_chat_chunks(WORDS)[1:3]))
    info = parse_fragment(Api.OPENAI_CHAT, write[-200:])
    assert info.output is True
    assert SECRET not in repr(info)


def test_fragment_of_ollama_final_line() -> None:
    final = ollama_generate_lines(WORDS)[-1] + b"\n"
    info = parse_fragment(Api.OLLAMA_GENERATE, final[-256:])
    assert (info.input_tokens, info.output_tokens, info.done) == (26, len(WORDS), True)


def test_fragment_of_tgi_final_event() -> None:
    final = b"data:" + tgi_stream_events(WORDS)[-1] + b"\n\n"
    info = parse_fragment(Api.TGI_GENERATE_STREAM, final[-90:])
    assert (info.done, info.finish_reasons, info.output_tokens) == (True, ("eos_token",), len(WORDS) + 1)


def test_fragment_inside_text_cannot_forge_keys() -> None:
    text = 'The field is "finish_reason": "stop" and "completion_tokens": 99, then [DONE]'
    write = b"".join(sse([j({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})]))
    frag = write[write.index(b"finish_reason") - 1 :]
    info = parse_fragment(Api.OPENAI_CHAT, frag)
    assert (info.finish_reasons, info.output_tokens, info.done) == ((), None, False)


def test_fragment_with_number_cut_at_the_end() -> None:
    assert (
        parse_fragment(Api.OLLAMA_GENERATE, b'"prompt_eval_count":26,"eval_count":29').output_tokens is None
    )
    assert parse_fragment(Api.OLLAMA_GENERATE, b'"prompt_eval_count":26,"eval_count":29').input_tokens == 26


def test_fragment_without_anything_known() -> None:
    assert parse_fragment(Api.OPENAI_CHAT, b"\r\n1f\r\n") == EventInfo()
    assert parse_fragment(Api.OPENAI_CHAT, b"") == EMPTY_EVENT


# --- whole responses ------------------------------------------------------------------------


def openai_chat_response(text: str) -> bytes:
    return j(
        {
            "id": "chatcmpl-9",
            "object": "chat.completion",
            "created": 1718000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 30, "total_tokens": 94, "completion_tokens": 64},
        }
    )


def test_response_openai_chat_whole() -> None:
    info = parse_response_body(Api.OPENAI_CHAT, openai_chat_response(SECRET))
    assert info == EventInfo(True, False, MODEL, ("length",), 30, 64)


def test_response_openai_chat_prefix_and_suffix() -> None:
    body = openai_chat_response(SECRET + " " + "y" * 20000)
    info = parse_response_body(Api.OPENAI_CHAT, body[:512], body[-256:])
    assert info == EventInfo(True, False, MODEL, ("length",), 30, 64)
    assert SECRET not in repr(info)


def test_response_ollama_generate_with_context() -> None:
    body = ollama_generate_lines([])[-1].replace(b'"response":""', b'"response":"' + SECRET.encode() + b'"')
    assert parse_response_body(Api.OLLAMA_GENERATE, body) == EventInfo(
        True, True, "llama3.2", ("stop",), 26, 0
    )
    cut = parse_response_body(Api.OLLAMA_GENERATE, body[:400], body[-300:])
    assert cut == EventInfo(True, True, "llama3.2", ("stop",), 26, 0)


def test_response_tgi_generate() -> None:
    body = j(
        {
            "generated_text": SECRET,
            "details": {
                "finish_reason": "length",
                "generated_tokens": 20,
                "seed": None,
                "prefill": [{"id": 1}] * 7,
                "tokens": [],
            },
        }
    )
    assert parse_response_body(Api.TGI_GENERATE, body) == EventInfo(True, True, None, ("length",), 7, 20)
    assert parse_response_body(Api.TGI_GENERATE, b"[" + body + b"]").output_tokens == 20


def test_response_triton_infer_and_generate() -> None:
    infer = j(
        {
            "model_name": "bert",
            "model_version": "1",
            "outputs": [{"name": "o", "datatype": "FP32", "shape": [1], "data": [0.5]}],
        }
    )
    assert parse_response_body(Api.TRITON_INFER, infer) == EventInfo(output=True, model="bert")
    gen = j({"model_name": "ensemble", "model_version": "1", "text_output": SECRET})
    assert parse_response_body(Api.TRITON_GENERATE, gen) == EventInfo(output=True, model="ensemble")


def test_response_embeddings_usage() -> None:
    body = j(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 8}],
            "model": "e5",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }
    )
    assert parse_response_body(Api.OPENAI_EMBEDDINGS, body) == EventInfo(
        output=True, model="e5", input_tokens=9
    )


def test_merge_events() -> None:
    a = EventInfo(output=False, model="a", finish_reasons=("stop",), input_tokens=1, output_tokens=2)
    b = EventInfo(output=None, done=True, model="b", finish_reasons=("stop", "length"), output_tokens=5)
    assert merge_events(a, b) == EventInfo(False, True, "a", ("stop", "length"), 1, 5)
    assert merge_events(EMPTY_EVENT, b) is b
    assert merge_events(a, EventInfo(output=True)).output is True


# --- through the wire parsers -------------------------------------------------------------


def _http_events(response: bytes, step: int) -> list[bytes]:
    """Response bytes through H1Parser, fed `step` bytes at a time, returning body runs."""
    p = H1Parser("response", metrics=SelfMetrics())
    p.expect_response_to("POST")
    bodies: list[bytes] = []
    for i in range(0, len(response), step):
        p.feed(response[i : i + step])
        while not isinstance(ev := p.next_event(), NeedData):
            assert not isinstance(ev, BodyGap)
            if isinstance(ev, Body):
                bodies.append(ev.data)
    return bodies


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
NDJSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
@pytest.mark.parametrize(
    ("api", "payloads", "space", "outputs"),
    [
        (Api.OPENAI_CHAT, [*vllm_chat_chunks(WORDS), b"[DONE]"], True, len(WORDS)),
        (Api.TGI_GENERATE_STREAM, tgi_stream_events(WORDS), False, len(WORDS)),
        (Api.TRITON_GENERATE_STREAM, triton_stream_events(WORDS), True, len(WORDS)),
    ],
    ids=["vllm", "tgi", "triton"],
)
def test_sse_streams_through_http(
    step: int, api: Api, payloads: list[bytes], space: bool, outputs: int
) -> None:
    events = sse(payloads, space=space)
    direct = fold(api, payloads)
    for response in (
        SSE_HEAD + chunked(events),
        SSE_HEAD.replace(b"transfer-encoding: chunked\r\n", b"") + b"".join(events),
    ):
        parser = SSEParser(metrics=SelfMetrics())
        seen = [e for body in _http_events(response, step) for e in parser.feed(body)]
        assert [e.data for e in seen] == payloads
        assert fold(api, [e.data for e in seen]) == direct
        assert direct[1] == outputs


@pytest.mark.parametrize("step", [1, 13, 1 << 20])
@pytest.mark.parametrize(
    ("api", "lines"),
    [(Api.OLLAMA_GENERATE, ollama_generate_lines(WORDS)), (Api.OLLAMA_CHAT, ollama_chat_lines(WORDS))],
)
def test_ndjson_streams_through_http(step: int, api: Api, lines: list[bytes]) -> None:
    response = NDJSON_HEAD + chunked([x + b"\n" for x in lines])
    parser = NDJSONParser(metrics=SelfMetrics())
    seen = [x for body in _http_events(response, step) for x in parser.feed(body)]
    assert [x.data for x in seen] == lines
    total, outputs = fold(api, [x.data for x in seen])
    assert (outputs, total.done, total.input_tokens, total.output_tokens) == (
        len(WORDS),
        True,
        26,
        len(WORDS),
    )


# --- robustness -------------------------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "choices",
                    "delta",
                    "content",
                    "usage",
                    "prompt_tokens",
                    "done",
                    "details",
                    "token",
                    "text",
                    "message",
                    "finish_reason",
                    "text_output",
                    "outputs",
                    "data",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    api=st.sampled_from(list(Api)),
    data=st.one_of(st.binary(max_size=300), json_like.map(lambda o: json.dumps(o).encode())),
    flag=st.booleans(),
)
def test_never_raises(api: Api, data: bytes, flag: bool) -> None:
    for info in (
        parse_stream_event(api, data, flag),
        parse_fragment(api, data),
        parse_response_body(api, data),
        parse_response_body(api, data[:10], data[10:]),
    ):
        assert isinstance(info, EventInfo)
        assert info.input_tokens is None or isinstance(info.input_tokens, int)
        assert all(isinstance(r, str) for r in info.finish_reasons)
    req = parse_request_body(api, data, data if flag else None)
    assert req.model is None or len(req.model) <= 256


def test_deeply_nested_json_does_not_raise() -> None:
    deep = b"[" * 50000 + b"]" * 50000
    assert parse_response_body(Api.OPENAI_CHAT, b"{" + b'"a":' + deep[:60000] + b"}") is not None
    assert parse_stream_event(Api.OPENAI_CHAT, b'{"a":' + b"[" * 60000 + b"]" * 60000 + b"}").output is None


# --- recorded streams (tests/data/parsers/record.py: real uvicorn, openai and httpx clients) ---

RECORDED = Path(__file__).resolve().parent / "data" / "parsers"


def _messages(role: str, data: bytes, step: int, methods: tuple[str, ...] = ()) -> list[tuple[object, bytes]]:
    """(head, body) per message, the stream fed `step` bytes at a time; every message must end cleanly."""
    p = H1Parser(role, metrics=SelfMetrics())  # type: ignore[arg-type]
    for m in methods:
        p.expect_response_to(m)
    out: list[tuple[object, bytes]] = []
    head: object = None
    body = b""
    for i in range(0, len(data), step):
        p.feed(data[i : i + step])
        while not isinstance(ev := p.next_event(), NeedData):
            if isinstance(ev, RequestHead | ResponseHead):
                head, body = ev, b""
            elif isinstance(ev, Body):
                body += ev.data
            elif isinstance(ev, EndOfMessage):
                assert ev.complete
                out.append((head, body))
            else:
                raise AssertionError(f"unexpected {ev}")
    return out


@pytest.mark.parametrize("step", [1, 100, 1 << 20])
def test_recorded_openai_client_and_uvicorn(step: int) -> None:
    requests = _messages("request", (RECORDED / "openai_chat.request.bin").read_bytes(), step)
    assert [(h.method, h.target) for h, _ in requests] == [("POST", "/v1/chat/completions")] * 2  # type: ignore[attr-defined]
    assert [parse_request_body(Api.OPENAI_CHAT, b) for _, b in requests] == [
        RequestInfo(MODEL, True),
        RequestInfo(MODEL, False),
    ]

    responses = _messages(
        "response", (RECORDED / "openai_chat.response.bin").read_bytes(), step, ("POST", "POST")
    )
    (streamed_head, streamed), (plain_head, plain) = responses
    assert header(streamed_head.headers, "content-type") == "text/event-stream; charset=utf-8"  # type: ignore[attr-defined]
    assert header(plain_head.headers, "content-length") == str(len(plain))  # type: ignore[attr-defined]
    events = SSEParser(metrics=SelfMetrics()).feed(streamed)
    total, outputs = fold(Api.OPENAI_CHAT, [e.data for e in events])
    assert outputs == 5
    assert total == EventInfo(True, True, MODEL, ("stop",), 17, 5)
    assert parse_response_body(Api.OPENAI_CHAT, plain) == EventInfo(True, False, MODEL, ("stop",), 17, 5)
    assert SECRET not in repr(total)


def test_recorded_openai_request_cut_to_prefix_and_suffix() -> None:
    requests = _messages("request", (RECORDED / "openai_chat.request.bin").read_bytes(), 1 << 20)
    body = requests[0][1]
    assert parse_request_body(Api.OPENAI_CHAT, body[:256], body[-256:]) == RequestInfo(MODEL, True)


def test_recorded_stream_tail_fragment() -> None:
    # What the kernel keeps of the last response write: its final 256 bytes.
    data = (RECORDED / "openai_chat.response.bin").read_bytes()
    first_end = data.index(b"0\r\n\r\n", data.index(b"[DONE]")) + 5
    info = parse_fragment(Api.OPENAI_CHAT, data[first_end - 256 : first_end])
    assert (info.done, info.input_tokens, info.output_tokens) == (True, 17, 5)


@pytest.mark.parametrize("step", [1, 333, 1 << 20])
def test_recorded_ollama_generate(step: int) -> None:
    requests = _messages("request", (RECORDED / "ollama_generate.request.bin").read_bytes(), step)
    assert [parse_request_body(Api.OLLAMA_GENERATE, b) for _, b in requests] == [
        RequestInfo("llama3.2", True)
    ] * 2
    responses = _messages(
        "response", (RECORDED / "ollama_generate.response.bin").read_bytes(), step, ("POST", "POST")
    )
    assert len(responses) == 2
    for _, body in responses:
        lines = NDJSONParser(4096, metrics=SelfMetrics()).feed(body)
        assert lines[-1].truncated  # the context array exceeds the line bound
        total = EMPTY_EVENT
        for line in lines:
            total = merge_events(total, parse_stream_event(Api.OLLAMA_GENERATE, line.data, line.truncated))
        assert total == EventInfo(True, True, "llama3.2", ("stop",), None, None)
        # The counts come from the tail of the last write, as the agent captures it.
        tail = parse_fragment(Api.OLLAMA_GENERATE, body[-256:])
        assert (tail.input_tokens, tail.output_tokens, tail.done) == (26, 5, True)


@pytest.mark.parametrize("step", [1, 1 << 20])
def test_recorded_tgi_generate_stream(step: int) -> None:
    responses = _messages(
        "response", (RECORDED / "tgi_generate_stream.response.bin").read_bytes(), step, ("POST", "POST")
    )
    for _, body in responses:
        events = SSEParser(metrics=SelfMetrics()).feed(body)
        total, outputs = fold(Api.TGI_GENERATE_STREAM, [e.data for e in events])
        assert outputs == 5
        assert total == EventInfo(True, True, None, ("eos_token",), None, 6)


def test_recorded_response_with_capture_gap() -> None:
    # Head and first writes captured, the middle lost, then the tail of the last write.
    data = (RECORDED / "openai_chat.response.bin").read_bytes()
    end = data.index(b"0\r\n\r\n", data.index(b"[DONE]")) + 5
    first, tail = data[:700], data[end - 256 : end]
    p = H1Parser("response", metrics=SelfMetrics())
    p.expect_response_to("POST")
    p.feed(first)
    p.feed_gap(end - 256 - 700)
    p.feed(tail)
    events = []
    while not isinstance(ev := p.next_event(), NeedData):
        events.append(ev)
    assert isinstance(events[0], ResponseHead)
    assert EndOfMessage(False) in events  # framing lost inside the chunked body
    sse_events = SSEParser(metrics=SelfMetrics()).feed(
        b"".join(e.data for e in events if isinstance(e, Body))
    )
    assert parse_stream_event(Api.OPENAI_CHAT, sse_events[0].data).output is False  # the role-only chunk
    assert parse_fragment(Api.OPENAI_CHAT, tail).output_tokens == 5


def _chunk_writes(response: bytes) -> tuple[bytes, list[bytes]]:
    """Split a recorded chunked response into its head and one write per chunk (how uvicorn writes)."""
    start = response.index(b"\r\n\r\n") + 4
    writes, i = [], start
    while True:
        j = response.index(b"\r\n", i)
        size = int(response[i:j], 16)
        end = j + 2 + size + 2 + (2 if size == 0 else 0)
        writes.append(response[i:end])
        i = end
        if size == 0:
            return response[:start], writes


def test_recorded_ollama_under_bounded_capture() -> None:
    # The socket probe keeps the first 2048 and the last 256 bytes of each write.
    head_cap, tail_cap = 2048, 256
    data = (RECORDED / "ollama_generate.response.bin").read_bytes()
    first_response = data[: data.index(b"0\r\n\r\n") + 5]
    head, writes = _chunk_writes(first_response)
    p = H1Parser("response", metrics=SelfMetrics())
    p.expect_response_to("POST")
    p.feed(head)
    lines = NDJSONParser(4096, metrics=SelfMetrics())
    seen = []
    for w in writes:
        if len(w) <= head_cap + tail_cap:
            p.feed(w)
        else:
            p.feed(w[:head_cap])
            p.feed_gap(len(w) - head_cap - tail_cap)
            p.feed(w[-tail_cap:])
        while not isinstance(ev := p.next_event(), NeedData):
            if isinstance(ev, Body):
                seen += lines.feed(ev.data)
            elif isinstance(ev, BodyGap):
                lines.feed_gap(ev.n)
            else:
                assert isinstance(ev, ResponseHead) or ev == EndOfMessage(True)
    assert [x.truncated for x in seen] == [False] * 5 + [True]
    total = EMPTY_EVENT
    for x in seen:
        total = merge_events(total, parse_stream_event(Api.OLLAMA_GENERATE, x.data, x.truncated))
    # The gap fell inside one chunk's data, so framing held and the final line
    # kept its start (done, reason) and its end (the counts).
    assert total == EventInfo(True, True, "llama3.2", ("stop",), 26, 5)


# --- one write, one chunk, one SSE event: read in one step (agent/_llmjson.c) ---------------

_SSE_RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _h1_at_chunk_start() -> H1Parser:
    p = H1Parser("response")
    p.expect_response_to("POST")
    p.feed(_SSE_RESPONSE_HEAD)
    assert isinstance(p.next_event(), ResponseHead)
    assert p.at_chunk_start()
    return p


@st.composite
def _one_event_chunks(draw: st.DrawFn) -> bytes:
    """Writes near one chunk of one SSE event, and arbitrary runs of their pieces."""
    if draw(st.integers(0, 4)) == 0:
        return b"".join(draw(st.lists(_PIECES, max_size=12)))
    prefix = draw(st.sampled_from([b"data:", b"data: ", b"data:  ", b"", b"event: e\ndata: ", b"dat"]))
    obj = draw(st.sampled_from([b'{"a":1}', b"{}", b"{", b'{"a":"}"}', b'{"a":\r1}', b"[1]", b'{"a":1}}']))
    ends = draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n", b"\n", b"\r\n", b"\r\r", b"\n\n\n", b""]))
    body = prefix + obj + ends
    size = draw(st.sampled_from([b"%x" % len(body), b"%X" % len(body), b"%x" % (len(body) + 1), b"%09x" % len(body),
                                 b"%x;ext=1" % len(body), b"", b"0"]))
    line_end = draw(st.sampled_from([b"\r\n", b"\n"]))
    return size + line_end + body + draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r\n\r\n", b"\r\n0\r\n\r\n"]))


def _one_chunk_body(write: bytes) -> bytes:
    """The body of a write a one-step reading took as one event or line: the HTTP/1 parser
    reads it as a single body, and is left between chunks."""
    p = _h1_at_chunk_start()
    p.feed(write)
    bodies = []
    while not isinstance(e := p.next_event(), NeedData):
        bodies.append(e)
    assert len(bodies) == 1 and isinstance(bodies[0], Body), write
    assert p.at_chunk_start(), write
    return bodies[0].data


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@settings(max_examples=3000, deadline=None)
@given(_one_event_chunks())
def test_a_one_event_chunk_reads_as_the_parsers_read_it(write: bytes) -> None:
    obj = llm.sse_chunk_event(write)
    if obj is None:
        return
    # the body holds a single whole event, leaving the SSE parser as it was
    assert llm._whole_event(write) == obj
    sse = SSEParser()
    events = sse.feed(_one_chunk_body(write))
    assert [(e.data, e.event, e.id, e.truncated) for e in events] == [(obj, None, None, False)], write
    assert sse.between_events(), write


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_one_step_reading_takes_what_servers_send() -> None:
    for event in vllm_chat_chunks(WORDS):
        for ends in (b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n"):
            for sep in (b"data: ", b"data:"):
                body = sep + event + ends
                for size in (b"%x" % len(body), b"%X" % len(body)):
                    assert llm.sse_chunk_event(size + b"\r\n" + body + b"\r\n") == event
    obj = b'{"a":1}'
    for write in (
        b"%x\r\ndata: %s\n\r\n" % (len(obj) + 8, obj),  # the size counts one byte less
        b"%x;e=1\r\ndata: %s\n\n\r\n" % (len(obj) + 8, obj),  # a chunk extension: the parser reads it
        b"%x\r\ndata: %s\n\n" % (len(obj) + 8, obj),  # no chunk CRLF
        b"%x\r\ndata: %s\n\r\n" % (len(obj) + 7, obj),  # one line end: the event is not over
        b"%x\r\n%s\n\n\r\n" % (len(obj) + 2, obj),  # no data field (NDJSON-like)
        b"%x\r\ndata: [DONE]\n\n\r\n" % 14,  # not an object: parsed as before
    ):
        assert llm.sse_chunk_event(write) is None, write


@st.composite
def _one_line_chunks(draw: st.DrawFn) -> bytes:
    """Writes near one chunk of one NDJSON line, and arbitrary runs of their pieces."""
    if draw(st.integers(0, 4)) == 0:
        return b"".join(draw(st.lists(_PIECES, max_size=12)))
    obj = draw(st.sampled_from([b'{"a":1}', b"{}", b"{", b'{"a":"}"}', b'{"a":\r1}', b"[1]", b'{"a":1}}', b" {}"]))
    body = obj + draw(st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r", b"", b"\r\r\n", b"\n{}\n"]))
    size = draw(st.sampled_from([b"%x" % len(body), b"%X" % len(body), b"%x" % (len(body) - 1), b"%09x" % len(body),
                                 b"%x;x" % len(body)]))
    return size + b"\r\n" + body + draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r\n0\r\n\r\n"]))


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@settings(max_examples=2000, deadline=None)
@given(_one_line_chunks())
def test_a_one_line_chunk_reads_as_the_parsers_read_it(write: bytes) -> None:
    obj = llm.ndjson_chunk_event(write)
    if obj is None:
        return
    assert llm._whole_event(write) == obj
    nd = NDJSONParser()
    assert [(line.data, line.truncated) for line in nd.feed(_one_chunk_body(write))] == [(obj, False)], write
    assert nd.between_lines(), write


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_one_step_reading_takes_ndjson_lines_as_ollama_sends_them() -> None:
    for line in ollama_generate_lines(WORDS):
        for end in (b"\n", b"\r\n"):
            body = line + end
            assert llm.ndjson_chunk_event(b"%x\r\n%s\r\n" % (len(body), body)) == line
    obj = b'{"a":1}'
    for write in (b"%x\r\n%s\n\n\r\n" % (len(obj) + 2, obj), b"%x\r\n%s\r\n" % (len(obj), obj),
                  b"%x\r\ndata: %s\n\n\r\n" % (len(obj) + 8, obj)):
        assert llm.ndjson_chunk_event(write) is None, write


# --- typed-event APIs: OpenAI Responses, Anthropic Messages ---------------------------------

def _typed(kind: str, **fields: object) -> bytes:
    """A typed event's data as vLLM writes it: the openai package's fields, then the type."""
    return json.dumps({**fields, "sequence_number": 3, "type": kind}, separators=(",", ":")).encode()


def _write(kind: str, data: bytes) -> bytes:
    """One whole response write: chunk size, the event's name and data, the chunk's CRLF."""
    event = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
    return b"%x\r\n" % len(event) + event + b"\r\n"


SECRET = "CANARY-completion-text \"input_tokens\": 999, \"type\":\"response.completed\""


def _response(status: str, reason: str | None = None, usage: bool = True) -> dict[str, object]:
    return {
        "id": "resp_0123456789abcdef0123456789abcdef", "created_at": 1767225600,
        "incomplete_details": {"reason": reason} if reason else None, "instructions": None,
        "model": MODEL, "object": "response",
        "output": [{"type": "message", "status": status, "content": [{"type": "output_text", "text": SECRET}]}],
        "status": status, "tools": [], "top_p": 1.0,
        "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 42,
                  "output_tokens_details": {"reasoning_tokens": 7}, "total_tokens": 53} if usage else None,
        "user": None,
    }


RESPONSES_EVENTS = [
    (_typed("response.created", response={**_response("in_progress", usage=False), "output": []}),
     EventInfo(False, False, MODEL)),
    (_typed("response.output_item.added", item={"type": "message", "content": []}, output_index=0),
     EventInfo(False)),
    (_typed("response.content_part.added", part={"type": "output_text", "text": ""}, item_id="m"),
     EventInfo(False)),
    (_typed("response.output_text.delta", content_index=0, delta="Hel", item_id="m"), EventInfo(True)),
    (_typed("response.output_text.delta", content_index=0, delta="", item_id="m"), EventInfo(False)),
    (_typed("response.reasoning_text.delta", delta="thinking", item_id="r"), EventInfo(True)),
    (_typed("response.function_call_arguments.delta", delta='{"ci', item_id="f"), EventInfo(True)),
    (_typed("response.output_text.done", text=SECRET, item_id="m"), EventInfo(False)),
    (_typed("response.completed", response=_response("completed")),
     EventInfo(False, True, MODEL, ("completed",), 11, 42)),
    (_typed("response.incomplete", response=_response("incomplete", "max_output_tokens")),
     EventInfo(False, True, MODEL, ("max_output_tokens",), 11, 42)),
    (_typed("response.failed", response=_response("failed", usage=False)), EventInfo(False, True, MODEL, ("failed",), error=True)),
]

MESSAGES_EVENTS = [
    (_typed("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                      "content": [], "stop_reason": None,
                                      "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                                                "output_tokens": 1}}),
     EventInfo(False, False, MODEL, (), 25, 1)),
    (_typed("content_block_start", index=0, content_block={"type": "text", "text": ""}), EventInfo(False)),
    (_typed("ping"), EventInfo(False)),
    (_typed("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}), EventInfo(True)),
    (_typed("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hm"}), EventInfo(True)),
    (_typed("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "{\"a"}),
     EventInfo(True)),
    (_typed("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "EqQB"}),
     EventInfo(False)),
    (_typed("content_block_stop", index=0), EventInfo(False)),
    (_typed("message_delta", delta={"stop_reason": "max_tokens", "stop_sequence": None},
            usage={"output_tokens": 15}),
     EventInfo(False, False, None, ("max_tokens",), None, 15)),
    (_typed("message_stop"), EventInfo(False, True)),
]


@pytest.mark.parametrize(("api", "data", "want"),
                         [(Api.OPENAI_RESPONSES, d, w) for d, w in RESPONSES_EVENTS]
                         + [(Api.ANTHROPIC_MESSAGES, d, w) for d, w in MESSAGES_EVENTS])
def test_typed_events_whole_and_as_one_write(api: Api, data: bytes, want: EventInfo) -> None:
    assert parse_stream_event(api, data) == want
    kind = json.loads(data)["type"]
    # where the event's name says all, it is not decoded, and says the same
    quick = llm.typed_event(api, kind.encode(), data)
    assert quick is None or quick == want, quick
    named = kind.count(".") >= 2 or kind in ("ping", "content_block_stop", "message_stop")
    assert (quick is not None) == named, (kind, quick)
    # a tail-ring slot holding the whole write reads the same, with its name line and framing
    assert parse_fragment(api, _write(kind, data)) == want
    # and what is not metadata never comes back
    assert "CANARY" not in repr(parse_fragment(api, _write(kind, data)))


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@pytest.mark.parametrize(("api", "data", "want"),
                         [(Api.OPENAI_RESPONSES, d, w) for d, w in RESPONSES_EVENTS]
                         + [(Api.ANTHROPIC_MESSAGES, d, w) for d, w in MESSAGES_EVENTS])
def test_a_typed_event_write_is_read_in_one_step(api: Api, data: bytes, want: EventInfo) -> None:
    kind = json.loads(data)["type"].encode()
    write = _write(kind.decode(), data)
    assert llm.sse_named_event(write) == (kind, data)
    for line_end in (b"\r\n", b"\n"):
        event = b"event:" + kind + line_end + b"data:" + data + b"\r\n\r\n"
        assert llm.sse_named_event(b"%X\r\n%s\r\n" % (len(event), event)) == (kind, data)
    # the assembler reads what it takes as the parsers would (tests/test_assemble.py holds the records)
    sse = SSEParser()
    events = sse.feed(_one_chunk_body(write))
    assert [(e.data, e.event) for e in events] == [(data, kind.decode())]
    info = llm.typed_event(api, kind, data)
    assert (info if info is not None else parse_stream_event(api, data)) == want


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
def test_the_one_step_reading_of_named_events_refuses_what_is_not_one() -> None:
    obj = b'{"type":"ping"}'

    def chunk(event: bytes, size_delta: int = 0) -> bytes:
        return b"%x\r\n%s\r\n" % (len(event) + size_delta, event)

    for write in (
        chunk(b"event: ping\ndata: " + obj + b"\n\n", -1),  # the size counts one byte less
        chunk(b"event: ping\ndata: " + obj + b"\n\n")[:-2],  # no chunk CRLF
        chunk(b"event: ping\ndata: " + obj + b"\n"),  # one line end: the event is not over
        chunk(b"event: ping\rdata: " + obj + b"\n\n"),  # a lone CR ends the name's line
        chunk(b"event:  ping\ndata: " + obj + b"\n\n"),  # a second space belongs to the name
        chunk(b"event: " + b"p" * 65 + b"\ndata: " + obj + b"\n\n"),  # a name too long
        chunk(b"event: \ndata: " + obj + b"\n\n"),  # no name
        chunk(b"event: a-b\ndata: " + obj + b"\n\n"),  # a name beyond the event names
        chunk(b"event: ping\nid: 1\ndata: " + obj + b"\n\n"),  # another field
        chunk(b"event: ping\ndata: [DONE]\n\n"),  # not an object
        chunk(b"data: " + obj + b"\n\n"),  # no name: sse_chunk_event's
        chunk(b"event: ping\ndata: " + obj + b"\n\nevent: ping\ndata: " + obj + b"\n\n"),  # two events
    ):
        assert llm.sse_named_event(write) is None, write
    assert llm.sse_named_event(chunk(b"event: " + b"p" * 64 + b"\ndata: " + obj + b"\n\n")) == (b"p" * 64, obj)


@st.composite
def _named_event_chunks(draw: st.DrawFn) -> bytes:
    """Writes near one chunk of one named SSE event, and arbitrary runs of their pieces."""
    if draw(st.integers(0, 4)) == 0:
        return b"".join(draw(st.lists(_PIECES, max_size=12)))
    field = draw(st.sampled_from([b"event:", b"event: ", b"event:  ", b"Event: ", b"evnt: ", b"", b"data: x\n"]))
    name = draw(st.sampled_from([b"response.output_text.delta", b"ping", b"a", b"x" * 64, b"x" * 65, b"", b"a b",
                                 b"a:b", b"caf\xc3\xa9", b"a-b", b"message_stop\r"]))
    line_end = draw(st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"", b"\n\r\n"]))
    data = draw(st.sampled_from([b"data:", b"data: ", b"data:  ", b"", b"id: 1\ndata: ", b": c\ndata: "]))
    obj = draw(st.sampled_from([b'{"a":1}', b"{}", b"{", b'{"a":"}"}', b'{"a":\r1}', b"[1]", b'{"a":1}}']))
    ends = draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n", b"\n", b"\r\n", b"\r\r", b"\n\n\n",
                                 b""]))
    body = field + name + line_end + data + obj + ends
    size = draw(st.sampled_from([b"%x" % len(body), b"%X" % len(body), b"%x" % (len(body) + 1), b"%09x" % len(body),
                                 b"%x;ext=1" % len(body), b"", b"0"]))
    chunk_end = draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r\n\r\n", b"\r\n0\r\n\r\n"]))
    return size + draw(st.sampled_from([b"\r\n", b"\n"])) + body + chunk_end


@pytest.mark.skipif(not llm.NATIVE_JSON, reason="agent/_llmjson.c not built (CI requires it)")
@settings(max_examples=3000, deadline=None)
@given(_named_event_chunks())
def test_a_named_event_chunk_reads_as_the_parsers_read_it(write: bytes) -> None:
    got = llm.sse_named_event(write)
    if got is None:
        return
    name, obj = got
    # the body holds a single whole event with that name, leaving the SSE parser as it was
    sse = SSEParser()
    events = sse.feed(_one_chunk_body(write))
    assert [(e.data, e.event, e.id, e.truncated) for e in events] == [(obj, name.decode(), None, False)], write
    assert sse.between_events(), write
    assert llm.sse_chunk_event(write) is None  # the two readings take different writes


def test_typed_events_through_the_sse_parser() -> None:
    """A stream of named events, fed byte by byte: the parser gives each event's data."""
    stream = b"".join(_write(json.loads(d)["type"], d) for d, _ in RESPONSES_EVENTS)
    for step in (1, 7, 1 << 20):
        sse = SSEParser()
        got = [parse_stream_event(Api.OPENAI_RESPONSES, e.data)
               for run in _http_events(SSE_HEAD + stream, step) for e in sse.feed(run)]
        assert got == [w for _, w in RESPONSES_EVENTS]


def test_a_cut_end_event_shows_what_its_visible_parts_hold() -> None:
    """A long end event is kept as its first and last bytes: the name and, in the order vLLM
    writes the response, the incomplete reason near its start; usage near its end. Text in
    between cannot forge a key. A reason cut away is not guessed."""
    data = _typed("response.incomplete", response=_response("incomplete", "max_output_tokens"))
    write = _write("response.incomplete", data)
    head, tail = write[:192], write[-320:]
    assert b"max_output_tokens" in head and b"usage" in tail
    assert parse_fragment(Api.OPENAI_RESPONSES, head) == EventInfo(False, True, None, ("max_output_tokens",))
    assert parse_fragment(Api.OPENAI_RESPONSES, tail) == EventInfo(False, True, None, (), 11, 42)
    early = write[:120]  # before incomplete_details
    assert parse_fragment(Api.OPENAI_RESPONSES, early) == EventInfo(False, True)
    middle = write[write.index(b"CANARY"):write.index(b"CANARY") + 90]
    assert parse_fragment(Api.OPENAI_RESPONSES, middle).input_tokens is None
    assert parse_fragment(Api.OPENAI_RESPONSES, middle).done is False


def test_typed_whole_bodies() -> None:
    body = json.dumps(_response("completed")).encode()
    assert parse_response_body(Api.OPENAI_RESPONSES, body) == EventInfo(True, True, MODEL, ("completed",), 11, 42)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": SECRET}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 9, "output_tokens": 4}}
    got = parse_response_body(Api.ANTHROPIC_MESSAGES, json.dumps(message).encode())
    assert got == EventInfo(True, True, MODEL, ("end_turn",), 9, 4)
    # cut bodies: what each end shows
    raw = json.dumps(message).encode()
    cut = parse_response_body(Api.ANTHROPIC_MESSAGES, raw[:raw.index(b"content")], raw[-80:])
    assert cut.model == MODEL and cut.input_tokens == 9 and cut.output_tokens == 4
    assert cut.finish_reasons == ("end_turn",)
    req = parse_request_body(Api.OPENAI_RESPONSES, b'{"model":"gpt-oss-20b","input":"hi"}')
    assert req == RequestInfo("gpt-oss-20b", False)  # the Responses API streams only when asked
    req = parse_request_body(Api.ANTHROPIC_MESSAGES, b'{"model":"claude","max_tokens":9,"stream":true,"messages":[]}')
    assert req == RequestInfo("claude", True)


# --- cut text: the helpers the pattern readers share ------------------------------------------

def _decoded_model(raw: bytes) -> str | None:
    """The reference: the model a string's JSON text names, as json decodes it."""
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return llm._clean_model(value)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"Z", b"-", b" ", b"/", b"\x7f", b"\x00", b"\x1f", b"\n", b'"', b"\\",
                                 b'\\"', b"\\n", b"\\u00e9", b"\\ud800", b"\\x", "é".encode(), b"\xc3", b"\xff"]),
                max_size=8).map(b"".join))
def test_a_model_in_cut_text_decodes_as_json_decodes_it(raw: bytes) -> None:
    assert llm._decode_model(raw) == _decoded_model(raw), raw


def test_a_model_in_cut_text_decodes_escapes_and_refuses_what_json_refuses() -> None:
    assert llm._decode_model(b"Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert llm._decode_model(b"caf\\u00e9") == "café"
    assert llm._decode_model("café".encode()) == "café"
    for raw in (b"a\nb", b"a\x00", b"a\\", b"a\\q", b"\xff"):
        assert llm._decode_model(raw) is None, raw


# the event-line pattern that matches where a line starts, the reference for _event_names
_EVENT_LINES_REFERENCE = re.compile(rb"(?:^|\n)event: ?([A-Za-z0-9_.]{1,64})\r?(?=\n|$)")


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"event:", b"event: ", b"event:  ", b"\n", b"\r", b"\r\n", b"a", b".", b"_", b"-",
                                 b" ", b"x" * 30, b"data: {}", b"response.completed"]), max_size=12).map(b"".join))
def test_event_names_in_cut_text_are_the_line_start_patterns(s: bytes) -> None:
    assert llm._event_names(s) == [m.group(1) for m in _EVENT_LINES_REFERENCE.finditer(s)], s


def test_event_names_in_cut_text() -> None:
    s = b"3f\r\nevent: response.completed\ndata: {}\n\nxevent: no\nevent:ping\r\nevent: " + b"x" * 65 + b"\n"
    assert llm._event_names(s) == [b"response.completed", b"ping"]
    assert llm._event_names(b"event: a b\n") == []
    assert llm._event_names(b"event: end") == [b"end"]


# --- events that start in one write (several when a server's socket backed up) ----------------

def _sse(text: str) -> bytes:
    return b"data: " + j({"model": MODEL, "choices": [{"delta": {"content": text}}]}) + b"\n\n"


def _ch(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


@pytest.mark.parametrize(("write", "ndjson", "events"), [
    (_sse("a"), False, 1),
    (_ch(_sse("a")), False, 1),
    (_ch(_sse("a")) + _ch(_sse("b")) + _ch(_sse("c")), False, 3),  # three chunks in one write
    (_sse("a") + _sse("b"), False, 2),  # no chunked coding
    (_sse("a").replace(b"\n\n", b"\r\n\r\n") * 2, False, 2),
    (b"data: {\"a\":1}\ndata: {\"b\":2}\n\n" + _sse("c"), False, 2),  # an event of two data lines
    (_sse("data: inside a token, data:"), False, 1),  # "data:" in the text starts no line
    (b"event: x\ndata: {}\n\nevent: y\ndata: {}\n\n", False, 2),
    (_ch(_sse("a"))[:20], False, 1),  # a write cut short still opens its event
    (_ch(_sse("a"))[20:], False, 0),  # the end of an event
    (b": keep-alive\n\n", False, 0),
    (b"", False, 0),
    (b'{"response":"a"}\n{"response":"b"}\n', True, 2),
    (_ch(b'{"response":"a"}\n') + _ch(b'{"response":"b","done":true}\n'), True, 2),
    (b'{"response":"a"}\n', True, 1),
    (b'"b"}\n', True, 0),
])
def test_the_events_that_start_in_a_write(write: bytes, ndjson: bool, events: int) -> None:
    assert llm.write_events(write, ndjson) == events
    pieces = llm.split_events(write, ndjson)
    assert b"".join(p for p, _ in pieces) == write  # cut, nothing lost or repeated
    assert sum(starts for _, starts in pieces) == events
    assert all(starts for _, starts in pieces[1:])  # only the first piece may be an earlier event's end


def test_each_event_of_a_write_of_chunks_is_one_whole_chunk() -> None:
    """A write of several chunks is cut at their size lines: each piece reads as a whole event."""
    write = _ch(_sse("a")) + _ch(_sse("")) + _ch(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    pieces = llm.split_events(write, False)
    assert [p for p, _ in pieces] == [_ch(_sse("a")), _ch(_sse("")), _ch(b"data: [DONE]\n\n") + b"0\r\n\r\n"]
    assert llm._whole_event(pieces[0][0]) is not None and llm._whole_event(pieces[1][0]) is not None
    assert [parse_fragment(Api.OPENAI_CHAT, p).output for p, _ in pieces] == [True, False, False]


@given(st.lists(st.sampled_from([_ch(_sse("a")), _sse("b"), b"data: {}\ndata: {}\n\n", b": ping\n\n",
                                 b"event: e\n", b"\r\n", b"1f\r\n"]), max_size=12), st.integers(0, 400))
@settings(max_examples=300, deadline=None)
def test_the_count_is_the_count_of_event_starts(parts: list[bytes], cut: int) -> None:
    """The quick count (one "data:" at most) and the line walk agree, wherever a write is cut."""
    write = b"".join(parts)[cut:]
    assert llm.write_events(write, False) == len(llm._event_starts(write, False))
