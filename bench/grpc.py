"""What tracing costs a gRPC (KServe v2 / Triton) server, measured in one run.

    python -m bench.grpc --profile {unary,stream} --seconds N [--rounds R] [--json]

The server is the KServe v2 test server (``tests/servers/kserve_grpc.py``,
grpcio, pinned to CPU 0). The load is ``--clients`` processes of PyPI's
``tritonclient.grpc`` (pinned to CPU 1; each has its own HTTP/2 connection),
each calling in a loop for ``--seconds``:

- unary: ``ModelInfer`` with ``--elements`` INT32 (the server echoes them);
- stream: ``ModelStreamInfer``, one bidirectional stream per request, each
  answered with ``--responses`` responses at interval 0 (a token stream as
  fast as the server produces it).

Rounds interleave the modes of bench/overhead.py, a fresh agent per round
(the agent is not pinned, so its CPU competes with both, as on a real node):

- untraced: no agent running;
- traced: ``infersight run --pid SERVER`` attached (the whole agent);
- probe_only: the kernel probe attached, its records drained and discarded.

The clients connect after the agent has attached: a connection that predates
it is joined mid-stream, and HPACK entries indexed before the join cannot be
decoded (docs/http2.md). Each client makes one warm-up call before the timed
window; warm-up calls are counted in the accuracy figures.

Printed: calls/s (unary) or streams/s and responses/s (stream) per mode
(median over rounds), the ratios to untraced, the server's and the agent's CPU
per call and per streamed response, start-up to attached, and accuracy from
the traced rounds: records emitted against calls the clients completed
(exact), the kernel's HTTP/2 frame counts (aggregated in the kernel or sent to
user space), walk desyncs, and lost records. The stream profile then runs one
short traced pass per ``--sweep`` responses-per-stream value: the records the
kernel sends to user space per stream should not grow with the responses.
(The sweep's agent CPU per stream also holds the agent's time-based costs,
drain timer and counter reads, spread over fewer streams as the responses
grow; records per stream is the figure that does not depend on the rate.)
Agent CPU comes from /proc in clock ticks (10 ms), so the one-second idle
sample has a resolution of 1% of a core.

Run as root (the agent loads eBPF programs). The benchmark's client half is
``python -m bench.grpc client ...``: tritonclient's generated protobuf modules
and the server's cannot share a process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench import parse_sweep, print_result, require_root
from bench.overhead import REPO, Agent, cpu_seconds

MODES = ("untraced", "traced", "probe_only")
MODEL = {"unary": "simple", "stream": "simple_stream"}
# Kernel counters are read into the agent's metrics every stats interval (1 s).
STATS_INTERVAL_S = 1.0


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


# --- client half (its own process) -------------------------------------------------


def client_main(url: str, profile: str, seconds: float, responses: int, elements: int) -> int:
    """One load process: one connection, one warm-up call, ``READY``, then on a
    line from stdin calls in a loop for ``seconds`` and prints one JSON line.
    A call started before the deadline is finished; only completed calls count."""
    import threading

    import numpy as np
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url=url)
    inp = tc.InferInput("INPUT0", [1, elements], "INT32")
    inp.set_data_from_numpy(np.arange(elements, dtype=np.int32).reshape(1, elements))
    inputs = [inp]
    model = MODEL[profile]
    got = [0]
    errors: list[str] = []
    cond = threading.Condition()

    def callback(result: Any, error: Any) -> None:
        with cond:
            if error is not None:
                errors.append(str(error))
            got[0] += 1
            cond.notify_all()

    def one_call() -> int:
        """Responses received (1 for unary)."""
        if profile == "unary":
            client.infer(model, inputs)
            return 1
        with cond:
            got[0] = 0
        client.start_stream(callback=callback)
        client.async_stream_infer(model, inputs, parameters={"responses": responses, "interval_ms": 0})
        with cond:
            if not cond.wait_for(lambda: got[0] >= responses, timeout=30):
                raise TimeoutError(f"{got[0]} of {responses} stream responses arrived")
        client.stop_stream()
        if errors:
            raise RuntimeError(errors[0])
        return responses

    one_call()
    print("READY", flush=True)
    sys.stdin.readline()
    calls = received = failed = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        try:
            received += one_call()
            calls += 1
        except Exception:
            failed += 1
            errors.clear()
    elapsed = time.monotonic() - t0
    client.close()
    print(
        json.dumps(
            {"calls": calls, "warmup": 1, "responses": received, "errors": failed, "elapsed_s": elapsed}
        ),
        flush=True,
    )
    return 0


# --- driver half -------------------------------------------------------------------


class GrpcServer:
    """The KServe v2 test server on CPU 0; it stays up until its stdin closes."""

    def __init__(self) -> None:
        argv = [sys.executable, "-m", "tests.servers.kserve_grpc", "serve", "--port", "0"]
        self.proc = subprocess.Popen(
            taskset(0) + argv,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, 30)
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the gRPC server did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        # taskset execs the server: same pid
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _readline(f: IO[str], timeout: float) -> str:
    """One line from a child's pipe, or "" after ``timeout`` seconds or at its end."""
    ready, _, _ = select.select([f], [], [], timeout)
    return f.readline() if ready else ""


@dataclass(frozen=True)
class Load:
    """What the clients of one run completed."""

    calls: int
    """Calls (unary) or streams completed in the timed window."""
    warmup: int
    """Calls completed before it (one per client)."""
    responses: int
    """Responses received in the timed window (streamed responses; 1 per unary call)."""
    errors: int
    calls_per_s: float
    responses_per_s: float


class Clients:
    """``n`` client processes on CPU 1: ``start()`` spawns them and waits until
    each has connected and made its warm-up call; ``go()`` releases them at
    once and collects their counts."""

    def __init__(
        self, port: int, profile: str, n: int, seconds: float, responses: int, elements: int, tmp: Path
    ) -> None:
        self.seconds = seconds
        self.procs: list[subprocess.Popen[str]] = []
        self.errlogs: list[Path] = []
        argv = [
            sys.executable,
            "-m",
            "bench.grpc",
            "client",
            "--url",
            f"127.0.0.1:{port}",
            "--profile",
            profile,
            "--seconds",
            str(seconds),
            "--responses",
            str(responses),
            "--elements",
            str(elements),
        ]
        for i in range(n):
            err = tmp / f"client-{os.getpid()}-{time.monotonic_ns()}-{i}.err"
            self.errlogs.append(err)
            with open(err, "w") as ef:
                self.procs.append(
                    subprocess.Popen(
                        taskset(1) + argv,
                        cwd=REPO,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=ef,
                        text=True,
                    )
                )
        try:
            for p, err in zip(self.procs, self.errlogs, strict=True):
                assert p.stdout is not None
                line = _readline(p.stdout, 60)
                if line.strip() != "READY":
                    raise RuntimeError(f"a client did not get ready: {line!r}\n{err.read_text()[-2000:]}")
        except BaseException:
            self.kill()
            raise

    def go(self) -> Load:
        try:
            for p in self.procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            deadline = time.monotonic() + self.seconds + 60
            for p, err in zip(self.procs, self.errlogs, strict=True):
                assert p.stdout is not None
                line = _readline(p.stdout, max(0.0, deadline - time.monotonic()))
                if not line:
                    raise RuntimeError(f"a client gave no result\n{err.read_text()[-2000:]}")
                outs.append(json.loads(line))
                p.wait(10)
        finally:
            self.kill()
        return Load(
            calls=sum(o["calls"] for o in outs),
            warmup=sum(o["warmup"] for o in outs),
            responses=sum(o["responses"] for o in outs),
            errors=sum(o["errors"] for o in outs),
            calls_per_s=sum(o["calls"] / o["elapsed_s"] for o in outs),
            responses_per_s=sum(o["responses"] / o["elapsed_s"] for o in outs),
        )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for err in self.errlogs:
            err.unlink(missing_ok=True)


def scrape_labelled(port: int) -> dict[str, dict[str, float]]:
    """Samples of the agent's endpoint: name -> {label string: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
            except ValueError:
                pass
    return out


def sample(metrics: dict[str, dict[str, float]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for key, v in metrics.get(name, {}).items():
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


@dataclass(frozen=True)
class Traced:
    """A traced run: its load, the agent's CPU over it and what the agent counted."""

    load: Load
    agent_cpu_s: float
    agent_idle_cpu_s: float
    """The agent's CPU over one second attached before the clients start."""
    server_cpu_s: float
    startup_s: float
    accuracy: dict[str, int]


def accuracy_of(m: dict[str, dict[str, float]], completed: int) -> dict[str, int]:
    """The agent's own counts over its whole life (a fresh agent, a fresh probe)."""
    return {
        "calls_completed": completed,
        "records": int(sample(m, "infersight_records_emitted_total")),
        "requests_lost": int(sample(m, "infersight_requests_lost_total")),
        "events_lost": int(sample(m, "infersight_events_lost_total")),
        "events_lost_h2": int(sample(m, "infersight_events_lost_total", type="h2")),
        "records_to_user_space": int(sample(m, "infersight_events_received_total")),
        "h2_connections": int(sample(m, "infersight_kernel_h2_connections_total")),
        "h2_frames_sent": int(sample(m, "infersight_kernel_h2_frames_total", fate="sent")),
        "h2_frames_aggregated": int(sample(m, "infersight_kernel_h2_frames_total", fate="aggregated")),
        "h2_desync": int(sample(m, "infersight_kernel_h2_desync_total")),
        "h2_stream_map_full": int(sample(m, "infersight_kernel_h2_stream_map_full_total")),
        "parse_failures": int(sample(m, "infersight_parse_failures_total")),
    }


def wait_h2_ready(agent: Agent, log: Path, timeout: float = 60.0) -> None:
    """The HTTP/2 walk loads in the background after attach: the clients start
    once it is in place, so that their connections are seen from the preface."""
    deadline = time.monotonic() + timeout
    while "HTTP/2 capture ready" not in log.read_text():
        if agent.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("HTTP/2 capture did not load:\n" + log.read_text())
        time.sleep(0.05)


def run_traced(
    server: GrpcServer, profile: str, clients: int, seconds: float, responses: int, elements: int, log: Path
) -> Traced:
    """A fresh agent, then the clients (so that it sees their connections from
    the preface), then the agent's counts once it has caught up."""
    agent = Agent(server.pid, log)
    try:
        wait_h2_ready(agent, log)
        i0 = cpu_seconds(agent.proc.pid)
        time.sleep(1.0)
        idle = cpu_seconds(agent.proc.pid) - i0
        load_procs = Clients(server.port, profile, clients, seconds, responses, elements, log.parent)
        c0, s0 = cpu_seconds(agent.proc.pid), cpu_seconds(server.pid)
        load = load_procs.go()
        time.sleep(1.5)  # let the agent drain and assemble what is in flight, as bench/overhead.py does
        c1, s1 = cpu_seconds(agent.proc.pid), cpu_seconds(server.pid)
        completed = load.calls + load.warmup
        # Bounded wait for the last records; then one more kernel-counter read.
        deadline = time.monotonic() + 10
        while (
            sample(scrape_labelled(agent.prom), "infersight_records_emitted_total") < completed
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        time.sleep(STATS_INTERVAL_S + 0.2)
        m = scrape_labelled(agent.prom)
    finally:
        agent.stop()
    return Traced(load, c1 - c0, idle, s1 - s0, agent.startup_s, accuracy_of(m, completed))


def run_plain(
    server: GrpcServer, profile: str, clients: int, seconds: float, responses: int, elements: int, tmp: Path
) -> tuple[Load, float]:
    """The load alone; returns it and the server's CPU seconds over it."""
    c = Clients(server.port, profile, clients, seconds, responses, elements, tmp)
    s0 = cpu_seconds(server.pid)
    load = c.go()
    return load, cpu_seconds(server.pid) - s0


def run_probe_only(
    server: GrpcServer, profile: str, clients: int, seconds: float, responses: int, elements: int, log: Path
) -> tuple[Load, float, int]:
    """The probe alone (bench/probe_only.py): the load, the server's CPU, and the
    records the probe handed to user space over its life (warm-up included)."""
    bare = Agent(server.pid, log, probe_only=True)
    wait_h2_ready(bare, log)
    try:
        load, server_cpu = run_plain(server, profile, clients, seconds, responses, elements, log.parent)
    finally:
        bare.stop()
    m = re.search(r"records drained: (\d+)", log.read_text())
    return load, server_cpu, int(m.group(1)) if m else -1


def per(num: float, den: float, scale: float = 1.0, digits: int = 3) -> float | None:
    return round(num / den * scale, digits) if den else None


def bench(
    profile: str,
    seconds: float,
    rounds: int,
    clients: int,
    responses: int,
    elements: int,
    sweep: tuple[int, ...],
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="infersight-bench-grpc-"))
    rate: dict[str, list[float]] = {m: [] for m in MODES}
    resp_rate: dict[str, list[float]] = {m: [] for m in MODES}
    server_cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
    calls: dict[str, int] = dict.fromkeys(MODES, 0)
    errors = 0
    agent_cpu = agent_idle = 0.0
    startups: list[float] = []
    acc: dict[str, int] = {}
    probe_records = probe_calls = 0
    streamed = profile == "stream"
    resp = responses if streamed else 1
    server = GrpcServer()
    sweep_out: list[dict[str, Any]] = []
    try:
        # warm the server once before the first round
        run_plain(server, profile, clients, 1, resp, elements, tmp)
        for r in range(rounds):
            load, scpu = run_plain(server, profile, clients, seconds, resp, elements, tmp)
            loads = {"untraced": (load, scpu)}
            t = run_traced(server, profile, clients, seconds, resp, elements, tmp / f"agent-{r}.log")
            loads["traced"] = (t.load, t.server_cpu_s)
            agent_cpu += t.agent_cpu_s
            agent_idle += t.agent_idle_cpu_s
            startups.append(t.startup_s)
            for k, v in t.accuracy.items():
                acc[k] = acc.get(k, 0) + v
            pload, pcpu, drained = run_probe_only(
                server, profile, clients, seconds, resp, elements, tmp / f"probe-{r}.log"
            )
            loads["probe_only"] = (pload, pcpu)
            probe_records += drained
            probe_calls += pload.calls + pload.warmup
            for mode, (ld, cpu) in loads.items():
                rate[mode].append(round(ld.calls_per_s, 1))
                resp_rate[mode].append(round(ld.responses_per_s, 1))
                server_cpu[mode] += cpu
                calls[mode] += ld.calls
                errors += ld.errors
        if streamed:
            for n in sweep:
                t = run_traced(
                    server, profile, clients, min(seconds, 2.0), n, elements, tmp / f"sweep-{n}.log"
                )
                a = t.accuracy
                frames = a["h2_frames_sent"] + a["h2_frames_aggregated"]
                sweep_out.append(
                    {
                        "responses_per_stream": n,
                        "streams_completed": a["calls_completed"],
                        "records": a["records"],
                        "exact": a["records"] == a["calls_completed"] and t.load.errors == 0,
                        "records_to_user_space_per_stream": per(
                            a["records_to_user_space"], a["calls_completed"]
                        ),
                        "h2_frames_per_stream": per(frames, a["calls_completed"], digits=1),
                        "h2_frames_sent_per_stream": per(a["h2_frames_sent"], a["calls_completed"]),
                        "h2_frames_aggregated_share": per(a["h2_frames_aggregated"], frames, digits=4),
                        "h2_desync": a["h2_desync"],
                        "events_lost": a["events_lost"],
                        "agent_cpu_us_per_stream": per(t.agent_cpu_s, t.load.calls, 1e6, 1),
                    }
                )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in rate.items()}
    frames = acc["h2_frames_sent"] + acc["h2_frames_aggregated"]
    unit = "streams" if streamed else "calls"
    out: dict[str, Any] = {
        "profile": profile,
        "seconds": seconds,
        "rounds": rounds,
        "clients": clients,
        "elements": elements,
    }
    if streamed:
        out["responses_per_stream"] = responses
    out[f"{unit}_per_s"] = {m: round(v, 1) for m, v in med.items()}
    out[f"{unit}_per_s_each_round"] = rate
    if streamed:
        out["responses_per_s"] = {m: round(statistics.median(v), 1) for m, v in resp_rate.items()}
    out["ratio_traced_to_untraced"] = per(med["traced"], med["untraced"], digits=4)
    out["ratio_probe_only_to_untraced"] = per(med["probe_only"], med["untraced"], digits=4)
    out[f"server_cpu_us_per_{unit[:-1]}"] = {m: per(server_cpu[m], calls[m], 1e6, 1) for m in MODES}
    out[f"agent_cpu_us_per_{unit[:-1]}"] = per(agent_cpu, calls["traced"], 1e6, 2)
    if streamed:
        out["agent_cpu_us_per_response"] = per(agent_cpu, calls["traced"] * responses, 1e6, 3)
    out["agent_cpu_share_of_a_core"] = round(agent_cpu / (seconds * rounds), 3)
    out["agent_idle_cpu_share_of_a_core"] = round(agent_idle / rounds, 3)
    out["startup_to_attached_s"] = round(statistics.median(startups), 3)
    out["client_errors"] = errors
    out["accuracy"] = acc
    out["exact"] = acc["records"] == acc["calls_completed"] and acc["requests_lost"] == 0 and errors == 0
    out[f"records_to_user_space_per_{unit[:-1]}"] = per(acc["records_to_user_space"], acc["calls_completed"])
    out[f"probe_only_records_to_user_space_per_{unit[:-1]}"] = per(probe_records, probe_calls)
    out[f"h2_frames_per_{unit[:-1]}"] = per(frames, acc["calls_completed"], digits=1)
    out["h2_frames_aggregated_share"] = per(acc["h2_frames_aggregated"], frames, digits=4)
    if streamed:
        out["sweep"] = sweep_out
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        cp = argparse.ArgumentParser(prog="bench.grpc client")
        cp.add_argument("--url", required=True)
        cp.add_argument("--profile", choices=("unary", "stream"), required=True)
        cp.add_argument("--seconds", type=float, required=True)
        cp.add_argument("--responses", type=int, default=32)
        cp.add_argument("--elements", type=int, default=16)
        c = cp.parse_args(argv[1:])
        return client_main(c.url, c.profile, c.seconds, c.responses, c.elements)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("unary", "stream"), default="unary")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="client processes, one connection each")
    ap.add_argument("--responses", type=int, default=32, help="responses per stream (stream profile)")
    ap.add_argument("--elements", type=int, default=16, help="INT32 elements per request")
    ap.add_argument(
        "--sweep",
        type=parse_sweep,
        default=(1, 8, 32, 128),
        help="responses per stream for the records-per-stream pass (stream profile; '' skips it)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    require_root()
    result = bench(a.profile, a.seconds, a.rounds, a.clients, a.responses, a.elements, a.sweep)
    print_result(result, a.json, 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
