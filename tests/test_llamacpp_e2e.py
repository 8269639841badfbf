"""A real inference engine under the agent: llama.cpp's own server (``llama-server``, C++,
cpp-httplib), decoding a tiny random model on the CPU (tests/servers/tiny_gguf.py). Nothing
in it is the project's: the engine, its HTTP stack, its way of writing a stream (several
events to a chunk at times, the last chunk's "0\\r\\n" and its CRLF in two writes) are as
users run them. scripts/setup.sh builds it from the llama.cpp that llama-cpp-python's
source distribution carries.

The agent finds it by itself (no --pid: llama-server is a known server). Its records are
held to what the official ``openai`` client saw (the model, the tokens streamed, the usage
the engine reported) and to the engine's own clock: the ``timings`` it reports with a
stream's end (its prompt's evaluation, and its decoding from the first token to the last)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent.targets import TargetConfig
from tests.harness import Agent, free_port, running_agent, wait_for
from tests.servers.tiny_gguf import write_model

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

LLAMA_SERVER = Path(sys.executable).parent / "llama-server"  # scripts/setup.sh puts it beside the venv's python
ALIAS = "tiny-llama"
SLACK_NS = 1_000_000  # the agent's clock against the client's (both CLOCK_REALTIME, the agent's through ktime)
# The engine stamps its decoding, not its writes: the HTTP thread it hands each token to
# writes it a little later, at both ends of the span compared.
ENGINE_TOL_S = 0.005

Engine = tuple[subprocess.Popen[bytes], str]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if not LLAMA_SERVER.exists():
        pytest.skip(f"{LLAMA_SERVER} not built (scripts/setup.sh builds it)")
    tmp = tmp_path_factory.mktemp("llamacpp")
    model = write_model(tmp / "tiny.gguf")
    port = free_port()
    log = open(tmp / "llama-server.log", "wb")  # it logs every request: a pipe nobody reads would fill
    proc = subprocess.Popen(
        [str(LLAMA_SERVER), "--model", str(model), "--alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
         "--ctx-size", "512", "--threads", "1", "--parallel", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("llama-server exited: " + (tmp / "llama-server.log").read_text()[-2000:])
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, 0.2, "llama-server")
    yield proc, url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def agent(engine: Engine) -> Iterator[Agent]:
    with running_agent(TargetConfig()) as a:  # discovery: no pid, port or name given
        yield a


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _of(pid: int):  # type: ignore[no-untyped-def]
    return lambda r: r.pid == pid


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "include-usage"])
@pytest.mark.parametrize("max_tokens", [1, 2, 40])
def test_a_streamed_chat_completion(agent: Agent, engine: Engine, max_tokens: int, usage: bool) -> None:
    proc, url = engine
    mark = agent.mark()
    t_send = time.time_ns()
    stream = _client(url).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": f"Say {max_tokens} things."}], stream=True,
        max_tokens=max_tokens, temperature=0.0, stream_options={"include_usage": True} if usage else openai.NOT_GIVEN)
    content: list[str] = []
    finish = []
    timings: dict[str, Any] = {}
    counts = None
    t_first = None
    for chunk in stream:
        if chunk.usage is not None:
            counts = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.delta.content:
                if t_first is None:
                    t_first = time.time_ns()
                content.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
        timings = (chunk.model_extra or {}).get("timings") or timings
    t_end = time.time_ns()
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert t_first is not None and len(content) == max_tokens and finish == ["length"]
    assert rec.command == "llama-server" and rec.server_port == int(url.rsplit(":", 1)[1])
    assert rec.path == "/v1/chat/completions" and rec.method == "POST" and rec.status_code == 200
    assert rec.streaming and rec.request_model == ALIAS and rec.response_model == ALIAS and rec.operation == "chat"
    # the stream ended as the engine ended it: not aborted, its finish reason read; the engine
    # streams usage only when asked, in the finish event's write, one event of over 512 bytes
    # with its timings, after the finish event (a long write, kept as its start and its end)
    assert not rec.aborted and rec.error_type is None
    assert rec.finish_reasons == ("length",)
    assert (counts is not None) == usage
    assert (rec.input_tokens, rec.output_tokens) == (counts or (None, None))
    # one output event per token streamed: the role event, the finish event (with the engine's
    # timings), [DONE] and the terminator's two writes are not output
    assert rec.output_events == max_tokens
    # the agent's instants lie between the client's send and the bytes' arrival
    assert rec.first_token_time_unix_nano is not None
    assert t_send - SLACK_NS <= rec.start_time_unix_nano < rec.first_token_time_unix_nano <= t_first + SLACK_NS
    assert rec.end_time_unix_nano <= t_end + SLACK_NS
    ttft = rec.time_to_first_token_s
    assert ttft == pytest.approx((rec.first_token_time_unix_nano - rec.start_time_unix_nano) / 1e9, abs=1e-6)
    # and the engine's own clock: its prompt's evaluation lies within the time to first token,
    # and its decoding from the first token to the last is the span the agent saw them written in
    assert timings["prompt_n"] >= 1 and ttft > timings["prompt_ms"] / 1e3
    if max_tokens > 1:
        assert rec.time_per_output_token_s is not None
        span = rec.time_per_output_token_s * (max_tokens - 1)
        assert span == pytest.approx(timings["predicted_ms"] / 1e3, abs=ENGINE_TOL_S), timings
    else:
        assert rec.time_per_output_token_s is None


def test_a_completion_and_its_usage(agent: Agent, engine: Engine) -> None:
    proc, url = engine
    mark = agent.mark()
    resp = _client(url).completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=7, temperature=0.0)
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    assert rec.path == "/v1/completions" and rec.status_code == 200 and not rec.streaming
    assert rec.request_model == ALIAS and rec.response_model == resp.model == ALIAS
    assert rec.operation == "text_completion"
    # the engine's own counts: its tokenizer, not a guess
    assert (rec.input_tokens, rec.output_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert rec.finish_reasons == (resp.choices[0].finish_reason,) == ("length",)
    assert rec.time_to_first_token_s is None and not rec.aborted


def test_a_client_that_gives_up(agent: Agent, engine: Engine) -> None:
    """The client reads three tokens of a long stream and closes: the record says it was
    aborted, with no finish reason."""
    proc, url = engine
    mark = agent.mark()
    read = 0
    with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions", json={
            "model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
            "max_tokens": 400, "temperature": 0.0}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line:
                read += 1
                if read == 3:
                    break
    (rec,) = agent.wait_records(mark, 1, timeout=20, pred=_of(proc.pid))
    assert rec.aborted and rec.streaming and rec.status_code == 200
    assert rec.output_events is not None and 3 <= rec.output_events < 400
    assert not rec.finish_reasons


def test_prompts_and_completions_stay_on_the_node(agent: Agent, engine: Engine) -> None:
    """The prompt and the text the model wrote appear nowhere in the record as it is written out."""
    proc, url = engine
    mark = agent.mark()
    secret = "zebra-quartz-umbrella"
    resp = _client(url).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": secret}], max_tokens=16, temperature=0.0)
    text = resp.choices[0].message.content or ""
    (rec,) = agent.wait_records(mark, 1, pred=_of(proc.pid))
    assert len(text) >= 8 and resp.usage is not None
    line = rec.to_json()
    assert ALIAS in line and secret not in line
    assert text not in line and json.dumps(text)[1:-1] not in line
    assert (rec.input_tokens, rec.output_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
