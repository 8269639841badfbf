"""End to end, with real eBPF: real servers, real clients, the real pipeline.

The servers record their own monotonic timestamps (handler start, each chunk
handed to the server, end); the agent's TTFT and durations must match them
within 2 ms. Records are counted exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from agent import native, procfs
from agent.record import RECORD_KEYS
from agent.targets import TargetConfig
from probes.sockets import SocketProbeConfig, exit_args_supported
from tests.harness import (
    ARG_MODES,
    REPO,
    Agent,
    Server,
    arg_mode,
    free_port,
    running_agent,
    start_demo_server,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.ebpf

TOL = 0.002  # seconds: the agent vs the server's own clock

@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def demo(tmp_module: Path) -> Iterator[Server]:
    srv = start_demo_server(tmp_module)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def aio(tmp_module: Path) -> Iterator[Server]:
    port = free_port()
    srv = start_server([sys.executable, "-m", "tests.servers.aiohttp_sse", str(port)], port, tmp_module, "aiohttp")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def agent(demo: Server, aio: Server) -> Iterator[Agent]:
    with running_agent(TargetConfig(pids=(demo.pid, aio.pid))) as a:
        yield a


def test_syscall_arguments_read_at_exit_where_the_kernel_allows(agent: Agent) -> None:
    """The default probe reads the data syscalls' arguments at exit wherever the feature test
    passes; the tests above and below then run that way. Under CI the test kernel must pass it."""
    supported, why = exit_args_supported()
    assert agent.pipeline.probe.exit_args is supported  # type: ignore[union-attr]
    if not supported:
        pytest.skip(f"arguments saved at entry on this kernel: {why}")
    programs = {name.decode() for name in agent.pipeline.probe.bpf.funcs}  # type: ignore[union-attr]
    assert "tracepoint__syscalls__sys_exit_write" in programs
    assert "tracepoint__syscalls__sys_enter_write" not in programs
    assert "tracepoint__syscalls__sys_enter_accept4" in programs  # the rest keep their entries


def _stream_timings(entry: dict) -> tuple[float, float, float]:
    """(ttft, tpot, duration) as the server saw them."""
    tokens = [t for kind, t in entry["chunks"] if kind == "token"]
    ttft = (tokens[0] - entry["t_start"]) / 1e9
    tpot = (tokens[-1] - tokens[0]) / 1e9 / (len(tokens) - 1) if len(tokens) > 1 else 0.0
    return ttft, tpot, (entry["t_end"] - entry["t_start"]) / 1e9


def _client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("n_tokens,usage", [(1, True), (3, False), (12, True), (60, True)])
def test_openai_streaming_records_match_server(agent: Agent, demo: Server, n_tokens: int, usage: bool) -> None:
    client = _client(demo)
    mark = agent.mark()
    t_mark = len(demo.timings())
    for _ in range(3):
        stream = client.chat.completions.create(
            model="llama-e2e",
            messages=[{"role": "user", "content": "count for me"}],
            stream=True,
            max_tokens=n_tokens,
            stream_options={"include_usage": True} if usage else None,
            extra_body={"ttft_s": 0.04, "tpot_s": 0.004},
        )
        chunks = list(stream)
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == n_tokens
    recs = agent.wait_records(mark, 3)
    time.sleep(0.2)
    assert len(agent.since(mark)) == 3
    server = demo.timings()[t_mark:]
    assert len(server) == 3
    for rec, entry in zip(recs, server, strict=True):
        assert rec.method == "POST" and rec.path == "/v1/chat/completions"
        assert rec.status_code == 200
        assert rec.streaming is True
        assert rec.request_model == "llama-e2e" and rec.response_model == "llama-e2e"
        assert rec.operation == "chat"
        assert rec.output_events == n_tokens
        assert rec.finish_reasons == ("length",)
        assert rec.output_tokens == (n_tokens if usage else None)
        assert rec.aborted is False and rec.error_type is None
        assert rec.server_port == demo.port and rec.client_address == "127.0.0.1"
        ttft, tpot, duration = _stream_timings(entry)
        assert rec.time_to_first_token_s is not None
        assert abs(rec.time_to_first_token_s - ttft) <= TOL, (rec.time_to_first_token_s, ttft)
        assert abs(rec.duration_s - duration) <= TOL, (rec.duration_s, duration)
        if n_tokens > 1:
            assert rec.time_per_output_token_s is not None
            assert abs(rec.time_per_output_token_s - tpot) <= TOL / 2, (rec.time_per_output_token_s, tpot)
        else:
            assert rec.time_per_output_token_s is None


@pytest.mark.parametrize("n_tokens", [2, 40])
def test_openai_responses_api_stream(agent: Agent, demo: Server, n_tokens: int) -> None:
    """The Responses API opens a stream with four events that carry no output (created,
    in_progress, output_item.added, content_part.added), each written alone as vLLM writes
    them: the first token is the response's sixth write, past the three writes sampled for
    chat streams. The probe tells the API from the request line and samples more of its
    writes, so TTFT is measured, and the end event's status and usage are read from the
    tail ring, though the event repeats the whole text."""
    client = _client(demo)
    mark = agent.mark()
    t_mark = len(demo.timings())
    unresolved = agent.metrics.total("infersight.assembly.ttft.unresolved")
    for _ in range(2):
        events = list(client.responses.create(
            model="gpt-e2e", input="tell me a story", stream=True, max_output_tokens=n_tokens,
            extra_body={"ttft_s": 0.03, "tpot_s": 0.003},
        ))
        assert sum(1 for e in events if e.type == "response.output_text.delta") == n_tokens
        assert events[-1].type == "response.incomplete"
    recs = agent.wait_records(mark, 2)
    time.sleep(0.2)
    assert len(agent.since(mark)) == 2
    server = demo.timings()[t_mark:]
    for rec, entry in zip(recs, server, strict=True):
        assert rec.path == "/v1/responses" and rec.status_code == 200 and rec.streaming is True
        assert rec.operation == "chat"
        assert rec.request_model == rec.response_model == "gpt-e2e"
        assert rec.input_tokens == 4 and rec.output_tokens == n_tokens
        assert rec.finish_reasons == ("max_output_tokens",)
        assert rec.output_events == n_tokens
        assert rec.aborted is False and rec.error_type is None
        ttft, tpot, duration = _stream_timings(entry)
        assert rec.time_to_first_token_s is not None
        assert abs(rec.time_to_first_token_s - ttft) <= TOL, (rec.time_to_first_token_s, ttft)
        assert abs(rec.duration_s - duration) <= TOL
        assert rec.time_per_output_token_s is not None
        assert abs(rec.time_per_output_token_s - tpot) <= TOL / 2, (rec.time_per_output_token_s, tpot)
    assert agent.metrics.total("infersight.assembly.ttft.unresolved") == unresolved


@pytest.mark.parametrize("n_tokens", [1, 30])
def test_anthropic_messages_api_stream(agent: Agent, demo: Server, n_tokens: int) -> None:
    """The Messages API (served by vLLM and llama.cpp as well), driven by the official
    ``anthropic`` client: a stream opens with message_start, content_block_start and ping;
    its usage is split between message_start (input) and message_delta (output), with
    stop_reason. A query (``?beta=true``, which Anthropic's own beta endpoints take) is not
    part of the record's path."""
    client = anthropic.Anthropic(base_url=demo.url, api_key="test", max_retries=0, timeout=30)
    mark = agent.mark()
    t_mark = len(demo.timings())
    events = list(client.beta.messages.create(
        model="claude-e2e", max_tokens=n_tokens, stream=True,
        messages=[{"role": "user", "content": "one two three"}], extra_body={"ttft_s": 0.03, "tpot_s": 0.003},
        extra_query={"beta": "true"},
    ))
    assert sum(1 for e in events if e.type == "content_block_delta") == n_tokens
    (end,) = [e for e in events if e.type == "message_delta"]
    assert end.delta.stop_reason == "max_tokens" and end.usage.output_tokens == n_tokens
    whole = client.messages.create(model="claude-json", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"tpot_s": 0.001})
    streamed, rec = agent.wait_records(mark, 2)
    entry = demo.timings()[t_mark]
    assert (entry["path"], entry["query"]) == ("/v1/messages", "beta=true")
    assert streamed.path == "/v1/messages" and streamed.streaming is True  # url.path: no query
    assert streamed.operation == "chat"
    assert streamed.request_model == streamed.response_model == "claude-e2e"
    assert streamed.input_tokens == 3 and streamed.output_tokens == n_tokens
    assert streamed.finish_reasons == ("max_tokens",)
    assert streamed.output_events == n_tokens
    ttft, _, duration = _stream_timings(entry)
    assert streamed.time_to_first_token_s is not None
    assert abs(streamed.time_to_first_token_s - ttft) <= TOL, (streamed.time_to_first_token_s, ttft)
    assert abs(streamed.duration_s - duration) <= TOL
    assert rec.streaming is False and rec.time_to_first_token_s is None
    assert rec.request_model == rec.response_model == whole.model == "claude-json"
    assert (rec.input_tokens, rec.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens) == (1, 5)
    assert rec.finish_reasons == (whole.stop_reason,) == ("max_tokens",)


def test_openai_non_streaming(agent: Agent, demo: Server) -> None:
    client = _client(demo)
    mark = agent.mark()
    t_mark = len(demo.timings())
    resp = client.chat.completions.create(model="m-json", messages=[{"role": "user", "content": "hi there you"}],
                                          max_tokens=5, extra_body={"ttft_s": 0.02, "tpot_s": 0.001})
    assert resp.usage is not None
    (rec,) = agent.wait_records(mark, 1)
    entry = demo.timings()[t_mark]
    assert rec.streaming is False and rec.status_code == 200
    assert rec.request_model == rec.response_model == "m-json"
    assert rec.input_tokens == resp.usage.prompt_tokens and rec.output_tokens == 5
    assert rec.finish_reasons == ("length",)
    assert rec.time_to_first_token_s is None and rec.output_events is None
    assert abs(rec.duration_s - (entry["t_end"] - entry["t_start"]) / 1e9) <= TOL


def test_keepalive_reuse_and_exact_counts(agent: Agent, demo: Server) -> None:
    mark = agent.mark()
    with httpx.Client(base_url=demo.url) as c:
        for i in range(25):
            r = c.get("/health") if i % 5 else c.get("/missing")
            assert r.status_code in (200, 404)
        # the open keep-alive connection shows in the connection map's fill
        agent.pipeline._read_map_fill()
        assert agent.metrics.get("infersight.bpf.map.entries", (("map", "conns"),)) >= 1
        assert 0 < agent.metrics.get("infersight.bpf.map.fill_ratio", (("map", "conns"),)) < 1
        assert agent.metrics.get("infersight.bpf.map.evictions", (("map", "conns"),)) == 0
    recs = agent.wait_records(mark, 25)
    time.sleep(0.3)
    assert len(agent.since(mark)) == 25
    assert [r.status_code for r in recs] == [404 if i % 5 == 0 else 200 for i in range(25)]
    assert {r.method for r in recs} == {"GET"}
    assert len({r.client_port for r in recs}) == 1, "one keep-alive connection"
    assert all(r.operation is None and r.streaming is False for r in recs)


def test_client_abort_is_detected(agent: Agent, demo: Server) -> None:
    mark = agent.mark()
    t_mark = len(demo.timings())
    body = {"model": "abort-me", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 500, "ttft_s": 0.01, "tpot_s": 0.01}
    with httpx.Client(base_url=demo.url) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen == 6:
                break
    (rec,) = agent.wait_records(mark, 1)
    assert rec.aborted is True
    assert rec.status_code == 200 and rec.request_model == "abort-me"
    assert rec.output_events is not None and 4 <= rec.output_events < 500
    wait_for(lambda: len(demo.timings()) > t_mark, 5)
    assert demo.timings()[t_mark]["aborted"] is True


def test_ollama_ndjson(agent: Agent, demo: Server) -> None:
    mark = agent.mark()
    with httpx.Client(base_url=demo.url) as c:
        r = c.post("/api/generate", json={"model": "llama3:8b", "prompt": "why", "options": {"num_predict": 9},
                                          "ttft_s": 0.02, "tpot_s": 0.002})
        lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True
    (rec,) = agent.wait_records(mark, 1)
    assert rec.path == "/api/generate" and rec.operation == "generate_content"
    assert rec.streaming is True and rec.output_events == 9
    assert rec.request_model == "llama3:8b" == rec.response_model
    assert rec.input_tokens == 7 and rec.output_tokens == 9
    assert rec.finish_reasons == ("length",)


@pytest.mark.parametrize("n", [3, 20])
def test_tgi_and_triton_streams(agent: Agent, demo: Server, n: int) -> None:
    mark = agent.mark()
    t_mark = len(demo.timings())
    with httpx.Client(base_url=demo.url, timeout=30) as c:
        c.post("/generate_stream", json={"inputs": "why", "parameters": {"max_new_tokens": n},
                                         "ttft_s": 0.02, "tpot_s": 0.002}).read()
        c.post("/v2/models/ensemble-llm/generate_stream", json={"text_input": "why", "max_tokens": n,
                                                                 "ttft_s": 0.02, "tpot_s": 0.002}).read()
    tgi, triton = agent.wait_records(mark, 2)
    server = demo.timings()[t_mark:]
    assert tgi.path == "/generate_stream" and tgi.operation == "generate_content"
    assert tgi.streaming and tgi.output_events == n and tgi.output_tokens == n
    assert tgi.finish_reasons == ("length",)
    assert triton.operation == "generate_content" and triton.request_model == "ensemble-llm"
    assert triton.response_model == "ensemble-llm" and triton.output_events == n
    for rec, entry in zip((tgi, triton), server, strict=True):
        ttft, _, duration = _stream_timings(entry)
        assert rec.time_to_first_token_s is not None
        assert abs(rec.time_to_first_token_s - ttft) <= TOL
        assert abs(rec.duration_s - duration) <= TOL


def test_traceparent_joins_client_trace(agent: Agent, demo: Server) -> None:
    mark = agent.mark()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    httpx.get(demo.url + "/health", headers={"traceparent": tp})
    (rec,) = agent.wait_records(mark, 1)
    assert rec.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rec.parent_span_id == "00f067aa0ba902b7"
    assert rec.span_id and rec.span_id != rec.parent_span_id


def test_second_stack_aiohttp(agent: Agent, aio: Server) -> None:
    client = _client(aio)
    mark = agent.mark()
    t_mark = len(aio.timings())
    for n in (1, 7, 30):
        chunks = list(client.chat.completions.create(model="aio", messages=[{"role": "user", "content": "q"}],
                                                     stream=True, max_tokens=n,
                                                     extra_body={"ttft_s": 0.03, "tpot_s": 0.003}))
        assert chunks
    client.chat.completions.create(model="aio", messages=[{"role": "user", "content": "q"}])
    recs = agent.wait_records(mark, 4)
    time.sleep(0.2)
    assert len(agent.since(mark)) == 4
    server = aio.timings()[t_mark:]
    for n, rec, entry in zip((1, 7, 30), recs[:3], server[:3], strict=True):
        assert rec.status_code == 200 and rec.streaming and rec.output_events == n
        assert rec.finish_reasons == ("stop",)
        ttft, _, duration = _stream_timings(entry)
        assert rec.time_to_first_token_s is not None
        assert abs(rec.time_to_first_token_s - ttft) <= TOL, (rec.time_to_first_token_s, ttft)
        assert abs(rec.duration_s - duration) <= TOL, (rec.duration_s, duration)
    assert recs[3].streaming is False and recs[3].output_tokens == 1 and recs[3].input_tokens == 3


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_wrk_load_counts_exactly(agent: Agent, demo: Server) -> None:
    mark = agent.mark()
    t_mark = len(demo.timings())
    out = subprocess.run(["wrk", "-t1", "-c4", "-d2s", demo.url + "/health"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    completed = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def settled() -> bool:
        served = len(demo.timings()) - t_mark
        return served >= completed and len(agent.since(mark)) >= served

    wait_for(settled, 15)
    time.sleep(0.5)
    served = len(demo.timings()) - t_mark
    recs = agent.since(mark)
    assert served >= completed > 100
    assert len(recs) == served, (len(recs), served, completed)
    assert all(r.status_code == 200 and r.path == "/health" for r in recs)


def test_no_prompt_or_completion_text_in_records(agent: Agent, demo: Server) -> None:
    canary = "CANARY-7f3a9c-prompt-text"
    mark = agent.mark()
    client = _client(demo)
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": canary}], stream=True,
                                        max_tokens=4))
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": canary}], max_tokens=4)
    # the Responses API's end event, and its whole body, repeat the completion's text
    list(client.responses.create(model="m", input=canary, stream=True, max_output_tokens=4))
    client.responses.create(model="m", input=canary, max_output_tokens=4)
    with httpx.Client(base_url=demo.url, timeout=30) as c:
        for stream in (True, False):
            c.post("/v1/messages", json={"model": "m", "max_tokens": 4, "stream": stream,
                                         "messages": [{"role": "user", "content": canary}]})
    recs = agent.wait_records(mark, 6)
    assert {r.path for r in recs} == {"/v1/chat/completions", "/v1/responses", "/v1/messages"}
    for r in recs:
        text = r.to_json()
        assert canary not in text
        # completion words of the demo server never appear either
        assert "quick" not in text and "brown" not in text


@pytest.mark.parametrize("native_drain", [True, False], ids=["c-drain", "ctypes-drain"])
def test_requests_accounted_with_tiny_ring_buffer(tmp_path: Path, native_drain: bool) -> None:
    """A 1-page ring buffer drained slowly must lose records; every request is
    then either a record or a counted loss. Both ways of draining it: the C
    callback (probes/_ringdrain.c) and BCC's ctypes callback."""
    srv = start_demo_server(tmp_path)
    try:
        cfg = SocketProbeConfig(ringbuf_pages=1, wakeup_every=1 << 30, native_drain=native_drain)
        with running_agent(TargetConfig(pids=(srv.pid,)), probe=cfg, drain_interval_s=0.5,
                           idle_check_s=1.0) as a:
            drains_in_c = a.pipeline.probe.native_drain  # type: ignore[union-attr]
            assert drains_in_c == (native_drain and native.status()["probes/_ringdrain.c"] == "compiled")
            sent = 0
            body = {"model": "loss", "messages": [{"role": "user", "content": "x" * 1500}], "stream": True,
                    "max_tokens": 6, "ttft_s": 0.0, "tpot_s": 0.0}
            with httpx.Client(base_url=srv.url, limits=httpx.Limits(max_connections=8)) as c:
                for i in range(120):
                    if i % 2:
                        r = c.post("/v1/chat/completions", json=body)
                    else:
                        r = c.get("/health")
                    assert r.status_code == 200
                    sent += 1

            def settled() -> bool:
                lost = a.metrics.total("infersight.requests.lost")
                return len(a.sink.snapshot()) + lost >= sent

            # closes and idle checks finish the last requests
            wait_for(settled, 20)
            time.sleep(1.5)
            records = len(a.sink.snapshot())
            lost = a.metrics.total("infersight.requests.lost")
            kernel_requests = a.pipeline.probe.counters()["requests"]  # type: ignore[union-attr]
            kernel_lost = sum(v for k, v in a.pipeline.probe.counters().items()  # type: ignore[union-attr]
                              if k.startswith("lost_"))
        assert kernel_requests == sent
        assert kernel_lost > 0, "the tiny ring buffer should have overflowed"
        assert lost > 0
        assert records + lost == sent, (records, lost, sent)
    finally:
        srv.stop()


def test_restarted_server_is_picked_up(tmp_path: Path) -> None:
    port = free_port()
    srv = start_demo_server(tmp_path, port)
    try:
        with running_agent(TargetConfig(ports=(port,), rescan_s=30.0)) as a:
            mark = a.mark()
            httpx.get(srv.url + "/before-restart")
            (r1,) = a.wait_records(mark, 1, pred=lambda r: r.path == "/before-restart")
            assert r1.pid == srv.pid and r1.status_code == 404
            srv.stop()
            srv = start_demo_server(tmp_path, port)
            # picked up from its listen() event, long before the 30 s rescan: by the time it
            # answers its first health check, or within a second of it
            wait_for(lambda: srv.pid in a.pipeline.targets, 1.0, what="new server traced within 1 s")
            mark = a.mark()
            httpx.get(srv.url + "/after-restart")
            (r2,) = a.wait_records(mark, 1, timeout=5, pred=lambda r: r.path == "/after-restart")
            assert r2.pid == srv.pid != r1.pid
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_run_jsonl_and_signals(tmp_path: Path, sig: signal.Signals) -> None:
    srv = start_demo_server(tmp_path)
    out = tmp_path / "records.jsonl"
    log = tmp_path / "agent.log"
    try:
        with open(log, "w") as logf:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--pid", str(srv.pid), "--jsonl", str(out),
                 "--prometheus-port", "0"],
                cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
        wait_for(lambda: "attached to 1 target" in log.read_text(), 30, what="agent attached")
        with httpx.Client(base_url=srv.url) as c:
            for _ in range(3):
                c.get("/health")
            c.post("/v1/chat/completions", json={"model": "cli", "messages": [], "stream": True, "max_tokens": 2})
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 4, 10)
        agent.send_signal(sig)
        assert agent.wait(20) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == 4
        for row in rows:
            assert set(RECORD_KEYS) <= set(row)
        assert rows[-1]["gen_ai.request.model"] == "cli" and rows[-1]["streaming"] is True
    finally:
        srv.stop()


def test_non_http_bytes_are_counted_and_ignored(agent: Agent, demo: Server) -> None:
    import socket as so

    before = agent.pipeline.probe.counters()["foreign"]  # type: ignore[union-attr]
    mark = agent.mark()
    # a TLS ClientHello and raw binary on the plain-HTTP port: the server answers 400 or closes
    for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), bytes(range(256))):
        with so.create_connection(("127.0.0.1", demo.port), timeout=5) as s:
            s.sendall(payload)
            try:
                s.recv(4096)
            except OSError:
                pass
    httpx.get(demo.url + "/after-garbage")
    recs = agent.wait_records(mark, 1, pred=lambda r: r.path == "/after-garbage")
    assert recs[0].status_code == 404
    wait_for(lambda: agent.pipeline.probe.counters()["foreign"] >= before + 2, 5)  # type: ignore[union-attr]
    time.sleep(0.3)
    assert [r.path for r in agent.since(mark)] == ["/after-garbage"]


def test_uvicorn_worker_children_are_traced(tmp_path: Path) -> None:
    """uvicorn --workers: the supervisor is the target; its workers serve. Those
    alive at attach time are traced, and so are those it spawns afterwards."""
    port = free_port()
    srv = start_server([sys.executable, "-m", "uvicorn", "--factory", "agent.demo_server:make_app", "--port",
                        str(port), "--workers", "2", "--log-level", "warning"], port, tmp_path, "workers")
    try:
        with running_agent(TargetConfig(pids=(srv.pid,))) as a:
            mark = a.mark()
            with httpx.Client(base_url=srv.url) as c:
                for _ in range(6):
                    c.get("/health", headers={"connection": "close"})
            recs = a.wait_records(mark, 6)
            first = {r.pid for r in recs}
            assert srv.pid not in first, "the supervisor does not serve"
            assert first <= a.pipeline.targets
            # SIGHUP: uvicorn replaces every worker with a newly spawned one
            srv.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: not (first & set(procfs.descendants({srv.pid}))), 20, what="workers replaced")
            wait_for(lambda: len(procfs.descendants({srv.pid})) >= 2, 20, what="new workers")
            mark = a.mark()
            with httpx.Client(base_url=srv.url) as c:
                wait_for(lambda: c.get("/health").status_code == 200, 20)
                for _ in range(6):
                    c.get("/after-sighup", headers={"connection": "close"})
            recs = a.wait_records(mark, 6, pred=lambda r: r.path == "/after-sighup")
            second = {r.pid for r in recs}
            assert not (second & first) and srv.pid not in second
            assert second <= a.pipeline.targets
    finally:
        srv.stop()


def test_demo_prints_a_record_for_every_request_its_clients_made() -> None:
    """`infersight demo`, the newcomer's first command: its server, clients and agent, whose
    records account for every request the clients completed, chat and Responses streams
    alike with their TTFT."""
    out = subprocess.run([str(REPO / ".venv" / "bin" / "infersight"), "demo", "--seconds", "4",
                          "--concurrency", "3"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    m = re.search(r"accounted\s+(\d+) records \+ (\d+) counted losses \(clients completed (\d+)\)", out.stdout)
    assert m, out.stdout
    records, lost, completed = map(int, m.groups())
    assert completed > 10 and records == completed and lost == 0, m.group(0)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("   200 ")]
    assert len(rows) == records, out.stdout
    streamed = {path: [r for r in rows if r[1] == path and r[3] == "yes" and "aborted" not in r]
                for path in ("/v1/chat/completions", "/v1/responses")}
    for path, got in streamed.items():
        assert got, (path, out.stdout)
        assert all(r[5] != "-" for r in got), (path, got)  # TTFT measured for every whole stream
    assert re.search(r"by path\s+/v1/chat/completions \d+, /v1/responses \d+", out.stdout), out.stdout


def test_cli_duration_exits_cleanly(tmp_path: Path) -> None:
    srv = start_demo_server(tmp_path)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--pid", str(srv.pid), "--duration", "3",
                            "--prometheus-port", "0", "--jsonl", str(tmp_path / "out.jsonl")],
                           cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 30
        assert "stopped:" in r.stderr
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def raw(tmp_module: Path) -> Iterator[Server]:
    port = free_port()
    srv = start_server([sys.executable, "-m", "tests.servers.raw_http", str(port)], port, tmp_module, "raw")
    yield srv
    srv.stop()


@pytest.mark.parametrize("exit_args", ARG_MODES)
def test_vectored_syscalls_and_sendfile(raw: Server, exit_args: bool) -> None:
    """accept, recvmsg, sendmsg over several iovecs, and sendfile: the same records, the same
    timing, with the syscalls' arguments read at exit or saved at entry. The connections are
    made after the agent attached, so only accept's programs can have told them (accept4's
    exit runs the same program, and every other server here uses accept4). The server was
    already blocked in accept when the agent attached: that first connection counts, and where
    the arguments are read at exit its peer address is read from the saved registers (saved at
    entry, the entry never ran: only where /proc still shows the socket when its record is
    made); the next accept is seen whole."""
    with running_agent(TargetConfig(pids=(raw.pid,)), probe=arg_mode(exit_args)) as a:
        assert a.pipeline.probe.exit_args is exit_args  # type: ignore[union-attr]
        mark = a.mark()
        with httpx.Client(base_url=raw.url, timeout=30) as c:  # a connection of its own
            resp = c.get("/health")
            assert resp.text == "ok"
            first_port = resp.extensions["network_stream"].get_extra_info("client_addr")[1]
        (health,) = a.wait_records(mark, 1)
        assert health.path == "/health" and health.status_code == 200 and health.server_port == raw.port
        if exit_args:
            assert (health.client_address, health.client_port) == ("127.0.0.1", first_port)
        mark = a.mark()
        t_mark = len(raw.timings())
        with httpx.Client(base_url=raw.url, timeout=30) as c:
            resp = c.post("/v1/chat/completions", json={"model": "vec", "max_tokens": 9, "tpot_s": 0.003})
            stream = resp.extensions["network_stream"]
            client_port = stream.get_extra_info("client_addr")[1]
            chunks = [line for line in resp.text.splitlines() if line.startswith("data:")]
            assert len(chunks) == 10
            body = c.get("/file").content
            assert len(body) == 300_000
            # the response parser skipped the file's bytes it never saw, and stays in step
            assert c.get("/after-file").text == "ok"
        recs = a.wait_records(mark, 3)
        time.sleep(0.3)
        assert [r.path for r in a.since(mark)] == ["/v1/chat/completions", "/file", "/after-file"]
        sse, file_rec, after = recs
        # the peer address accept(2) wrote, read by its exit program
        assert {(r.client_address, r.client_port) for r in recs} == {("127.0.0.1", client_port)}
        server = raw.timings()[t_mark:]
        ttft, _, duration = _stream_timings(server[0])
        assert sse.streaming and sse.output_events == 9 and sse.response_model == "vec"
        assert sse.time_to_first_token_s is not None and abs(sse.time_to_first_token_s - ttft) <= TOL
        assert abs(sse.duration_s - duration) <= TOL
        assert file_rec.status_code == 200 and not file_rec.streaming and file_rec.error_type is None
        assert abs(file_rec.duration_s - (server[1]["t_end"] - server[1]["t_start"]) / 1e9) <= TOL
        assert after.status_code == 200 and after.error_type is None


@pytest.mark.parametrize("end", ["split", "after-crlf"])
def test_a_chunked_end_written_in_two_writes(raw: Server, end: str) -> None:
    """The last chunk's "0\\r\\n" line in one write (alone, or after the previous chunk) and its
    CRLF alone in the next, as llama.cpp's server writes it: the response ends there, past the
    sampled writes, and a client that then closes did not abort it."""
    with running_agent(TargetConfig(pids=(raw.pid,))) as a:
        mark = a.mark()
        t_mark = len(raw.timings())
        with httpx.Client(base_url=raw.url, timeout=30, headers={"connection": "close"}) as c:
            text = c.post("/v1/chat/completions", json={"model": "split", "max_tokens": 12, "tpot_s": 0.002,
                                                        "end": end}).text
        assert text.count("data:") == 13 and text.rstrip().endswith("[DONE]")
        (rec,) = a.wait_records(mark, 1)
        (entry,) = raw.timings()[t_mark:]
        ttft, _, duration = _stream_timings(entry)
        assert rec.streaming and rec.output_events == 12 and rec.response_model == "split"
        assert not rec.aborted and rec.error_type is None
        assert rec.time_to_first_token_s is not None and abs(rec.time_to_first_token_s - ttft) <= TOL
        assert abs(rec.duration_s - duration) <= TOL


@pytest.mark.parametrize(("tokens", "counted"), [(24, 24), (22, 22), (60, 36), (24, None)],
                         ids=["24", "22", "60", "24-iovecs"])
def test_events_a_server_writes_together(raw: Server, tokens: int, counted: int | None) -> None:
    """A server whose socket backed up writes the events it queued in one write; here three
    chunks per write. The record counts each event in the writes the agent reads: the sampled
    writes (the head and two more) and the last eight. With 24 tokens the last output write
    holds three events; with 22 one, after writes of three (read by the C walk where built).
    With 60, the twelve writes between those the agent reads count one event each: 36 of 60.
    Sent as nine iovecs (Python 3.12's asyncio sends its queue so), the last with [DONE] and
    the last chunk (13 iovecs), to a client that then closes: the probe reads the bytes of four
    iovecs, the first four for a sampled write and the last four (found by the lengths of the
    others) for a later one. The response ends at its last chunk, not aborted (before the
    lengths were read, a write's end was looked for in its fourth iovec, and the record said
    aborted), and each write counts one event at most (README, Known gaps). TTFT and the time
    per output token hold to the server's times."""
    joined = counted is not None
    with running_agent(TargetConfig(pids=(raw.pid,))) as a:
        mark = a.mark()
        t_mark = len(raw.timings())
        with httpx.Client(base_url=raw.url, timeout=30, headers={} if joined else {"connection": "close"}) as c:
            text = c.post("/v1/chat/completions", json={
                "model": "grouped", "max_tokens": tokens, "tpot_s": 0.002, "group": 3, "joined": joined,
                "end": None if joined else "with-last"}).text
        assert text.count("data:") == tokens + 1
        (rec,) = a.wait_records(mark, 1)
        (entry,) = raw.timings()[t_mark:]
        ttft, _, duration = _stream_timings(entry)
        assert rec.streaming and rec.response_model == "grouped" and rec.error_type is None and not rec.aborted
        assert rec.time_to_first_token_s is not None and abs(rec.time_to_first_token_s - ttft) <= TOL
        assert abs(rec.duration_s - duration) <= TOL
        if counted is None:
            # one per write at most, less the last's tokens (its last four iovecs hold [DONE] and
            # the last chunk) and the second sampled write's (read after the first's unread
            # iovecs, it may open mid-event)
            assert rec.output_events is not None and tokens // 3 - 2 <= rec.output_events <= tokens // 3
            return
        assert rec.output_events == counted
        # the first and the last output write, as the server timed them
        firsts = [t for kind, t in entry["chunks"] if kind == "token"][::3]
        span = (firsts[-1] - firsts[0]) / 1e9
        assert rec.time_per_output_token_s is not None
        assert abs(rec.time_per_output_token_s * (counted - 1) - span) <= TOL


def test_a_vectored_write_past_the_scanned_iovecs_is_counted(raw: Server) -> None:
    """A write of 66 iovecs (22 chunks): where its data ends lies past the 64 whose lengths the
    probe reads, so it keeps no tail, and says so in a kernel counter; the response around it is
    recorded whole (its [DONE] and last chunk come in writes of their own)."""
    with running_agent(TargetConfig(pids=(raw.pid,))) as a:
        probe = a.pipeline.probe
        assert probe is not None
        before = probe.counters()["iov_end_unread"]
        mark = a.mark()
        with httpx.Client(base_url=raw.url, timeout=30) as c:
            text = c.post("/v1/chat/completions", json={"model": "wide", "max_tokens": 22, "tpot_s": 0.002,
                                                        "group": 22, "joined": False}).text
        assert text.count("data:") == 23
        (rec,) = a.wait_records(mark, 1)
        assert rec.streaming and rec.response_model == "wide" and not rec.aborted and rec.error_type is None
        assert probe.counters()["iov_end_unread"] == before + 1
        assert rec.output_events is not None and 1 <= rec.output_events <= 22


@pytest.mark.parametrize("lead", [2, 3])
def test_a_stream_opening_with_events_without_output(raw: Server, lead: int) -> None:
    """Servers open a stream with a role event, some with an empty delta after it: the first
    token then comes after the probe's sampled writes. The summary keeps the write just past
    them: with two such events the first token is that write, and TTFT is its time, far past
    the tail ring; with three it is not kept, and TTFT is null and counted unresolved, never a
    guess. Either way the output events are counted."""
    sampled = SocketProbeConfig().sample_writes
    assert sampled == 3  # the head, two events without output, then the kept write
    with running_agent(TargetConfig(pids=(raw.pid,))) as a:
        mark = a.mark()
        t_mark = len(raw.timings())
        unresolved = a.metrics.total("infersight.assembly.ttft.unresolved")
        with httpx.Client(base_url=raw.url, timeout=30) as c:
            text = c.post("/v1/chat/completions", json={
                "model": "lead", "max_tokens": 30, "lead": lead, "tpot_s": 0.002}).text
        assert text.count("data:") == lead + 30 + 1
        (rec,) = a.wait_records(mark, 1)
        (entry,) = raw.timings()[t_mark:]
        ttft, tpot, duration = _stream_timings(entry)
        assert rec.streaming and rec.output_events == 30 and rec.response_model == "lead"
        assert abs(rec.duration_s - duration) <= TOL
        if lead == 2:
            assert rec.time_to_first_token_s is not None and abs(rec.time_to_first_token_s - ttft) <= TOL
            assert rec.time_per_output_token_s is not None and abs(rec.time_per_output_token_s - tpot) <= TOL
            assert a.metrics.total("infersight.assembly.ttft.unresolved") == unresolved
        else:
            assert rec.time_to_first_token_s is None and rec.time_per_output_token_s is None
            assert a.metrics.total("infersight.assembly.ttft.unresolved") == unresolved + 1


def test_client_spans_for_requests_a_target_makes(demo: Server, tmp_path: Path) -> None:
    """With client tracing on, a traced process's outgoing requests become client records."""
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, httpx\n"
        "sys.stdin.readline()  # the agent is attached\n"
        "with httpx.Client(base_url=sys.argv[1]) as c:\n"
        "    for _ in range(3):\n"
        "        c.get('/health')\n"
        "    c.post('/v1/chat/completions', json={'model': 'outbound', 'messages': [], 'stream': True,\n"
        "           'max_tokens': 3}).read()\n"
    )
    client = subprocess.Popen([sys.executable, str(script), demo.url], cwd=REPO, stdin=subprocess.PIPE)
    try:
        probe = SocketProbeConfig(trace_clients=True)
        with running_agent(TargetConfig(pids=(client.pid,)), probe=probe, client_spans=True) as a:
            mark = a.mark()
            assert client.stdin is not None
            client.stdin.write(b"go\n")
            client.stdin.close()
            assert client.wait(30) == 0
            recs = a.wait_records(mark, 4, pred=lambda r: r.pid == client.pid)
        assert all(r.span_kind == "client" for r in recs)
        assert [r.path for r in recs] == ["/health"] * 3 + ["/v1/chat/completions"]
        assert recs[-1].request_model == "outbound" and recs[-1].output_events == 3
        assert recs[0].server_port == demo.port
    finally:
        if client.poll() is None:
            client.kill()


def test_connection_map_evictions_are_counted(tmp_path: Path) -> None:
    """More open connections than the LRU map holds: the evictions show in a metric."""
    import socket as so

    srv = start_demo_server(tmp_path)
    socks: list[so.socket] = []
    try:
        with running_agent(TargetConfig(pids=(srv.pid,)), probe=SocketProbeConfig(max_conns=16)) as a:
            for _ in range(48):
                s = so.create_connection(("127.0.0.1", srv.port), timeout=5)
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                assert b"200 OK" in s.recv(4096)
                socks.append(s)
            a.pipeline._read_map_fill()
            entries = a.metrics.get("infersight.bpf.map.entries", (("map", "conns"),))
            evicted = a.metrics.get("infersight.bpf.map.evictions", (("map", "conns"),))
        assert entries <= 16
        assert evicted >= 48 - 16
        assert evicted == 48 - entries
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_dying_target_ends_its_requests_and_nothing_else(tmp_path: Path) -> None:
    """A server killed mid-stream: its open request is recorded as cut short by the
    process's exit, and the agent goes on tracing the other server."""
    victim = start_demo_server(tmp_path)
    other = start_demo_server(tmp_path)
    try:
        with running_agent(TargetConfig(pids=(victim.pid, other.pid))) as a:
            mark = a.mark()
            body = {"model": "doomed", "messages": [], "stream": True, "max_tokens": 500, "ttft_s": 0.01,
                    "tpot_s": 0.02}
            with httpx.Client(base_url=victim.url, timeout=30) as c:
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        for i, _ in enumerate(r.iter_lines()):
                            if i == 10:
                                victim.proc.send_signal(signal.SIGKILL)
                except httpx.HTTPError:
                    pass
            (rec,) = a.wait_records(mark, 1, pred=lambda r: r.request_model == "doomed")
            assert rec.status_code == 200 and rec.error_type == "process_exit"
            assert not rec.aborted
            wait_for(lambda: victim.pid not in a.pipeline.targets, 10, what="dead target dropped")
            mark = a.mark()
            httpx.get(other.url + "/still-here")
            (after,) = a.wait_records(mark, 1, pred=lambda r: r.path == "/still-here")
            assert after.pid == other.pid
    finally:
        victim.stop()
        other.stop()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throw-away key and self-signed certificate for localhost."""
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-subj", "/CN=localhost", "-days", "1"], check=True, capture_output=True)
    return key, cert


def https_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", verify=False, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("exit_args", ARG_MODES)
def test_https_plaintext_through_openssl_uprobes(tmp_path: Path, exit_args: bool) -> None:
    """uvicorn serving HTTPS (self-signed): with TLS capture on, the same records as plain HTTP.
    The SSL object is tied to its socket through the thread's last socket syscall, which the
    probe notes at that syscall's exit or entry (both ways). The uprobes' data path is a module
    of its own, loaded after the attach: the hooks asked for at the attach are placed then."""
    tls_cfg = dataclasses.replace(arg_mode(exit_args), tls=True)
    key, cert = self_signed(tmp_path)
    port = free_port()
    timings = tmp_path / "tls-timings.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.demo_server", "--port", str(port), "--loop", "uvloop",
         "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
        cwd=REPO, env=dict(os.environ, INFERSIGHT_DEMO_TIMINGS=str(timings), PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv = Server(proc, port, timings)
    url = f"https://127.0.0.1:{port}"

    try:
        wait_for(lambda: https_up(url), 20, what="HTTPS demo server")
        with running_agent(TargetConfig(pids=(proc.pid,)), probe=tls_cfg) as a:
            assert a.pipeline._tls_state.get(proc.pid) == "hooked"
            probe = a.pipeline.probe
            assert probe.tls_ready.is_set() and probe.tlsbpf is not None  # type: ignore[union-attr]
            assert b"data_exit_uprobe" not in probe.bpf.funcs  # type: ignore[union-attr]
            assert b"data_exit_uprobe" in probe.tlsbpf.funcs  # type: ignore[union-attr]
            assert a.metrics.get("infersight.tls.libraries.hooked") >= 1
            states = {dict(x.labels)["state"]: x.value for x in a.metrics.snapshot() if x.name == "infersight.tls.targets"}
            assert states == {"hooked": 1, "unhooked": 0, "none": 0}
            mark = a.mark()
            t_mark = len(srv.timings())
            with httpx.Client(verify=False) as http:
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
                chunks = list(client.chat.completions.create(
                    model="tls-model", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=7,
                    stream_options={"include_usage": True}, extra_body={"ttft_s": 0.03, "tpot_s": 0.003}))
                assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 7
                resp = client.chat.completions.create(model="tls-json", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=3)
                assert resp.usage is not None
                for _ in range(3):
                    assert http.get(url + "/health").status_code == 200
            recs = a.wait_records(mark, 5)
            time.sleep(0.3)
            assert len(a.since(mark)) == 5
        stream, plain = recs[0], recs[1]
        assert stream.streaming and stream.output_events == 7 and stream.output_tokens == 7
        assert stream.request_model == stream.response_model == "tls-model"
        assert stream.finish_reasons == ("length",)
        ttft, _, duration = _stream_timings(srv.timings()[t_mark])
        assert stream.time_to_first_token_s is not None
        assert abs(stream.time_to_first_token_s - ttft) <= TOL, (stream.time_to_first_token_s, ttft)
        assert abs(stream.duration_s - duration) <= TOL
        assert plain.request_model == "tls-json" and plain.output_tokens == 3 and not plain.streaming
        assert [r.path for r in recs[2:]] == ["/health"] * 3 and all(r.status_code == 200 for r in recs)

        # TLS capture off: the handshakes on the wire still tell that this target
        # serves TLS the agent does not decrypt
        with running_agent(TargetConfig(pids=(proc.pid,)), probe=SocketProbeConfig(tls=False)) as a:
            mark = a.mark()

            def tls_states() -> dict[str, float]:
                return {dict(x.labels)["state"]: x.value for x in a.metrics.snapshot()
                        if x.name == "infersight.tls.targets"}

            assert tls_states() == {"hooked": 0, "unhooked": 0, "none": 1}
            with httpx.Client(verify=False) as http:
                assert http.get(url + "/health").status_code == 200
            wait_for(lambda: tls_states() == {"hooked": 0, "unhooked": 1, "none": 0}, 5, what="TLS seen on the wire")
            per_target = [dict(x.labels) for x in a.metrics.snapshot() if x.name == "infersight.target.tls"]
            assert per_target == [{"pid": str(proc.pid), "command": "python", "state": "unhooked"}]
            assert a.since(mark) == []
    finally:
        srv.stop()


def test_http2_inside_tls(tmp_path: Path) -> None:
    """hypercorn serving HTTP/2 over TLS (ALPN h2): the TLS uprobes hand the
    plaintext to the kernel's HTTP/2 walk, one record per stream."""
    key, cert = self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.servers.h2_tls", str(port), str(cert), str(key)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"

    try:
        wait_for(lambda: https_up(url), 20, what="HTTP/2 TLS server")
        with running_agent(TargetConfig(pids=(proc.pid,)), probe=SocketProbeConfig(tls=True)) as a:
            assert a.pipeline._tls_state.get(proc.pid) == "hooked"
            mark = a.mark()
            with httpx.Client(http2=True, verify=False) as http:
                for i in range(3):
                    r = http.get(url + f"/health?i={i}")
                    assert r.status_code == 200 and r.http_version == "HTTP/2"
                r = http.post(url + "/v1/chat/completions",
                              json={"model": "h2-model", "messages": [], "max_tokens": 3})
                assert r.status_code == 200 and r.http_version == "HTTP/2"
            recs = a.wait_records(mark, 4)
            time.sleep(0.3)
            assert len(a.since(mark)) == 4
            wait_for(lambda: a.metrics.get("infersight.kernel.h2.connections") >= 1, 5, what="kernel counters")
    finally:
        proc.terminate()
        proc.wait(10)
    assert [(r.method, r.path, r.status_code) for r in recs] == (
        [("GET", f"/health?i={i}", 200) for i in range(3)] + [("POST", "/v1/chat/completions", 200)])
    assert all(r.pid == proc.pid and r.duration_s > 0 and "rpc.system" not in r.attributes for r in recs)
