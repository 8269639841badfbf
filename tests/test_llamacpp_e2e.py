"""A real inference engine under the agent: llama.cpp, through llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server``), decoding a tiny random model on
the CPU (tests/servers/tiny_gguf.py). Nothing in it is the project's: the engine, its
server, its SSE framing (sse-starlette) and its token-by-token stream are as users run them.

The agent finds it by itself (no --pid: llama_cpp.server is a known server), and its records
are held to what the official ``openai`` client saw: the model, the token counts the engine
reported, the stream's chunks, and timings bracketed by the client's own clock (the server
keeps no per-write times, so the check is that the agent's instants fall between the
client's send and the bytes' arrival)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from agent.targets import TargetConfig
from tests.harness import Agent, free_port, running_agent, wait_for
from tests.servers.tiny_gguf import write_model

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

ALIAS = "tiny-llama"
SLACK_NS = 1_000_000  # the agent's clock against the client's (both CLOCK_REALTIME, through ktime)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is in the test extras")
    tmp = tmp_path_factory.mktemp("llamacpp")
    model = write_model(tmp / "tiny.gguf")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--verbose", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("llama_cpp.server exited: " + (proc.stderr.read().decode() if proc.stderr else ""))
        try:
            return httpx.get(url + "/v1/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, 0.2, "llama_cpp.server")
    yield proc, url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def agent(engine: tuple[subprocess.Popen[bytes], str]) -> Iterator[Agent]:
    with running_agent(TargetConfig()) as a:  # discovery: no pid, port or name given
        yield a


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _of(pid: int):  # type: ignore[no-untyped-def]
    return lambda r: r.pid == pid


@pytest.mark.parametrize("max_tokens", [1, 24])
def test_a_streamed_chat_completion(agent: Agent, engine: tuple[subprocess.Popen[bytes], str],
                                    max_tokens: int) -> None:
    proc, url = engine
    mark = agent.mark()
    client = _client(url)
    t_send = time.time_ns()
    stream = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Say something."}], stream=True,
        max_tokens=max_tokens, temperature=0.0)
    content: list[str] = []
    finish = []
    t_first = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                if t_first is None:
                    t_first = time.time_ns()
                content.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    t_end = time.time_ns()
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert t_first is not None and len(content) == max_tokens and finish == ["length"]
    assert rec.path == "/v1/chat/completions" and rec.method == "POST" and rec.status_code == 200
    assert rec.streaming and rec.request_model == ALIAS and rec.response_model == ALIAS
    assert rec.operation == "chat" and rec.finish_reasons == ("length",) and not rec.aborted
    # one output event per token the engine streamed; its role chunk and its finish chunk are not output
    assert rec.output_events == max_tokens
    # the agent's instants lie between the client's send and the bytes' arrival
    assert t_send - SLACK_NS <= rec.start_time_unix_nano
    assert rec.first_token_time_unix_nano is not None
    assert rec.start_time_unix_nano < rec.first_token_time_unix_nano <= t_first + SLACK_NS
    assert rec.end_time_unix_nano <= t_end + SLACK_NS
    assert rec.time_to_first_token_s == pytest.approx(
        (rec.first_token_time_unix_nano - rec.start_time_unix_nano) / 1e9, abs=1e-6)
    if max_tokens > 1:
        assert rec.time_per_output_token_s is not None and 0 < rec.time_per_output_token_s < rec.duration_s
    else:
        assert rec.time_per_output_token_s is None


def test_a_completion_and_its_usage(agent: Agent, engine: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = engine
    mark = agent.mark()
    resp = _client(url).completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=7, temperature=0.0)
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    assert rec.path == "/v1/completions" and rec.status_code == 200 and not rec.streaming
    assert rec.request_model == ALIAS and rec.response_model == resp.model == ALIAS
    # the engine's own counts: its tokenizer, not the agent's guess
    assert (rec.input_tokens, rec.output_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert rec.finish_reasons == (resp.choices[0].finish_reason,) == ("length",)
    assert rec.time_to_first_token_s is None  # a whole response: no stream, no first token


def test_the_engine_serves_nothing_to_the_agent_but_metadata(agent: Agent,
                                                             engine: tuple[subprocess.Popen[bytes], str]) -> None:
    """The prompt and the text the model wrote appear nowhere in the record as it is written out."""
    proc, url = engine
    mark = agent.mark()
    secret = "zebra-quartz-umbrella"
    resp = _client(url).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": secret}], max_tokens=16, temperature=0.0)
    text = resp.choices[0].message.content or ""
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert len(text) >= 8
    line = rec.to_json()
    assert ALIAS in line and secret not in line
    assert text not in line and json.dumps(text)[1:-1] not in line
    assert (rec.input_tokens, rec.output_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)  # type: ignore[union-attr]


def test_a_client_that_gives_up(agent: Agent, engine: tuple[subprocess.Popen[bytes], str]) -> None:
    """The client reads three tokens of a long stream and closes: the engine's record says it
    was aborted, with the tokens written before the engine noticed, and no finish reason."""
    proc, url = engine
    mark = agent.mark()
    read = 0
    with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions", json={
            "model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
            "max_tokens": 400, "temperature": 0.0}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                read += 1
                if read == 3:
                    break
    (rec,) = agent.wait_records(mark, 1, timeout=20, pred=_of(proc.pid))
    assert rec.aborted and rec.streaming and rec.status_code == 200
    assert rec.output_events is not None and 3 <= rec.output_events < 400
    assert not rec.finish_reasons
