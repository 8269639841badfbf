"""``infersight demo``: the newcomer's first command.

It starts the built-in OpenAI-compatible streaming server (FastAPI on uvicorn,
like vLLM's API server), a load generator that streams chat completions (and
now and then a non-streamed one, or a client that gives up early), and the
agent attached to the server. Records are printed live, then a summary.

Needs what ``infersight run`` needs (root, BCC): ``infersight doctor`` says.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from agent.record import Request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrintSink:
    """Prints one line per record; keeps them for the summary."""

    def __init__(self, out: Any = sys.stdout) -> None:
        self.out = out
        self.records: list[Request] = []
        self.lock = threading.Lock()
        print(f"{'status':>6} {'path':<20} {'model':<12} {'stream':<6} {'events':>6} {'ttft ms':>8} "
              f"{'tpot ms':>8} {'dur ms':>8} {'tokens':>11}  note", file=out)

    def emit(self, r: Request) -> None:
        with self.lock:
            self.records.append(r)
        ttft = f"{r.time_to_first_token_s * 1e3:8.1f}" if r.time_to_first_token_s is not None else f"{'-':>8}"
        tpot = f"{r.time_per_output_token_s * 1e3:8.2f}" if r.time_per_output_token_s is not None else f"{'-':>8}"
        tokens = f"{r.input_tokens if r.input_tokens is not None else '-'}/" \
                 f"{r.output_tokens if r.output_tokens is not None else '-'}"
        note = "aborted" if r.aborted else (r.error_type or "")
        print(f"{r.status_code or '-':>6} {(r.path or '-')[:20]:<20} {(r.request_model or '-')[:12]:<12} "
              f"{'yes' if r.streaming else 'no':<6} {r.output_events if r.output_events is not None else '-':>6} "
              f"{ttft} {tpot} {r.duration_s * 1e3:8.1f} {tokens:>11}  {note}", file=self.out, flush=True)

    def flush(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _load(url: str, stop: threading.Event, seed: int, sent: list[int]) -> None:
    import httpx

    rng = random.Random(seed)
    count = 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            count += 1
            n = rng.choice((8, 16, 32, 64))
            stream = rng.random() < 0.85
            body: dict[str, object] = {
                "model": rng.choice(("demo-8b", "demo-70b")), "stream": stream,
                "ttft_s": rng.uniform(0.02, 0.2), "tpot_s": rng.uniform(0.002, 0.02)}
            if count % 4 == 2:  # every fourth request: the OpenAI Responses API
                path = "/v1/responses"
                body.update(input="Tell me about GPUs.", max_output_tokens=n)
            else:
                path = "/v1/chat/completions"
                body.update(messages=[{"role": "user", "content": "Tell me about GPUs."}], max_tokens=n,
                            stream_options={"include_usage": True})
            try:
                if stream and rng.random() < 0.1:
                    with c.stream("POST", path, json=body) as r:
                        for i, _ in enumerate(r.iter_lines()):
                            if i > 12:
                                break  # a client that gives up: the agent marks it aborted
                else:
                    c.post(path, json=body).read()
                sent[0] += 1
            except Exception:
                time.sleep(0.1)


def summary(records: list[Request], out: Any = sys.stdout) -> None:
    def q(vals: list[float], p: float) -> str:
        if not vals:
            return "-"
        vals = sorted(vals)
        return f"{vals[min(len(vals) - 1, int(p * len(vals)))] * 1e3:.1f} ms"

    ttft = [r.time_to_first_token_s for r in records if r.time_to_first_token_s is not None]
    tpot = [r.time_per_output_token_s for r in records if r.time_per_output_token_s is not None]
    dur = [r.duration_s for r in records]
    print("\nsummary", file=out)
    print(f"  requests      {len(records)} ({sum(r.streaming for r in records)} streamed, "
          f"{sum(r.aborted for r in records)} aborted by the client)", file=out)
    paths: dict[str, int] = {}
    for r in records:
        paths[r.path or "-"] = paths.get(r.path or "-", 0) + 1
    print("  by path       " + ", ".join(f"{p} {n}" for p, n in sorted(paths.items())), file=out)
    print(f"  TTFT          p50 {q(ttft, 0.5)}  p99 {q(ttft, 0.99)}", file=out)
    print(f"  time/token    p50 {q(tpot, 0.5)}  p99 {q(tpot, 0.99)}", file=out)
    print(f"  duration      p50 {q(dur, 0.5)}  p99 {q(dur, 0.99)}", file=out)
    toks = sum(r.output_tokens or 0 for r in records)
    if dur:
        print(f"  output tokens {toks} (mean {statistics.mean(r.output_tokens or 0 for r in records):.1f} "
              "per request)", file=out)


def main(ns: argparse.Namespace) -> int:
    import logging

    import httpx

    from agent.assemble import AssemblyConfig
    from agent.pipeline import Pipeline, PipelineConfig
    from agent.selfmetrics import SELF_METRICS
    from agent.targets import TargetConfig
    from probes.socket_events import Decoder
    from probes.sockets import SocketProbe, SocketProbeConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("infersight demo needs root for eBPF; run `infersight doctor` to see what is missing",
              file=sys.stderr)
        return 2
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "agent.demo_server", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("demo server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"demo server (uvicorn, pid {server.pid}) on {url}; attaching the agent...")
        probe_cfg = SocketProbeConfig()
        sink = PrintSink()
        sinks: list[Any] = [sink]
        if ns.prometheus_port:
            from agent.export.exporters import ExportConfig, Exporters

            sinks.append(Exporters(ExportConfig(prometheus_port=ns.prometheus_port, prometheus_host="127.0.0.1")))
        pipeline = Pipeline(
            PipelineConfig(assembly=AssemblyConfig(sample_writes=probe_cfg.sample_writes,
                                                   late_sample_writes=probe_cfg.late_sample_writes,
                                                   tail_slots=probe_cfg.tail_slots),
                           targets=TargetConfig(pids=(server.pid,))),
            lambda cb: SocketProbe(probe_cfg, on_records=cb),
            sinks,
            layout_decoder=Decoder(probe_cfg.layout),
        )
        pipeline.start()
        print(f"attached in {pipeline.attach_seconds:.2f}s; {ns.concurrency} clients for {ns.seconds:.0f}s\n")
        stop = threading.Event()
        sent = [0]
        threads = [threading.Thread(target=_load, args=(url, stop, i, sent), daemon=True)
                   for i in range(ns.concurrency)]
        for t in threads:
            t.start()
        time.sleep(ns.seconds)
        stop.set()
        for t in threads:
            t.join(35)
        time.sleep(0.5)
        pipeline.stop()
        summary(sink.records)
        lost = SELF_METRICS.total("infersight.requests.lost")
        print(f"  accounted     {len(sink.records)} records + {lost:.0f} counted losses "
              f"(clients completed {sent[0]})")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
