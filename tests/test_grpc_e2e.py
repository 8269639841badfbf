"""gRPC end to end, with real eBPF: the KServe v2 test server (grpcio), driven
by PyPI's ``tritonclient[grpc]``, traced by the real pipeline.

The kernel cuts the HTTP/2 frames; user space sees header blocks, the first
DATA frame of each stream and direction, and per-stream totals. The records
must name the RPCs, models and gRPC statuses, count the stream's messages, and
time durations and the first streamed response against the server's own
monotonic stamps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.record import Request
from agent.targets import TargetConfig
from tests.harness import REPO, Agent, LineClient, running_agent, wait_for

pytestmark = pytest.mark.ebpf

SERVICE = "inference.GRPCInferenceService"
# The server stamps its handler's start and each response before gRPC takes it;
# the agent sees the syscalls around them, on another thread of a 2-core box.
TOL_S = 0.015

# The client half runs in its own process: tritonclient's generated protobuf
# modules and the server's cannot share one. It reads commands from stdin, one
# JSON per line, and answers each with one JSON line.
CLIENT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    import tritonclient.grpc as g

    c = g.InferenceServerClient(sys.argv[1])

    def inputs(n):
        i = g.InferInput("INPUT0", [1, n], "INT32")
        i.set_data_from_numpy(np.arange(n, dtype=np.int32).reshape(1, n))
        return [i]

    for line in sys.stdin:
        cmd = json.loads(line)
        out = {}
        if cmd["op"] == "live":
            out["live"] = c.is_server_live()
        elif cmd["op"] == "infer":
            try:
                r = c.infer(cmd["model"], inputs(cmd.get("elements", 16)), request_id=cmd["id"],
                            parameters={"delay_ms": cmd.get("delay_ms", 0)})
                out["shape"] = list(r.as_numpy("OUTPUT0").shape)
            except Exception as e:
                out["error"] = str(e)
        elif cmd["op"] == "stream":
            got, cv = [], threading.Condition()
            def cb(result, error):
                with cv:
                    got.append(time.monotonic_ns() if error is None else str(error))
                    cv.notify_all()
            c.start_stream(callback=cb)
            want = 0
            for r in cmd["requests"]:
                c.async_stream_infer(cmd["model"], inputs(8), request_id=r["id"],
                                     parameters={"responses": r["responses"],
                                                 "interval_ms": cmd["interval_ms"]})
                want += 1 if cmd.get("cancel") else r["responses"]
                with cv:
                    cv.wait_for(lambda: len(got) >= want, timeout=30)
            c.stop_stream(cancel_requests=bool(cmd.get("cancel")))
            out["responses"] = len(got)
        print(json.dumps(out), flush=True)
    """
)


class KServe:
    """The test server and one long-lived tritonclient (one HTTP/2 connection)."""

    def __init__(self, tmp: Path) -> None:
        self.timings_path = tmp / "kserve-timings.jsonl"
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.servers.kserve_grpc", "serve", "--port", "0",
             "--timings", str(self.timings_path)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])
        self.client: LineClient | None = None

    @property
    def pid(self) -> int:
        return self.server.pid

    def connect(self) -> None:
        self.client = LineClient(CLIENT, f"127.0.0.1:{self.port}")

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.client is not None
        return self.client.call(**cmd)

    def timings(self) -> list[dict[str, Any]]:
        if not self.timings_path.exists():
            return []
        return [json.loads(x) for x in self.timings_path.read_text().splitlines() if x.strip()]

    def close_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def stop(self) -> None:
        self.close_client()
        if self.server.poll() is None:
            assert self.server.stdin is not None
            self.server.stdin.close()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)


@pytest.fixture
def kserve(tmp_path: Path) -> Iterator[KServe]:
    k = KServe(tmp_path)
    yield k
    k.stop()


def rpc(r: Request) -> str | None:
    m = r.attributes.get("rpc.method")
    return None if m is None else str(m)


def metric(a: Agent, name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
    return a.metrics.get(name, labels)


def test_unary_and_streaming_rpcs_match_the_server(kserve: KServe) -> None:
    with running_agent(TargetConfig(pids=(kserve.pid,))) as a:
        kserve.connect()
        mark = a.mark()
        assert kserve.call(op="live") == {"live": True}
        assert kserve.call(op="infer", model="simple", id="u1", delay_ms=30) == {"shape": [1, 16]}
        # 32 KiB each way: a message over several DATA frames (and syscalls)
        assert kserve.call(op="infer", model="simple", id="big", elements=8192, delay_ms=5) == {"shape": [1, 8192]}
        assert "error" in kserve.call(op="infer", model="missing", id="nf")
        streamed = kserve.call(op="stream", model="simple_stream", interval_ms=15,
                               requests=[{"id": "s1", "responses": 12}, {"id": "s2", "responses": 8}])
        assert streamed == {"responses": 20}
        kserve.close_client()
        recs = a.wait_records(mark, 5)
        wait_for(lambda: len(kserve.timings()) >= 4, 10, what="server timings")
        wait_for(lambda: metric(a, "infersight.kernel.h2.frames", (("fate", "aggregated"),)) >= 19, 5,
                 what="kernel counters read")
        elided = metric(a, "infersight.kernel.h2.frames", (("fate", "aggregated"),))
    assert len(recs) == 5, [(rpc(r), r.request_model) for r in recs]
    by = {(rpc(r), r.request_model): r for r in recs}
    assert set(by) == {("ServerLive", None), ("ModelInfer", "simple"), ("ModelInfer", "missing"),
                       ("ModelStreamInfer", "simple_stream")} | {("ModelInfer", "simple")}
    for r in recs:
        assert r.attributes["rpc.system"] == "grpc"
        assert r.attributes["rpc.service"] == SERVICE
        assert r.method == "POST" and r.path == f"/{SERVICE}/{rpc(r)}"
        assert r.status_code == 200
        assert r.pid == kserve.pid
    unary = sorted((r for r in recs if rpc(r) == "ModelInfer" and r.request_model == "simple"),
                   key=lambda r: r.start_time_unix_nano)
    assert [r.attributes["rpc.grpc.status_code"] for r in unary] == [0, 0]
    assert by[("ModelInfer", "missing")].attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert by[("ServerLive", None)].attributes["rpc.grpc.status_code"] == 0
    assert all(not r.streaming for r in unary)
    assert unary[0].response_model == "simple"

    server = {(t["rpc"], t.get("id")): t for t in kserve.timings()}
    for r, key in ((unary[0], ("ModelInfer", "u1")), (unary[1], ("ModelInfer", "big"))):
        t = server[key]
        srv_s = (t["t_end"] - t["t_start"]) / 1e9
        # the agent's span holds the handler's: it starts before, ends after
        assert srv_s - 0.001 <= r.duration_s <= srv_s + TOL_S, (key, r.duration_s, srv_s)

    s = by[("ModelStreamInfer", "simple_stream")]
    (st,) = [t for t in kserve.timings() if t["rpc"] == "ModelStreamInfer"]
    assert s.streaming and s.output_events == 20 and not s.aborted
    assert s.attributes["rpc.grpc.status_code"] == 0
    first_send = st["requests"][0]["sends"][0]
    server_ttft = (first_send - st["t_start"]) / 1e9
    assert s.time_to_first_token_s is not None
    assert server_ttft - 0.001 <= s.time_to_first_token_s <= server_ttft + TOL_S, (s.time_to_first_token_s, server_ttft)
    # 19 gaps between 20 responses, 15 ms apart within each request
    assert s.time_per_output_token_s is not None and 0.010 < s.time_per_output_token_s < 0.030
    # the 20 responses' DATA frames never left the kernel but one
    assert elided >= 19


def test_cancelled_stream_is_an_abort(kserve: KServe) -> None:
    with running_agent(TargetConfig(pids=(kserve.pid,))) as a:
        kserve.connect()
        mark = a.mark()
        out = kserve.call(op="stream", model="simple_stream", interval_ms=40, cancel=True,
                          requests=[{"id": "c1", "responses": 50}])
        assert out["responses"] >= 1
        kserve.close_client()
        (r,) = a.wait_records(mark, 1, pred=lambda r: rpc(r) == "ModelStreamInfer")
    assert r.aborted
    assert r.request_model == "simple_stream"
    assert r.output_events is not None and 1 <= r.output_events < 50


def test_attach_mid_connection_degrades_without_crashing(kserve: KServe) -> None:
    """The connection and its HPACK tables predate the agent: the streams after
    the attach are still recorded, one each; what their header blocks cannot
    give (indexed from the unknown dynamic table) is missing and counted."""
    kserve.connect()
    for i in range(3):
        assert kserve.call(op="infer", model="simple", id=f"before{i}") == {"shape": [1, 16]}
    with running_agent(TargetConfig(pids=(kserve.pid,))) as a:
        mark = a.mark()
        for i in range(4):
            assert kserve.call(op="infer", model="simple", id=f"after{i}") == {"shape": [1, 16]}
        kserve.close_client()
        recs = a.wait_records(mark, 4)
        wait_for(lambda: metric(a, "infersight.kernel.h2.connections") >= 1, 5, what="kernel counters read")
        joined = metric(a, "infersight.kernel.h2.connections")
        hpack = metric(a, "infersight.parse.failures", (("reason", "hpack"),))
    assert len(recs) == 4
    assert joined == 1
    # grpc-core indexes :path and content-type in its dynamic table: the first
    # blocks after the join refer to entries from before it
    assert hpack >= 1
    for r in recs:
        assert r.pid == kserve.pid and r.duration_s > 0
        if r.path is None:
            # :path came from the table built before the join: no RPC name, and
            # so no message type to read a model from; nothing is guessed
            assert "rpc.method" not in r.attributes and r.request_model is None
        else:
            assert r.path == f"/{SERVICE}/ModelInfer" and r.request_model == "simple"
