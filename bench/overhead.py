"""What tracing costs the server, measured in one run.

    python -m bench.overhead --profile {json,sse} --seconds N [--rounds R] [--agent-cpus LIST] [--json]

Rounds interleave three ways of serving the same uvicorn app, loaded by wrk
over loopback (server pinned to CPU 0, wrk to CPU 1; the agent is not pinned,
so its CPU competes with both, as on a node whose server shares its cores;
``--agent-cpus 1`` keeps the agent and the probe-only drain off the server's
core, as on a node that gives the server cores of its own, such as a
Kubernetes node with the static CPU manager policy and a Guaranteed pod):

- untraced: no agent running;
- traced: ``infersight run --pid SERVER`` attached (a fresh agent per round);
- probe_only: the kernel probe attached, its records drained and discarded
  (the kernel-side share of the cost, without the agent's user-space work);
- otel-asgi: OpenTelemetry's in-process ASGI middleware with the SDK.

Each of these runs is bracketed by untraced runs, one just before and one
just after it (untraced, traced, untraced, probe_only, untraced, otel-asgi,
untraced, then the next round): the machine's own speed drifts by several
percent within a minute, and the mean of the two runs around a run is the
untraced throughput of its moment, as near as one can have it. Each run's
ratio is against that mean, and a way's ratio is the median of its rounds'.
With more than one round, ``ratio_interval`` gives where that median lies as
far as the rounds tell: two of the rounds' ratios, ranked, chosen to hold the
median with a known chance whatever the rounds' distribution (``coverage``;
with five rounds, the lowest and the highest, 94%).

Printed: requests/s of each (median over rounds), the ratios (the median of
the bracketed ratios; each round's; and, as earlier versions printed it, the
ratio of the medians), the agent's CPU
seconds per request and per streamed chunk, its CPU while attached to an idle
server (milliseconds per second, before the first round's load), its start-up
time, and accuracy:
requests wrk completed, requests the server served (the kernel's count),
records the agent emitted and losses it counted.

Per streamed chunk, two figures: the agent's CPU divided by the chunks served
(which charges each chunk a share of the per-request cost, and so falls as
streams get longer), and the marginal cost of one more chunk. For the latter,
each round also runs traced streams of the ``--sweep-chunks`` lengths, and a
least-squares line through CPU per request against chunks per request gives
the cost per chunk (slope) and the fixed cost of a streamed request (intercept).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.cli import SYSCALL_ARGS
from bench import parse_sweep, print_result, require_root

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_stats(pid: int) -> dict[int, tuple[str, int, int]]:
    """Each thread of ``pid``: its kernel name, its scheduler time (ns) and its voluntary
    context switches (a thread that ends while being read is left out)."""
    out: dict[int, tuple[str, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/schedstat") as f:
                ns = int(f.read().split()[0])
            switches = 0
            with open(f"{base}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        switches = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(tid)] = (name, ns, switches)
    return out


def thread_cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads, from the scheduler's nanosecond counts
    (``/proc/PID/stat`` counts clock ticks: too coarse for an idle process)."""
    return sum(ns for _, ns, _ in thread_stats(pid).values()) / 1e9


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def scrape(port: int) -> dict[str, float]:
    """Sum of each metric family's samples (labels folded) from the agent's endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


class Server:
    def __init__(self, profile: str, chunks: int, otel: bool) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.server", "--port", str(self.port), "--chunks", str(chunks)]
        if otel:
            argv.append("--otel")
        taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        self.proc = subprocess.Popen(taskset + argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.port}/v1/models")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Agent:
    def __init__(self, pid: int, log: Path, probe_only: bool = False, syscall_args: str = "auto",
                 cpus: str | None = None) -> None:
        self.prom = free_port()
        self.log = log
        self.t0 = time.monotonic()
        self._logf = open(log, "w")
        argv = [sys.executable, "-m", "agent.cli", "run", "--pid", str(pid), "--prometheus-port", str(self.prom),
                "--prometheus-host", "127.0.0.1", "--syscall-args", syscall_args]
        if probe_only:
            argv = [sys.executable, "-m", "bench.probe_only", "--pid", str(pid), "--syscall-args", syscall_args]
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "attached to" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not attach:\n" + log.read_text())
            time.sleep(0.05)
        m = re.search(r"attached to \d+ target\(s\) in ([0-9.]+)s", log.read_text())
        self.startup_s = float(m.group(1)) if m else float("nan")
        self.process_startup_s = time.monotonic() - self.t0
        # The HTTP/2 walk compiles after the attach, in the background: a one-off
        # cost kept out of the per-request CPU measured next.
        while "HTTP/2 capture ready" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("HTTP/2 capture did not load:\n" + log.read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._logf.close()


def run_wrk(port: int, profile: str, seconds: float, conns: int, tmp: Path) -> tuple[float, int]:
    url = f"http://127.0.0.1:{port}"
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    if profile == "sse":
        script = tmp / "sse.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          'wrk.body = \'{"model":"bench-llm","stream":true,"messages":[]}\'\n')
        argv += ["-s", str(script), url + "/v1/chat/completions"]
    elif profile == "responses":
        script = tmp / "responses.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          'wrk.body = \'{"model":"bench-llm","stream":true,"input":"hi"}\'\n')
        argv += ["-s", str(script), url + "/v1/responses"]
    else:
        argv.append(url + "/v1/models")
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "1", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, n


def traced_cpu(server: Server, profile: str, seconds: float, conns: int, tmp: Path, name: str,
               syscall_args: str, cpus: str | None = None) -> tuple[float, int]:
    """Agent CPU seconds and requests completed for one traced run of ``server``."""
    agent = Agent(server.proc.pid, tmp / f"{name}.log", syscall_args=syscall_args, cpus=cpus)
    try:
        c0 = cpu_seconds(agent.proc.pid)
        n = run_wrk(server.port, profile, seconds, conns, tmp)[1]
        time.sleep(1.5)  # let the agent drain and assemble what is in flight
        return cpu_seconds(agent.proc.pid) - c0, n
    finally:
        agent.stop()


ARMS = ("traced", "probe_only", "otel_asgi")


def bracketed(untraced: list[float], runs: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each run's throughput against the mean of the untraced runs just before and after it,
    round by round: ``untraced`` holds one run before the first round, then one after each
    of the round's ways in :data:`ARMS` order, as :func:`bench` runs them."""
    rounds = len(runs[ARMS[0]])
    if len(untraced) != len(ARMS) * rounds + 1 or any(len(runs[k]) != rounds for k in ARMS):
        raise ValueError("untraced runs must bracket every run: one before the first, one after each")
    out: dict[str, list[float]] = {k: [] for k in ARMS}
    for r in range(rounds):
        for j, k in enumerate(ARMS):
            at = len(ARMS) * r + j
            out[k].append(runs[k][r] / ((untraced[at] + untraced[at + 1]) / 2))
    return out


def median_interval(values: list[float], level: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median of what ``values`` sample: the k-th smallest
    and k-th largest, with k the largest whose coverage (the chance that the true median lies
    between them, 1 - 2 P(B < k) for B binomial(n, 1/2)) is at least ``level``; with too few
    values for that, the smallest and largest. Returns (low, high, coverage)."""
    xs = sorted(values)
    n = len(xs)
    if n < 2:
        raise ValueError("an interval for the median needs at least two values")
    k, below = 1, 1  # below: P(B < k) * 2**n
    while k + 1 <= n // 2 and 1 - 2 * (below + math.comb(n, k)) / 2**n >= level:
        below += math.comb(n, k)
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * below / 2**n


def interval(ratios: list[float]) -> dict[str, float] | None:
    """:func:`median_interval` of a way's rounds, as printed; None for a single round."""
    if len(ratios) < 2:
        return None
    low, high, coverage = median_interval(ratios)
    return {"low": round(low, 4), "high": round(high, 4), "coverage": round(coverage, 4)}


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("a line needs at least two distinct x values")
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def bench(profile: str, seconds: float, rounds: int, conns: int, chunks: int,
          syscall_args: str = "auto", sweep: tuple[int, ...] = (), idle_seconds: float = 5.0,
          agent_cpus: str | None = None) -> dict[str, Any]:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="infersight-bench-"))
    rps: dict[str, list[float]] = {"untraced": [], "traced": [], "probe_only": [], "otel_asgi": []}
    agent_cpu = 0.0
    traced_requests = 0
    startups: list[float] = []
    idle_ms_per_s = float("nan")
    process_startups: list[float] = []
    agent_affinity: set[int] = set()
    accuracy = {"wrk_completed": 0, "kernel_requests": 0, "records": 0, "lost": 0, "events_lost": 0}
    if profile != "sse":
        sweep = ()
    sweep = tuple(c for c in dict.fromkeys(sweep) if c != chunks)
    sweep_cpu = {c: 0.0 for c in sweep}
    sweep_requests = {c: 0 for c in sweep}
    plain = Server(profile, chunks, otel=False)
    otel = Server(profile, chunks, otel=True)
    swept: dict[int, Server] = {}
    try:
        for c in sweep:
            swept[c] = Server(profile, c, otel=False)
        # warm both servers, then the untraced run before the first round's first way
        run_wrk(plain.port, profile, 1, conns, tmp)
        run_wrk(otel.port, profile, 1, conns, tmp)
        rps["untraced"].append(run_wrk(plain.port, profile, seconds, conns, tmp)[0])
        for r in range(rounds):
            agent = Agent(plain.proc.pid, tmp / f"agent-{r}.log", syscall_args=syscall_args, cpus=agent_cpus)
            agent_affinity.update(os.sched_getaffinity(agent.proc.pid))
            startups.append(agent.startup_s)
            process_startups.append(agent.process_startup_s)
            if r == 0:
                # attached to an idle server: what the agent costs a node with no traffic
                time.sleep(1.0)
                i0, t0 = thread_cpu_seconds(agent.proc.pid), time.monotonic()
                time.sleep(idle_seconds)
                idle_ms_per_s = (thread_cpu_seconds(agent.proc.pid) - i0) / (time.monotonic() - t0) * 1e3
            before = scrape(agent.prom)
            c0 = cpu_seconds(agent.proc.pid)
            v, n = run_wrk(plain.port, profile, seconds, conns, tmp)
            time.sleep(1.5)  # let the agent drain and assemble what is in flight
            c1 = cpu_seconds(agent.proc.pid)
            after = scrape(agent.prom)
            agent.stop()
            rps["traced"].append(v)
            rps["untraced"].append(run_wrk(plain.port, profile, seconds, conns, tmp)[0])
            agent_cpu += c1 - c0
            traced_requests += n

            def delta(name: str, after: dict[str, float] = after, before: dict[str, float] = before) -> float:
                return after.get(name, 0.0) - before.get(name, 0.0)

            accuracy["wrk_completed"] += n
            accuracy["kernel_requests"] += int(delta("infersight_kernel_requests_total"))
            accuracy["records"] += int(delta("infersight_records_emitted_total"))
            accuracy["lost"] += int(delta("infersight_requests_lost_total"))
            accuracy["events_lost"] += int(delta("infersight_events_lost_total"))
            # the kernel probe alone, user space discarding: the kernel-side share of the cost
            bare = Agent(plain.proc.pid, tmp / f"probe-{r}.log", probe_only=True, syscall_args=syscall_args,
                         cpus=agent_cpus)
            agent_affinity.update(os.sched_getaffinity(bare.proc.pid))
            rps["probe_only"].append(run_wrk(plain.port, profile, seconds, conns, tmp)[0])
            bare.stop()
            rps["untraced"].append(run_wrk(plain.port, profile, seconds, conns, tmp)[0])
            rps["otel_asgi"].append(run_wrk(otel.port, profile, seconds, conns, tmp)[0])
            rps["untraced"].append(run_wrk(plain.port, profile, seconds, conns, tmp)[0])
            for c, server in swept.items():
                if r == 0:
                    run_wrk(server.port, profile, 1, conns, tmp)
                cpu, n = traced_cpu(server, profile, seconds, conns, tmp, f"agent-{c}-chunks-{r}", syscall_args,
                                    agent_cpus)
                sweep_cpu[c] += cpu
                sweep_requests[c] += n
    finally:
        plain.stop()
        otel.stop()
        for server in swept.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rps.items()}
    each = bracketed(rps["untraced"], rps)
    per_req_us = agent_cpu / traced_requests * 1e6 if traced_requests else float("nan")
    chunks_per_req = chunks + 3 if profile == "sse" else 0
    # an OpenAI stream of N tokens is N + 3 events: the role, N tokens, finish, [DONE]
    by_chunks = {chunks: per_req_us} if chunks_per_req else {}
    by_chunks.update({c: sweep_cpu[c] / sweep_requests[c] * 1e6 for c in sweep if sweep_requests[c]})
    marginal: dict[str, Any] = {}
    if len(by_chunks) >= 2:
        slope, intercept = line_fit([(c + 3, us) for c, us in by_chunks.items()])
        marginal = {
            "agent_cpu_us_per_request_by_chunks": {str(c): round(us, 2) for c, us in sorted(by_chunks.items())},
            "agent_cpu_us_per_chunk_marginal": round(slope, 3),
            "agent_cpu_us_per_streamed_request_fixed": round(intercept, 2),
        }
    return {
        "profile": profile,
        "syscall_args": syscall_args,
        "seconds": seconds,
        "rounds": rounds,
        "connections": conns,
        "agent_cpus": sorted(agent_affinity),
        "requests_per_s": {k: round(v, 1) for k, v in med.items()},
        "requests_per_s_each_round": rps,
        "ratio_traced_to_untraced": round(statistics.median(each["traced"]), 4),
        "ratio_probe_only_to_untraced": round(statistics.median(each["probe_only"]), 4),
        "ratio_otel_asgi_to_untraced": round(statistics.median(each["otel_asgi"]), 4),
        # each round's runs against the untraced runs around them: how far the rounds spread
        "ratio_each_round": {k: [round(v, 4) for v in each[k]] for k in ARMS},
        # where the median of each way's rounds lies, as far as its rounds tell (None: one round)
        "ratio_interval": {k: interval(each[k]) for k in ARMS},
        # the ratio of the medians, without the brackets (the headline of earlier versions)
        "ratio_of_medians": {k: round(med[k] / med["untraced"], 4) for k in ARMS},
        "agent_cpu_us_per_request": round(per_req_us, 2),
        "agent_cpu_us_per_chunk": round(agent_cpu / (traced_requests * chunks_per_req) * 1e6, 3)
        if chunks_per_req and traced_requests else None,
        **marginal,
        "agent_cpu_share_of_a_core": round(agent_cpu / (seconds * rounds), 3),
        "agent_idle_cpu_ms_per_s": round(idle_ms_per_s, 3),
        "startup_to_attached_s": round(statistics.median(startups), 3),
        "process_start_to_attached_s": round(statistics.median(process_startups), 3),
        "accuracy": accuracy,
        "accounted": accuracy["records"] + accuracy["lost"] == accuracy["kernel_requests"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("json", "sse"), default="json")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--idle-seconds", type=float, default=5.0,
                    help="how long the first traced round measures the attached agent before any load")
    ap.add_argument("--sweep-chunks", type=parse_sweep, default=(10, 200),
                    help="sse only: comma-separated stream lengths also traced each round, for the marginal "
                         "CPU per chunk ('' for none)")
    ap.add_argument("--syscall-args", choices=SYSCALL_ARGS, default="auto",
                    help="passed to the agent and the probe-only run (agent option --syscall-args)")
    ap.add_argument("--agent-cpus", metavar="LIST",
                    help="CPUs for the agent and the probe-only drain (taskset -c LIST, e.g. 1: wrk's core); "
                         "not pinned by default")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    require_root()
    if a.agent_cpus is not None:
        if not shutil.which("taskset"):
            ap.error("--agent-cpus needs taskset (util-linux)")
        if subprocess.run(["taskset", "-c", a.agent_cpus, "true"], capture_output=True).returncode != 0:
            ap.error(f"--agent-cpus: taskset does not accept the CPU list {a.agent_cpus!r} here")
    sweep = a.sweep_chunks
    if any(c < 1 for c in sweep):
        ap.error("--sweep-chunks: stream lengths must be at least 1")
    if a.idle_seconds <= 0:
        ap.error("--idle-seconds must be positive")
    result = bench(a.profile, a.seconds, a.rounds, a.connections, a.chunks, a.syscall_args, sweep,
                   a.idle_seconds, a.agent_cpus)
    print_result(result, a.json, 32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
