"""Shared plumbing for end-to-end tests: real servers in subprocesses, and the
real capture pipeline (real BPF) attached to them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.assemble import AssemblyConfig
from agent.pipeline import Pipeline, PipelineConfig, Stage
from agent.record import Request
from agent.selfmetrics import SelfMetrics
from agent.targets import TargetConfig
from probes.socket_events import Decoder
from probes.sockets import SocketProbe, SocketProbeConfig, exit_args_supported

REPO = Path(__file__).resolve().parent.parent

# Where the probe reads the data syscalls' arguments: at exit from the saved registers
# (the default where the kernel allows it), or saved at entry (the fallback).
ARG_MODES = [pytest.param(True, id="args-at-exit"), pytest.param(False, id="args-at-entry")]


def arg_mode(exit_args: bool) -> SocketProbeConfig:
    """The probe's configuration for one of ARG_MODES (skipped where the kernel cannot read
    the arguments at exit)."""
    if exit_args and not exit_args_supported()[0]:
        pytest.skip(f"syscall arguments cannot be read at exit here: {exit_args_supported()[1]}")
    return SocketProbeConfig(exit_args=exit_args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_json_module(module: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """``python -m module *args`` from the repository root; its stdout parsed as one JSON object."""
    r = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(json.loads(r.stdout))


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    timings_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def timings(self) -> list[dict[str, Any]]:
        if not self.timings_path.exists():
            return []
        return [json.loads(line) for line in self.timings_path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        stop_process(self.proc)


class LineClient:
    """A client script run in its own Python process (``python -c script address``), driven by
    JSON lines: one command written to its stdin, one answer read back from its stdout."""

    def __init__(self, script: str, address: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script, address], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the client process died"
        return dict(json.loads(line))

    def close(self) -> None:
        """End its input and wait for it to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 5) -> None:
    """SIGTERM, and SIGKILL if it has not exited ``grace_s`` later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_server(argv: list[str], port: int, tmp: Path, name: str = "server") -> Server:
    timings = tmp / f"{name}-{port}-timings.jsonl"
    env = dict(os.environ, INFERSIGHT_DEMO_TIMINGS=str(timings), PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    srv = Server(proc, port, timings)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            return httpx.get(f"{srv.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 20, 0.1, f"{name} on port {port}")
    return srv


def start_demo_server(tmp: Path, port: int | None = None, loop: str = "uvloop") -> Server:
    port = port or free_port()
    return start_server([sys.executable, "-m", "agent.demo_server", "--port", str(port), "--loop", loop],
                        port, tmp, "demo")


@dataclass
class ListSink:
    records: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, record: Request) -> None:
        with self.lock:
            self.records.append(record)

    def flush(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.records)


@dataclass
class Agent:
    pipeline: Pipeline
    sink: ListSink
    metrics: SelfMetrics

    def mark(self) -> int:
        return len(self.sink.snapshot())

    def since(self, mark: int) -> list[Request]:
        return self.sink.snapshot()[mark:]

    def wait_records(self, mark: int, n: int, timeout: float = 10.0, pred: Callable[[Request], bool] | None = None,
                     ) -> list[Request]:
        def got() -> list[Request] | None:
            recs = [r for r in self.since(mark) if pred is None or pred(r)]
            return recs if len(recs) >= n else None

        recs = wait_for(got, timeout, 0.05, f"{n} records")
        return list(recs)


@contextmanager
def running_agent(targets: TargetConfig, probe: SocketProbeConfig | None = None,
                  drain_interval_s: float = 0.05, idle_check_s: float = 30.0,
                  stages: Sequence[Stage] = (), client_spans: bool = False) -> Iterator[Agent]:
    probe_cfg = probe or SocketProbeConfig()
    metrics = SelfMetrics()
    sink = ListSink()
    cfg = PipelineConfig(
        assembly=AssemblyConfig(sample_writes=probe_cfg.sample_writes, tail_slots=probe_cfg.tail_slots,
                                late_sample_writes=probe_cfg.late_sample_writes,
                                idle_check_s=idle_check_s, client_spans=client_spans),
        targets=targets,
        drain_interval_s=drain_interval_s,
    )
    p = Pipeline(cfg, lambda cb: SocketProbe(probe_cfg, on_records=cb, metrics=metrics), [sink],
                 stages=stages, metrics=metrics, layout_decoder=Decoder(probe_cfg.layout))
    p.start()
    # HTTP/2 capture loads in the background after attach: tests start with it in place
    wait_h2 = getattr(p.probe, "wait_h2", None)
    if wait_h2 is not None:
        assert wait_h2(60), "HTTP/2 capture did not load"
    try:
        yield Agent(p, sink, metrics)
    finally:
        p.stop()
