"""Record real HTTP/1.1 byte streams for the parser tests (run by hand, loopback only).

A FastAPI app served by uvicorn answers in the shapes of vLLM's OpenAI server,
Ollama and TGI (streamed with ``StreamingResponse``, so uvicorn chooses the
framing). Real clients (the ``openai`` package, ``httpx``) call it through a
small TCP relay that writes each direction of each connection to a file:
``<name>.request.bin`` (what the server read) and ``<name>.response.bin``
(what the server wrote). Each client keeps its connection alive across two
calls, so a file holds two messages.

    .venv/bin/python tests/data/parsers/record.py

The completion text is invented here; it carries a marker (``SECRET-TEXT``)
that tests check never comes back out of the parsers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types.chat import ChatCompletionMessageParam

HERE = Path(__file__).resolve().parent
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WORDS = [" SECRET-TEXT", " is", " a", " test", "."]
MAX_BYTES = 1 << 20  # per recorded direction

app = FastAPI()


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    base = {
        "id": "chatcmpl-rec",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": body["model"],
    }
    usage = {"prompt_tokens": 17, "total_tokens": 17 + len(WORDS), "completion_tokens": len(WORDS)}
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "chatcmpl-rec",
                "object": "chat.completion",
                "created": 1718000000,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(WORDS)},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    async def events() -> AsyncIterator[str]:
        def chunk(delta: dict[str, object], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return f"data: {_dumps({**base, 'choices': [choice]})}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for w in WORDS:
            await asyncio.sleep(0.005)
            yield chunk({"content": w})
        yield chunk({"content": ""}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {_dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/api/generate")
async def ollama_generate(request: Request) -> StreamingResponse:
    body = await request.json()

    async def lines() -> AsyncIterator[str]:
        head = {"model": body["model"], "created_at": "2024-09-01T00:00:00.000000Z"}
        for w in WORDS:
            await asyncio.sleep(0.005)
            yield _dumps({**head, "response": w, "done": False}) + "\n"
        final = {
            **head,
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": list(range(128000, 131000)),
            "total_duration": 5589157167,
            "load_duration": 3013701500,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 130079000,
            "eval_count": len(WORDS),
            "eval_duration": 2450436000,
        }
        yield _dumps(final) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.post("/generate_stream")
async def tgi_generate_stream(request: Request) -> StreamingResponse:
    await request.json()

    async def events() -> AsyncIterator[str]:
        for i, w in enumerate(WORDS):
            await asyncio.sleep(0.005)
            token = {"id": 100 + i, "text": w, "logprob": -0.1, "special": False}
            yield (
                "data:"
                + _dumps({"index": i + 1, "token": token, "generated_text": None, "details": None})
                + "\n\n"
            )
        token = {"id": 128009, "text": "<|eot_id|>", "logprob": -0.01, "special": True}
        details = {"finish_reason": "eos_token", "generated_tokens": len(WORDS) + 1, "seed": None}
        final = {
            "index": len(WORDS) + 1,
            "token": token,
            "generated_text": "".join(WORDS),
            "details": details,
        }
        yield "data:" + _dumps(final) + "\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


class Relay:
    """Loopback TCP relay that records both directions of every connection, in order."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.request = bytearray()
        self.response = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, self.request), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.response), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if len(record) + len(data) <= MAX_BYTES:
                record += data
            dst.sendall(data)

    def save(self, name: str) -> None:
        (HERE / f"{name}.request.bin").write_bytes(bytes(self.request))
        (HERE / f"{name}.response.bin").write_bytes(bytes(self.response))
        self.listener.close()


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("uvicorn did not start")


def main() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    _wait_port(port)

    relay = Relay(port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{relay.port}/v1", api_key="none", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "SECRET-TEXT prompt " + "x" * 2000}
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=16
    )
    for _ in stream:
        pass
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    client.close()
    time.sleep(0.2)  # let the relay threads copy the last bytes
    relay.save("openai_chat")

    for name, path, body in (
        ("ollama_generate", "/api/generate", {"model": "llama3.2", "prompt": "SECRET-TEXT prompt"}),
        ("tgi_generate_stream", "/generate_stream", {"inputs": "SECRET-TEXT prompt", "parameters": {}}),
    ):
        relay = Relay(port)
        with httpx.Client(base_url=f"http://127.0.0.1:{relay.port}") as http:
            for _ in range(2):
                with http.stream("POST", path, json=body) as r:
                    for _ in r.iter_bytes():
                        pass
        time.sleep(0.2)
        relay.save(name)

    server.should_exit = True


if __name__ == "__main__":
    main()
