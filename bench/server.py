"""The benchmark's server: FastAPI on uvicorn (uvloop + httptools), as vLLM's
API server runs, with no artificial delays, so that any tracing cost shows.

Profiles:
- json: ``GET /v1/models`` returns a small JSON document;
- sse: ``POST /v1/chat/completions`` streams ``--chunks`` OpenAI-style chunks
  (a role-only first chunk, content chunks, a finish chunk, ``[DONE]``);
- responses: ``POST /v1/responses`` streams ``--chunks`` text deltas between the
  Responses API's envelope events, each a named event in its own write, as
  vLLM writes them (``agent.demo_server`` serves the same shape with timings).

``--otel`` wraps the app in OpenTelemetry's ASGI middleware with a real SDK
tracer and meter provider (spans batched to an exporter that drops them), the
in-process instrumentation the agent is compared with.

Run: ``python -m bench.server --port P [--chunks 50] [--otel]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse


def make_app(chunks: int) -> FastAPI:
    app = FastAPI()
    models = {"object": "list", "data": [{"id": "bench-llm", "object": "model", "owned_by": "infersight"}]}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench-llm",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"

    first = chunk({"role": "assistant", "content": ""})
    token = chunk({"content": "tok "})
    last = chunk({}, "length")

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            yield first
            for _ in range(chunks):
                yield token
            yield last
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    def event(kind: str, seq: int, **fields: Any) -> bytes:
        data = json.dumps({**fields, "sequence_number": seq, "type": kind}, separators=(",", ":"))
        return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"

    text = " ".join(["tok"] * chunks)
    usage = {"input_tokens": 8, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": chunks,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8 + chunks}

    def response(status: str, done: bool) -> dict[str, Any]:
        item = {"id": "msg_bench", "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        return {"id": "resp_bench", "created_at": 0, "incomplete_details": None, "instructions": None,
                "metadata": {}, "model": "bench-llm", "object": "response", "output": [item] if done else [],
                "parallel_tool_calls": True, "status": status, "usage": usage if done else None, "user": None}

    part = {"type": "output_text", "text": "", "annotations": []}
    ids = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    opening = [
        event("response.created", 0, response=response("in_progress", False)),
        event("response.in_progress", 1, response=response("in_progress", False)),
        event("response.output_item.added", 2, output_index=0,
              item={"id": "msg_bench", "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}),
        event("response.content_part.added", 3, part=part, **ids),
    ]
    deltas = [event("response.output_text.delta", 4 + i, delta="tok ", logprobs=[], **ids) for i in range(chunks)]
    closing = [
        event("response.output_text.done", 4 + chunks, text=text, logprobs=[], **ids),
        event("response.content_part.done", 5 + chunks, part={**part, "text": text}, **ids),
        event("response.output_item.done", 6 + chunks, output_index=0, item=response("completed", True)["output"][0]),
        event("response.completed", 7 + chunks, response=response("completed", True)),
    ]

    @app.post("/v1/responses")
    async def responses() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            for w in opening:
                yield w
            for w in deltas:
                yield w
            for w in closing:
                yield w

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def instrument(app: Any) -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(DropExporter()))
    return OpenTelemetryMiddleware(app, tracer_provider=tp, meter_provider=MeterProvider())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--otel", action="store_true")
    a = ap.parse_args(argv)
    app: Any = make_app(a.chunks)
    if a.otel:
        app = instrument(app)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools")


if __name__ == "__main__":
    main()
