"""A real Triton Inference Server under the agent: NVIDIA's ``tritonserver`` (C++; its
HTTP/1.1 server on libevhtp, its gRPC server on grpc-core) as PyTriton's wheel on PyPI
bundles it, running a decoupled Python-backend model on the CPU (tests/servers/
triton_repo.py). scripts/setup.sh unpacks it. The HTTP stack, the gRPC stack, the way they
frame a stream (the generate extension's SSE in chunked encoding; ModelStreamInfer's
messages over HTTP/2) and their errors are Triton's own.

The agent finds it by itself (no --pid: tritonserver is a known server). Its records are
held to what the clients saw (httpx for HTTP, PyPI's ``tritonclient`` for gRPC) and to the
model's own clock: when ``execute`` took each request and when it handed Triton each
response, written by the model to a file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agent.record import Request
from agent.targets import TargetConfig
from tests.harness import Agent, LineClient, free_port, running_agent, stop_process, wait_for
from tests.servers.triton_repo import write_repository

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]

TRITON = Path(sys.executable).parent.parent / "opt" / "pytriton"  # scripts/setup.sh unpacks it there
SERVER = TRITON / "pytriton" / "tritonserver"
SLACK_NS = 1_000_000  # the agent's clock against a client's (both CLOCK_REALTIME, the agent's through ktime)
# The model stamps a response when it hands it to Triton; Triton's HTTP or gRPC thread writes
# it later, after the stub's IPC and the response callback, on a 2-core machine.
TOL_NS = 15_000_000
SERVICE = "inference.GRPCInferenceService"


class Triton:
    def __init__(self, tmp: Path) -> None:
        self.timings_path = tmp / "timings.jsonl"
        repo = write_repository(tmp / "models", TRITON / "python", self.timings_path)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = tmp / "tritonserver.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(SERVER / "bin" / "tritonserver"), "--model-repository", str(repo),
             "--backend-directory", str(SERVER / "backends"), "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--allow-metrics", "false", "--exit-timeout-secs", "2"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("tritonserver exited: " + self.log_path.read_text()[-3000:])
        try:
            return httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def timing(self, text: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            if self.timings_path.exists():
                for line in self.timings_path.read_text().splitlines():
                    t = json.loads(line)
                    if t["text"] == text:
                        return dict(t)
            return None
        return dict(wait_for(find, 10, what=f"the model's timings of {text!r}"))

    def stop(self) -> None:
        stop_process(self.proc, 15)  # it unloads its model and stops the backend's stub first
        self.log.close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    if not (SERVER / "bin" / "tritonserver").exists():
        pytest.skip(f"{SERVER} not unpacked (scripts/setup.sh unpacks it)")
    t = Triton(tmp_path_factory.mktemp("triton"))
    try:
        wait_for(t.ready, 60, 0.2, "tritonserver")
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def agent(triton: Triton) -> Iterator[Agent]:
    with running_agent(TargetConfig()) as a:  # discovery: no pid, port or name given
        yield a


def _of(pid: int):  # type: ignore[no-untyped-def]
    return lambda r: r.pid == pid and r.path != "/v2/health/ready"


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data:"):
            yield dict(json.loads(line[5:]))


@pytest.mark.parametrize("n", [1, 2, 24])
def test_a_streamed_generation(agent: Agent, triton: Triton, n: int) -> None:
    text = f"stream-{n}-{uuid.uuid4().hex[:8]}"
    mark = agent.mark()
    got: list[dict[str, Any]] = []
    t_first = None
    t_send = time.time_ns()
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.url}/v2/models/tiny/generate_stream", json={
            "text_input": text, "max_tokens": n, "interval_ms": 3}) as r:
        assert r.status_code == 200
        for ev in _events(r.iter_lines()):
            if t_first is None:
                t_first = time.time_ns()
            got.append(ev)
    t_end = time.time_ns()
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    model = triton.timing(text)
    assert [e["text_output"] for e in got] == [f"tok-{i}-zq " for i in range(n)]
    assert got[0]["model_name"] == "tiny" and len(model["sends"]) == n
    assert rec.command == "tritonserver" and rec.server_port == triton.http_port
    assert rec.method == "POST" and rec.path == "/v2/models/tiny/generate_stream" and rec.status_code == 200
    assert rec.streaming and rec.request_model == rec.response_model == "tiny"
    assert rec.operation == "generate_content"
    assert rec.output_events == n and not rec.aborted and rec.error_type is None
    assert rec.finish_reasons is None and (rec.input_tokens, rec.output_tokens) == (None, None)
    # the agent's instants against the client's and the model's: the request read before the
    # model took it, the first token written after the model handed it over and before the
    # client had it
    assert rec.first_token_time_unix_nano is not None and t_first is not None
    assert t_send - SLACK_NS <= rec.start_time_unix_nano < model["t_exec"]
    assert model["sends"][0] <= rec.first_token_time_unix_nano <= min(t_first + SLACK_NS, model["sends"][0] + TOL_NS)
    assert rec.end_time_unix_nano <= t_end + SLACK_NS
    if n > 1:
        # the span from the first token written to the last is the model's, 3 ms a token
        assert rec.time_per_output_token_s is not None
        span_ns = rec.time_per_output_token_s * (n - 1) * 1e9
        assert span_ns == pytest.approx(model["sends"][-1] - model["sends"][0], abs=TOL_NS)
    else:
        assert rec.time_per_output_token_s is None


def test_a_whole_generation(agent: Agent, triton: Triton) -> None:
    text = f"whole-{uuid.uuid4().hex[:8]}"
    mark = agent.mark()
    r = httpx.post(f"{triton.url}/v2/models/tiny/generate", json={"text_input": text, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["text_output"] == "tok-0-zq "
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    assert rec.path == "/v2/models/tiny/generate" and rec.status_code == 200 and not rec.streaming
    assert rec.request_model == rec.response_model == "tiny"
    assert rec.time_to_first_token_s is None and not rec.aborted and rec.error_type is None


def test_a_client_that_gives_up(agent: Agent, triton: Triton) -> None:
    """The client reads three tokens of a long stream and closes: the record says it was
    aborted, with what was written until then."""
    text = f"abort-{uuid.uuid4().hex[:8]}"
    mark = agent.mark()
    read = 0
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.url}/v2/models/tiny/generate_stream", json={
            "text_input": text, "max_tokens": 400, "interval_ms": 10}) as r:
        for _ in _events(r.iter_lines()):
            read += 1
            if read == 3:
                break
    (rec,) = agent.wait_records(mark, 1, timeout=20, pred=_of(triton.proc.pid))
    assert rec.aborted and rec.streaming and rec.status_code == 200
    # Triton cancels the request on the close: the model stops, and nothing it handed over
    # after that is counted
    sent = len(triton.timing(text)["sends"])
    assert rec.output_events is not None and 3 <= rec.output_events <= sent < 400
    assert not rec.finish_reasons


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
@pytest.mark.parametrize("elements", [4, 8192])
def test_a_kserve_infer_call(agent: Agent, triton: Triton, elements: int, encoding: str) -> None:
    """The KServe v2 REST ``infer`` call, JSON both ways (8192 elements: bodies of tens of KiB,
    over several reads and writes). Triton gzips its answer for a client that accepts it, as
    httpx and requests say they do by default; the model is read from it decompressed."""
    mark = agent.mark()
    r = httpx.post(f"{triton.url}/v2/models/echo/infer", timeout=30, headers={"accept-encoding": encoding}, json={
        "inputs": [{"name": "INPUT0", "shape": [elements], "datatype": "INT32", "data": list(range(elements))}]})
    assert r.status_code == 200 and r.headers.get("content-encoding", "identity") == encoding
    body = r.json()
    assert body["model_name"] == "echo" and body["outputs"][0]["data"][:3] == [0, 2, 4]
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    assert rec.path == "/v2/models/echo/infer" and rec.method == "POST" and rec.status_code == 200
    assert rec.request_model == rec.response_model == "echo" and not rec.streaming
    assert rec.time_to_first_token_s is None and not rec.aborted and rec.error_type is None


def test_an_error_before_the_first_token(agent: Agent, triton: Triton) -> None:
    """The model's first response is an error: Triton answers 400, its head written only then,
    with the error as the stream's one event."""
    mark = agent.mark()
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.url}/v2/models/tiny/generate_stream", json={
            "text_input": "fail"}) as r:
        events = list(_events(r.iter_lines()))
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    assert r.status_code == 400 and events == [{"error": "the model refused"}]
    assert rec.status_code == 400 and rec.streaming and rec.output_events == 0
    assert rec.time_to_first_token_s is None and rec.request_model == "tiny" and not rec.aborted


@pytest.mark.parametrize("n", [1, 12])
def test_an_error_after_tokens(agent: Agent, triton: Triton, n: int) -> None:
    """The model hands over n tokens, 2 ms apart, then an error: the status was 200, the error
    is the stream's last event, and the record is an error with the tokens before it counted
    (12: the error lies in the kernel's tail ring, past the sampled writes). Handed over back to
    back, Triton writes several events at once, and the writes between the samples and the
    ring are counted one output event each (README, Known gaps)."""
    mark = agent.mark()
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.url}/v2/models/tiny/generate_stream", json={
            "text_input": f"fail-after-{uuid.uuid4().hex[:8]}", "max_tokens": n, "interval_ms": 2}) as r:
        events = list(_events(r.iter_lines()))
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    assert r.status_code == 200 and len(events) == n + 1 and events[-1] == {"error": "the model refused"}
    assert rec.status_code == 200 and rec.streaming and rec.output_events == n and not rec.aborted
    assert rec.error_type == "response_error" and rec.to_dict()["error.type"] == "response_error"


def test_prompts_and_completions_stay_on_the_node(agent: Agent, triton: Triton) -> None:
    """The request's text and the model's output appear nowhere in the record as written out."""
    secret = f"zebra-quartz-{uuid.uuid4().hex[:8]}"
    mark = agent.mark()
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.url}/v2/models/tiny/generate_stream", json={
            "text_input": secret, "max_tokens": 4}) as r:
        body = r.read().decode()
    assert "tok-3-zq" in body
    (rec,) = agent.wait_records(mark, 1, pred=_of(triton.proc.pid))
    line = rec.to_json()
    assert rec.output_events == 4 and '"tiny"' in line
    assert secret not in line and "tok-" not in line and "-zq" not in line


# ---- gRPC: ModelStreamInfer and an error, through tritonclient ------------------------------

# tritonclient runs in its own process (as in tests/test_grpc_e2e.py): one HTTP/2 connection,
# commands on stdin, one JSON answer per line.
CLIENT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    import tritonclient.grpc as g

    c = g.InferenceServerClient(sys.argv[1])

    def inputs(text, n, interval_ms):
        out = []
        for name, dtype, value in (("text_input", "BYTES", np.array([text.encode()], dtype=np.object_)),
                                   ("max_tokens", "INT32", np.array([n], dtype=np.int32)),
                                   ("interval_ms", "INT32", np.array([interval_ms], dtype=np.int32))):
            i = g.InferInput(name, [1], dtype)
            i.set_data_from_numpy(value)
            out.append(i)
        return out

    for line in sys.stdin:
        cmd = json.loads(line)
        out = {}
        if cmd["op"] == "stream":
            got, cv = [], threading.Condition()
            def cb(result, error):
                with cv:
                    got.append(time.time_ns() if error is None else str(error))
                    cv.notify_all()
            c.start_stream(callback=cb)
            c.async_stream_infer("tiny", inputs(cmd["text"], cmd["n"], cmd["interval_ms"]))
            with cv:
                cv.wait_for(lambda: len(got) >= cmd["n"], timeout=30)
            c.stop_stream()
            out["responses"] = got
        elif cmd["op"] == "infer":
            try:
                c.infer("tiny", inputs(cmd["text"], 1, 0))
                out["status"] = "OK"
            except Exception as e:
                out["status"] = e.status()
        print(json.dumps(out), flush=True)
    """
)


def _rpc(r: Request) -> str | None:
    m = r.attributes.get("rpc.method")
    return None if m is None else str(m)


def test_grpc_stream_and_error(agent: Agent, triton: Triton) -> None:
    """Over Triton's gRPC server: a ModelStreamInfer stream of 12 responses, 3 ms apart, and
    a unary ModelInfer that Triton refuses (a decoupled model takes streams only)."""
    text = f"grpc-{uuid.uuid4().hex[:8]}"
    mark = agent.mark()
    client = LineClient(CLIENT, f"127.0.0.1:{triton.grpc_port}")
    try:
        t_send = time.time_ns()
        streamed = client.call(op="stream", text=text, n=12, interval_ms=3)["responses"]
        refused = client.call(op="infer", text="unary")["status"]
    finally:
        client.close()
    recs = agent.wait_records(mark, 2, pred=lambda r: r.pid == triton.proc.pid and _rpc(r) is not None)
    model = triton.timing(text)
    assert len(streamed) == 12 and all(isinstance(t, int) for t in streamed)
    by = {_rpc(r): r for r in recs}
    assert set(by) == {"ModelStreamInfer", "ModelInfer"}
    for r in recs:
        assert r.attributes["rpc.system"] == "grpc" and r.attributes["rpc.service"] == SERVICE
        assert r.path == f"/{SERVICE}/{_rpc(r)}" and r.status_code == 200
        assert r.server_port == triton.grpc_port and r.request_model == "tiny"

    s = by["ModelStreamInfer"]
    assert s.streaming and s.output_events == 12 and not s.aborted
    assert s.attributes["rpc.grpc.status_code"] == 0
    assert s.first_token_time_unix_nano is not None
    assert t_send - SLACK_NS <= s.start_time_unix_nano < model["t_exec"]
    assert model["sends"][0] <= s.first_token_time_unix_nano <= min(streamed[0] + SLACK_NS,
                                                                      model["sends"][0] + TOL_NS)
    assert s.time_per_output_token_s is not None
    assert s.time_per_output_token_s * 11 * 1e9 == pytest.approx(model["sends"][-1] - model["sends"][0], abs=TOL_NS)

    u = by["ModelInfer"]
    # the client's status, by name, is the one the record carries by number
    assert refused.startswith("StatusCode.") and refused != "StatusCode.OK"
    code = grpc.StatusCode[refused.removeprefix("StatusCode.")].value[0]
    assert u.attributes["rpc.grpc.status_code"] == code and not u.streaming
