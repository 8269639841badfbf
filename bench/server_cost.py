"""What the socket probe costs the traced server, measured on the server's own CPU.

    python -m bench.server_cost --profile {json,sse} --seconds N --rounds R [--perf] [--json]

Starts the overhead benchmark's uvicorn server (pinned to CPU 0) and loads it
with wrk (CPU 1), in rounds that alternate, in turn order, an untraced run and
a run with the probe alone (``bench.probe_only``: records drained and
discarded, so the agent's user-space work is left out). Each run reads the
server's CPU time (``/proc/PID/task/*/schedstat``) and wrk's (its rusage), so
the probe's cost shows as server CPU per request rather than as a throughput
step: the figure the overhead benchmark's probe-only ratio stands for, when
the server keeps its core busy (``server_busy`` near 1).

With ``--perf``, one more pair of runs (untraced, probe) is sampled with
``perf record -C 0`` (Debian ``linux-perf``), and the server's samples are
split by symbol: each symbol's share of the server's samples times the
server's CPU per request in that run. Printed: the change per request of the
BPF programs' own code, of the kernel's and of user space, and the symbols
that grew most. The sampling itself slows the server; the split, not the
sampled runs' throughput, is what these runs are for.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import print_result, require_root

MODES = ("untraced", "probe")
_REPORT_LINE = re.compile(r"^\s+[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(\S+)")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def one_run(server: Any, mode: str, profile: str, seconds: float, tmp: Path, name: str,
            perf_out: Path | None = None) -> dict[str, float]:
    """One wrk run of ``server``, untraced or with the probe alone: requests/s, and the server's
    and wrk's CPU per request."""
    from bench.overhead import Agent, run_wrk, thread_cpu_seconds

    agent = Agent(server.proc.pid, tmp / f"{name}.log", probe_only=True) if mode == "probe" else None
    perf = None
    try:
        if perf_out is not None:
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-C", "0", "-F", "999", "-o", str(perf_out), "--",
                 "sleep", str(round(seconds) + 1)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        s0, w0, t0 = thread_cpu_seconds(server.proc.pid), _children_cpu(), time.monotonic()
        rps, n = run_wrk(server.port, profile, seconds, 8, tmp)
        wall = time.monotonic() - t0
        s1, w1 = thread_cpu_seconds(server.proc.pid), _children_cpu()
        if perf is not None:
            perf.wait(seconds + 30)
    finally:
        if agent is not None:
            agent.stop()
    return {
        "requests_per_s": rps,
        "requests": n,
        "server_cpu_us_per_request": (s1 - s0) / n * 1e6,
        "server_busy": (s1 - s0) / wall,
        "wrk_cpu_us_per_request": (w1 - w0) / n * 1e6,
    }


def symbol_samples(data: Path, pid: int) -> Counter[tuple[str, str]]:
    """(dso, symbol) -> samples of ``pid`` in a ``perf record`` file."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--pid", str(pid), "--sort", "dso,symbol", "--stdio", "-n",
         "-g", "none"], capture_output=True, text=True, check=True, timeout=300).stdout
    samples: Counter[tuple[str, str]] = Counter()
    for line in out.splitlines():
        m = _REPORT_LINE.match(line)
        if m:
            samples[(m.group(2), m.group(4))] += int(m.group(1))
    return samples


def split_us(samples: Counter[tuple[str, str]], us_per_request: float) -> dict[tuple[str, str], float]:
    """Each symbol's share of the samples times the CPU per request."""
    total = sum(samples.values())
    return {k: v / total * us_per_request for k, v in samples.items()} if total else {}


def group(key: tuple[str, str]) -> str:
    dso = key[0]
    if dso.startswith("bpf_prog_"):
        return "bpf_programs"
    return "kernel" if dso == "[kernel.kallsyms]" else "user"


def compare(base: dict[tuple[str, str], float], probed: dict[tuple[str, str], float], top: int) -> dict[str, Any]:
    """Per-request change of each group and the ``top`` symbols that grew most (µs)."""
    delta = {k: probed.get(k, 0.0) - base.get(k, 0.0) for k in set(base) | set(probed)}
    groups: dict[str, float] = {"bpf_programs": 0.0, "kernel": 0.0, "user": 0.0}
    for k, d in delta.items():
        groups[group(k)] += d
    grew = sorted(delta.items(), key=lambda kv: -kv[1])[:top]
    return {
        "delta_us_per_request": {g: round(v, 2) for g, v in groups.items()},
        "top_symbols_us_per_request": [
            {"symbol": k[1], "where": group(k), "untraced": round(base.get(k, 0.0), 2),
             "probe": round(probed.get(k, 0.0), 2), "delta": round(d, 2)}
            for k, d in grew
        ],
    }


def measure(profile: str, seconds: float, rounds: int, use_perf: bool, tmp: Path, top: int = 12) -> dict[str, Any]:
    from bench.overhead import Server, run_wrk

    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if use_perf and not shutil.which("perf"):
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    server = Server(profile, 50, otel=False)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    result: dict[str, Any] = {"profile": profile, "seconds": seconds, "rounds": rounds}
    try:
        run_wrk(server.port, profile, 1, 8, tmp)  # warm-up
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                runs[mode].append(one_run(server, mode, profile, seconds, tmp, f"{mode}-{r}"))
        for key in runs["untraced"][0]:
            if key == "requests":
                continue
            means = {m: statistics.fmean(x[key] for x in runs[m]) for m in MODES}
            result[key] = {m: round(v, 3) for m, v in means.items()}
            result[key]["probe/untraced"] = round(means["probe"] / means["untraced"], 4) if means["untraced"] else None
        result["server_cpu_us_per_request_added"] = round(
            result["server_cpu_us_per_request"]["probe"] - result["server_cpu_us_per_request"]["untraced"], 2)
        result["requests"] = {m: sum(int(x["requests"]) for x in runs[m]) for m in MODES}
        if use_perf:
            split = {}
            for mode in MODES:
                data = tmp / f"perf-{mode}.data"
                run = one_run(server, mode, profile, seconds, tmp, f"perf-{mode}", perf_out=data)
                split[mode] = split_us(symbol_samples(data, server.proc.pid), run["server_cpu_us_per_request"])
            result["perf"] = compare(split["untraced"], split["probe"], top)
    finally:
        server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("json", "sse"), default="sse")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=6, help="alternating untraced/probe pairs")
    ap.add_argument("--perf", action="store_true", help="one more pair, sampled with perf, split by symbol")
    ap.add_argument("--top", type=int, default=12, help="symbols listed with --perf")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    require_root()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="infersight-server-cost-"))
    try:
        print_result(measure(a.profile, a.seconds, a.rounds, a.perf, tmp, a.top), a.json, 34)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
