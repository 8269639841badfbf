"""A second server stack for end-to-end tests: aiohttp on the plain asyncio
loop (send/recv syscalls rather than uvloop's read/write), streaming SSE
without chunked encoding framing differences hidden by uvicorn.

Writes the same timing lines as agent.demo_server to INFERSIGHT_DEMO_TIMINGS.
Run: python -m tests.servers.aiohttp_sse PORT
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from aiohttp import web

TIMINGS = os.environ.get("INFERSIGHT_DEMO_TIMINGS")


def log(entry: dict) -> None:
    if TIMINGS:
        with open(TIMINGS, "a") as f:
            f.write(json.dumps(entry) + "\n")


async def health(request: web.Request) -> web.Response:
    log({"path": "/health", "t_start": time.monotonic_ns()})
    return web.json_response({"status": "ok"})


async def chat(request: web.Request) -> web.StreamResponse:
    t0 = time.monotonic_ns()
    body = await request.json()
    n = int(body.get("max_tokens", 8))
    ttft = float(body.get("ttft_s", 0.03))
    tpot = float(body.get("tpot_s", 0.005))
    model = body.get("model", "aio-model")
    entry: dict = {"path": "/v1/chat/completions", "t_start": t0, "chunks": [], "model": model}
    if not body.get("stream"):
        await asyncio.sleep(ttft)
        entry["t_end"] = time.monotonic_ns()
        log(entry)
        return web.json_response({"id": "x", "object": "chat.completion", "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(ttft)
    for i in range(n):
        if i:
            await asyncio.sleep(tpot)
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": model,
                 "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
        entry["chunks"].append(["token", time.monotonic_ns()])
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    fin = {"id": "x", "object": "chat.completion.chunk", "model": model,
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    entry["chunks"].append(["finish", time.monotonic_ns()])
    await resp.write(b"data: " + json.dumps(fin).encode() + b"\n\n")
    entry["chunks"].append(["done", time.monotonic_ns()])
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    entry["t_end"] = time.monotonic_ns()
    log(entry)
    return resp


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
