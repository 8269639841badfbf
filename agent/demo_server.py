"""A small OpenAI-compatible (and Ollama-style) streaming server for demos,
tests and benchmarks. It serves with FastAPI on uvicorn, the stack of vLLM's
API server, and "generates" tokens on a fixed schedule: the first token after
``ttft_s``, then one every ``tpot_s``.

When ``INFERSIGHT_DEMO_TIMINGS`` names a file, each request appends one JSON
line with the server's own monotonic timestamps (handler start, each chunk
handed to the server, end), so tests can compare the agent's measurements with
what the server did.

Run: ``python -m agent.demo_server --port 8000 [--ttft 0.05 --tpot 0.01]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away")


class Timings:
    """Appends one JSON line per request to a file (thread-safe)."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        if not self._path:
            return
        line = json.dumps(entry) + "\n"
        with self._lock, open(self._path, "a") as f:
            f.write(line)


class TimingMiddleware:
    """Raw ASGI middleware: stamps the request's arrival at the application and
    each response body message right before the server writes it, then logs
    one line per request. The handler names its chunks in ``entry["chunks"]``
    (kinds, in order); the stamps are paired with them here."""

    def __init__(self, app: Any, timings: Timings) -> None:
        self.app = app
        self.timings = timings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.timings._path:
            await self.app(scope, receive, send)
            return
        entry: dict[str, Any] = {"path": scope["path"], "query": scope.get("query_string", b"").decode("latin-1"),
                                 "t_start": time.monotonic_ns(), "sends": [], "chunks": []}
        scope.setdefault("state", {})["timing"] = entry

        async def timed_send(msg: dict[str, Any]) -> None:
            # stamped right before the server writes: uvicorn writes inside send()
            if msg["type"] == "http.response.body":
                now = time.monotonic_ns()
                if msg.get("body"):
                    entry["sends"].append(now)
                if not msg.get("more_body"):
                    entry["t_end"] = now
            await send(msg)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            entry.setdefault("t_end", time.monotonic_ns())
            kinds = entry.pop("chunks")
            sends = entry.pop("sends")
            entry["chunks"] = [[k, t] for k, t in zip(kinds, sends, strict=False)]
            entry["aborted"] = bool(kinds) and kinds[-1] != "done"
            self.timings.write(entry)


def make_app(ttft_s: float = 0.05, tpot_s: float = 0.01, model: str = "demo-llm") -> Any:
    app = FastAPI()
    timings = Timings(os.environ.get("INFERSIGHT_DEMO_TIMINGS"))

    def entry_of(request: Request) -> dict[str, Any]:
        return request.scope.get("state", {}).get("timing", {"chunks": []})

    def plan(body: dict[str, Any]) -> tuple[int, float, float]:
        n = int(body.get("max_tokens") or body.get("options", {}).get("num_predict") or 16)
        return max(1, min(n, 4096)), float(body.get("ttft_s", ttft_s)), float(body.get("tpot_s", tpot_s))

    async def begin(request: Request, max_tokens: str = "max_tokens") -> tuple[
            dict[str, Any], int, float, float, str, dict[str, Any]]:
        """The request's body, its plan (tokens, the first's delay, the delay of each after it),
        model and timing entry; ``max_tokens``: the API's name for the token limit."""
        body = await request.json()
        n, first, per = plan({**body, "max_tokens": body.get(max_tokens)})
        entry = entry_of(request)
        entry["model"] = name = body.get("model") or model
        return body, n, first, per, name, entry

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, n, first, per, name, entry = await begin(request)
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        if not body.get("stream"):
            await asyncio.sleep(first + per * (n - 1))
            text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
            entry["chunks"].append("done")
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                    ],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                              "total_tokens": prompt_tokens + n},
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            c = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"

        async def gen() -> AsyncIterator[bytes]:
            # like vLLM: a role-only first event, before any token exists
            entry["chunks"].append("role")
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                entry["chunks"].append("token")
                yield chunk({"content": WORDS[i % len(WORDS)] + " "})
            entry["chunks"].append("finish")
            yield chunk({}, "length")
            if include_usage:
                u: dict[str, Any] = {
                    "id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                             "total_tokens": prompt_tokens + n}}
                entry["chunks"].append("usage")
                yield b"data: " + json.dumps(u, separators=(",", ":")).encode() + b"\n\n"
            entry["chunks"].append("done")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/api/generate")
    async def ollama_generate(request: Request) -> Any:
        body, n, first, per, name, entry = await begin(request)

        async def gen() -> AsyncIterator[bytes]:
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                entry["chunks"].append("token")
                line = {"model": name, "created_at": "2026-01-01T00:00:00Z",
                        "response": WORDS[i % len(WORDS)] + " ", "done": False}
                yield json.dumps(line, separators=(",", ":")).encode() + b"\n"
            final = {"model": name, "created_at": "2026-01-01T00:00:00Z", "response": "", "done": True,
                     "done_reason": "length", "context": list(range(300)), "total_duration": 1,
                     "prompt_eval_count": 7, "eval_count": n, "eval_duration": 1}
            entry["chunks"].append("done")
            yield json.dumps(final, separators=(",", ":")).encode() + b"\n"

        if body.get("stream") is False:
            await asyncio.sleep(first + per * (n - 1))
            return JSONResponse({"model": name, "response": "x", "done": True, "done_reason": "length",
                                 "prompt_eval_count": 7, "eval_count": n})
        return StreamingResponse(gen(), media_type="application/x-ndjson")

    @app.post("/generate_stream")
    async def tgi_generate_stream(request: Request) -> Any:
        """TGI's native streaming API: a `token` per event, `details` at the end."""
        body = await request.json()
        params = body.get("parameters") or {}
        n, first, per = plan({"max_tokens": params.get("max_new_tokens"), **body})
        entry = entry_of(request)

        async def gen() -> AsyncIterator[bytes]:
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                last = i == n - 1
                ev: dict[str, Any] = {"index": i + 1, "token": {"id": 100 + i, "text": WORDS[i % len(WORDS)] + " ",
                                                                "logprob": -0.5, "special": False},
                                      "generated_text": None, "details": None}
                if last:
                    ev["generated_text"] = "..."
                    ev["details"] = {"finish_reason": "length", "generated_tokens": n, "seed": None}
                entry["chunks"].append("token")
                yield b"data:" + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
            entry["chunks"].append("done")

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v2/models/{model_name}/generate_stream")
    async def triton_generate_stream(model_name: str, request: Request) -> Any:
        """Triton's generate extension: one `text_output` per event, the model in the URL."""
        body = await request.json()
        n, first, per = plan(body)
        entry = entry_of(request)

        async def gen() -> AsyncIterator[bytes]:
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                ev = {"model_name": model_name, "model_version": "1", "text_output": WORDS[i % len(WORDS)]}
                entry["chunks"].append("token")
                yield b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
            entry["chunks"].append("done")

        return StreamingResponse(gen(), media_type="text/event-stream")

    def sse(kind: str, ev: dict[str, Any]) -> bytes:
        """One typed SSE event, written alone, as vLLM writes them: its name, then its data."""
        return b"event: " + kind.encode() + b"\ndata: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        """The OpenAI Responses API. The demo always stops at ``max_output_tokens``: the
        response ends incomplete, for that reason, as OpenAI's does."""
        body, n, first, per, name, entry = await begin(request, "max_output_tokens")
        rid, mid = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
        prompt = body.get("input")
        input_tokens = len(str(prompt).split()) if prompt else 0
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))

        def response(status: str, done: bool) -> dict[str, Any]:
            item = {"id": mid, "type": "message", "role": "assistant", "status": status,
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
            # vLLM's field order (the openai package's models, serialised as declared)
            return {
                "id": rid, "created_at": int(time.time()),
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": None, "metadata": {}, "model": name, "object": "response",
                "output": [item] if done else [], "parallel_tool_calls": True, "temperature": 1.0,
                "tool_choice": "auto", "tools": [], "top_p": 1.0, "max_output_tokens": n, "status": status,
                "text": {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": input_tokens + n} if done else None,
                "user": None,
            }

        if not body.get("stream"):
            await asyncio.sleep(first + per * (n - 1))
            entry["chunks"].append("done")
            return JSONResponse(response("incomplete", True))

        async def gen() -> AsyncIterator[bytes]:
            seq = iter(range(1 << 30))

            def ev(kind: str, **fields: Any) -> bytes:
                entry["chunks"].append(fields.pop("_chunk", "meta"))
                return sse(kind, {**fields, "sequence_number": next(seq), "type": kind})

            # the events before the first token, each its own write
            yield ev("response.created", response=response("in_progress", False))
            yield ev("response.in_progress", response=response("in_progress", False))
            item = {"id": mid, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            yield ev("response.output_item.added", output_index=0, item=item)
            yield ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                     part={"type": "output_text", "text": "", "annotations": []})
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                yield ev("response.output_text.delta", _chunk="token", item_id=mid, output_index=0, content_index=0,
                         delta=WORDS[i % len(WORDS)] + (" " if i < n - 1 else ""))
            yield ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text)
            yield ev("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                     part={"type": "output_text", "text": text, "annotations": []})
            yield ev("response.output_item.done", output_index=0, item={**item, "status": "incomplete"})
            yield ev("response.incomplete", _chunk="done", response=response("incomplete", True))

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        """The Anthropic Messages API; the demo always stops at ``max_tokens``."""
        body, n, first, per, name, entry = await begin(request)
        mid = "msg_" + uuid.uuid4().hex[:24]
        input_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        if not body.get("stream"):
            await asyncio.sleep(first + per * (n - 1))
            entry["chunks"].append("done")
            return JSONResponse({
                "id": mid, "type": "message", "role": "assistant", "model": name,
                "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens", "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": n},
            })

        async def gen() -> AsyncIterator[bytes]:
            def ev(kind: str, chunk: str = "meta", **fields: Any) -> bytes:
                entry["chunks"].append(chunk)
                return sse(kind, {"type": kind, **fields})

            yield ev("message_start", message={
                "id": mid, "type": "message", "role": "assistant", "model": name, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}})
            yield ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield ev("ping")
            await asyncio.sleep(first)
            for i in range(n):
                if i:
                    await asyncio.sleep(per)
                yield ev("content_block_delta", "token", index=0,
                         delta={"type": "text_delta", "text": WORDS[i % len(WORDS)] + " "})
            yield ev("content_block_stop", index=0)
            yield ev("message_delta", delta={"stop_reason": "max_tokens", "stop_sequence": None},
                     usage={"output_tokens": n})
            yield ev("message_stop", "done")

        return StreamingResponse(gen(), media_type="text/event-stream")

    return TimingMiddleware(app, timings)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ttft", type=float, default=0.05)
    ap.add_argument("--tpot", type=float, default=0.01)
    ap.add_argument("--model", default="demo-llm")
    ap.add_argument("--loop", default="auto", help="uvicorn event loop: auto, asyncio or uvloop")
    ap.add_argument("--ssl-keyfile", help="serve HTTPS with this key (and --ssl-certfile)")
    ap.add_argument("--ssl-certfile")
    a = ap.parse_args(argv)
    uvicorn.run(make_app(a.ttft, a.tpot, a.model), host=a.host, port=a.port, log_level="warning",
                loop=a.loop, access_log=False, ssl_keyfile=a.ssl_keyfile, ssl_certfile=a.ssl_certfile)


if __name__ == "__main__":
    main()
