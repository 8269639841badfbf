"""A KServe v2 / Triton ``GRPCInferenceService`` test server, and a recorder of
real HTTP/2 bytes between it and PyPI's ``tritonclient``.

The server (grpcio) implements ``ServerLive``, ``ServerReady``, ``ModelReady``,
unary ``ModelInfer`` (echoes its inputs as outputs after ``delay_ms``) and
bidirectional ``ModelStreamInfer`` (for each request, ``responses`` responses
``interval_ms`` apart; both are request parameters). A model named ``missing``
is answered with ``NOT_FOUND``. When ``--timings`` names a file, every RPC
appends one JSON line with the server's own monotonic timestamps: ``t_start``,
``sends`` (stamped right before each response is handed to gRPC) and ``t_end``.

The recorder starts the server in a child process, puts a loopback relay in
front of it (a proxy that forwards each read at once and records it with its
``time.monotonic_ns()``), drives it with ``tritonclient.grpc`` through a fixed
script, and writes one JSON file: the relay's chunks per connection, the
client's own timestamps per call and the server's timings. CLOCK_MONOTONIC is
shared by all processes of a host, so the three sets of stamps compare.

Run: ``python -m tests.servers.kserve_grpc serve --port 8001 [--timings F]``
or ``python -m tests.servers.kserve_grpc record --out F``.

The two halves import different generated modules for the same protobuf
package (``tests.servers.kserve_pb`` here, ``tritonclient.grpc.service_pb2`` in
the client), which cannot share a process; each is imported only by its half.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from agent.demo_server import Timings  # one JSON line per RPC

MODELS = ("simple", "simple_stream")

# The recorder's script, in call order; the tests assert against it.
SCRIPT: tuple[dict[str, Any], ...] = (
    {"rpc": "ServerLive"},
    {"rpc": "ModelReady", "model": "simple"},
    {"rpc": "ModelInfer", "model": "simple", "id": "u1", "elements": 16, "delay_ms": 20},
    {"rpc": "ModelInfer", "model": "simple", "id": "u2", "elements": 16, "delay_ms": 20},
    # 32 KiB of input and of output: messages span several 16 KiB DATA frames.
    {"rpc": "ModelInfer", "model": "simple", "id": "big", "elements": 8192, "delay_ms": 20},
    {"rpc": "ModelInfer", "model": "missing", "id": "nf", "elements": 4, "delay_ms": 0},
    {
        "rpc": "ModelStreamInfer",
        "model": "simple_stream",
        "requests": [{"id": "s1", "responses": 4}, {"id": "s2", "responses": 3}],
        "interval_ms": 30,
    },
    # Cancelled after its first response: the client resets the stream.
    {
        "rpc": "ModelStreamInfer",
        "model": "simple_stream",
        "requests": [{"id": "c1", "responses": 50}],
        "interval_ms": 40,
        "cancel": True,
    },
)


# --- server -------------------------------------------------------------------


def _param(request: Any, name: str, default: int) -> int:
    p = request.parameters.get(name)
    return int(p.int64_param) if p is not None else default


def make_server(port: int, timings: Timings) -> tuple[Any, int]:
    """A started-to-be grpc server bound to 127.0.0.1 and the port it got."""
    import grpc

    # Untyped generated modules: Any keeps mypy from guessing at their attributes.
    pb: Any = importlib.import_module("tests.servers.kserve_pb.grpc_service_pb2")
    pb_grpc: Any = importlib.import_module("tests.servers.kserve_pb.grpc_service_pb2_grpc")

    def response_for(req: Any) -> Any:
        resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
        for i, inp in enumerate(req.inputs):
            out = resp.outputs.add()
            out.name = f"OUTPUT{i}"
            out.datatype = inp.datatype
            out.shape.extend(inp.shape)
        resp.raw_output_contents.extend(req.raw_input_contents)
        return resp

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=True)

        def ModelReady(self, request: Any, context: Any) -> Any:
            return pb.ModelReadyResponse(ready=request.name in MODELS)

        def ModelInfer(self, request: Any, context: Any) -> Any:
            entry: dict[str, Any] = {"rpc": "ModelInfer", "model": request.model_name, "id": request.id}
            entry["t_start"] = time.monotonic_ns()
            try:
                if request.model_name not in MODELS:
                    entry["status"] = "NOT_FOUND"
                    context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model_name}' not found")
                delay = _param(request, "delay_ms", 0)
                if delay:
                    time.sleep(delay / 1000)
                resp = response_for(request)
                entry["sends"] = [time.monotonic_ns()]
                entry.setdefault("status", "OK")
                return resp
            finally:
                entry["t_end"] = time.monotonic_ns()
                timings.write(entry)

        def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
            entry: dict[str, Any] = {
                "rpc": "ModelStreamInfer",
                "t_start": time.monotonic_ns(),
                "requests": [],
            }
            try:
                for req in request_iterator:
                    r: dict[str, Any] = {"model": req.model_name, "id": req.id, "sends": []}
                    entry["requests"].append(r)
                    n = _param(req, "responses", 1)
                    interval = _param(req, "interval_ms", 0) / 1000
                    for k in range(n):
                        if k:
                            # Waits on the RPC's own termination, so a cancel ends it at once.
                            if not context.is_active():
                                entry["cancelled"] = True
                                return
                            time.sleep(interval)
                        r["sends"].append(time.monotonic_ns())
                        yield pb.ModelStreamInferResponse(infer_response=response_for(req))
            finally:
                entry["cancelled"] = entry.get("cancelled", False) or not context.is_active()
                entry["t_end"] = time.monotonic_ns()
                timings.write(entry)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    return server, bound


def serve(port: int, timings_path: str | None) -> None:
    server, bound = make_server(port, Timings(timings_path))
    server.start()
    print(f"PORT {bound}", flush=True)
    # Ends when the parent closes stdin (or kills us).
    sys.stdin.read()
    server.stop(grace=1).wait(5)


# --- relay --------------------------------------------------------------------


class Relay:
    """A loopback TCP proxy that records every read, with its monotonic time,
    before forwarding it. One thread per direction per connection."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._lock = threading.Lock()
        self.connections: list[list[tuple[str, int, bytes]]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chunks: list[tuple[str, int, bytes]] = []
            with self._lock:
                self.connections.append(chunks)
            for src, dst, name in ((client, upstream, "client"), (upstream, client, "server")):
                t = threading.Thread(target=self._pump, args=(src, dst, name, chunks), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, name: str, chunks: list) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            ts = time.monotonic_ns()
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                chunks.append((name, ts, data))
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting and wait for the pumps to see both ends close."""
        self._listener.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


# --- recorder -----------------------------------------------------------------


def _drive(port: int) -> list[dict[str, Any]]:
    """Run SCRIPT with tritonclient against 127.0.0.1:port; the client's stamps per call."""
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    def inputs(n: int) -> list[Any]:
        inp = tc.InferInput("INPUT0", [1, n], "INT32")
        inp.set_data_from_numpy(np.arange(n, dtype=np.int32).reshape(1, n))
        return [inp]

    out: list[dict[str, Any]] = []
    client = tc.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        for step in SCRIPT:
            rec: dict[str, Any] = {
                "rpc": step["rpc"],
                "model": step.get("model"),
                "t_call": time.monotonic_ns(),
            }
            if step["rpc"] == "ServerLive":
                rec["result"] = client.is_server_live()
            elif step["rpc"] == "ModelReady":
                rec["result"] = client.is_model_ready(step["model"])
            elif step["rpc"] == "ModelInfer":
                rec["id"] = step["id"]
                try:
                    client.infer(
                        step["model"],
                        inputs(step["elements"]),
                        request_id=step["id"],
                        parameters={"delay_ms": step["delay_ms"]},
                    )
                    rec["status"] = "OK"
                except InferenceServerException as e:
                    rec["status"] = str(e.status())
            else:
                rec.update(_drive_stream(client, step, inputs, tc))
            rec["t_done"] = time.monotonic_ns()
            out.append(rec)
    finally:
        client.close()
    return out


def _drive_stream(client: Any, step: dict[str, Any], inputs: Any, tc: Any) -> dict[str, Any]:
    got: list[int] = []
    errors: list[str] = []
    cond = threading.Condition()

    def callback(result: Any, error: Any) -> None:
        with cond:
            if error is not None:
                errors.append(str(error))
            else:
                got.append(time.monotonic_ns())
            cond.notify_all()

    client.start_stream(callback=callback)
    expected = 0
    for r in step["requests"]:
        client.async_stream_infer(
            step["model"],
            inputs(8),
            request_id=r["id"],
            parameters={"responses": r["responses"], "interval_ms": step["interval_ms"]},
        )
        expected += 1 if step.get("cancel") else r["responses"]
        want = expected

        def arrived(want: int = want) -> bool:
            return len(got) >= want

        with cond:
            if not cond.wait_for(arrived, timeout=30):
                raise TimeoutError("stream responses did not arrive")
    client.stop_stream(cancel_requests=bool(step.get("cancel")))
    with cond:
        return {"t_first": got[0], "responses": len(got), "errors": errors}


def record(out: Path) -> None:
    """Record SCRIPT's bytes through a relay into ``out`` (JSON)."""
    timings_path = out.with_suffix(".server.jsonl")
    timings_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.kserve_grpc", "serve", "--timings", str(timings_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server did not start: {line!r}")
        relay = Relay(int(line.split()[1]))
        client_calls = _drive(relay.port)
        relay.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    server = [json.loads(x) for x in timings_path.read_text().splitlines()] if timings_path.exists() else []
    timings_path.unlink(missing_ok=True)
    doc = {
        "origin": "tests/servers/kserve_grpc.py record: tritonclient.grpc -> loopback relay -> grpcio server",
        "script": list(SCRIPT),
        "client": client_calls,
        "server": server,
        "connections": [
            [[d, ts, base64.b64encode(data).decode("ascii")] for d, ts, data in conn]
            for conn in relay.connections
        ],
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--timings", default=None)
    r = sub.add_parser("record")
    r.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.port, a.timings)
    else:
        record(a.out)


if __name__ == "__main__":
    main()
