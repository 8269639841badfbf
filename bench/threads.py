"""The agent's CPU per request, thread by thread, under load.

    python -m bench.threads --profile {sse,json} --seconds N [--chunks K] [--connections C] [--json]

Starts the benchmark server (pinned to the first core, as in ``bench.overhead``) and
``infersight run --pid SERVER``, waits until both capture modules are in place, then reads
the scheduler time (``/proc/PID/task/TID/schedstat``) and voluntary context switches of
each of the agent's threads before and after N seconds of wrk (on the second core). It
prints, for each thread by the name the kernel shows (the pipeline's threads name
themselves ``infersight-drai``, ``infersight-asse``, ``infersight-disc``; the others show the
process's name), its CPU per request, per second and its wake-ups per second, and the
total per request over all of them.

One traced run, no untraced rounds and no throughput ratio: the figure to compare two
builds by, run alternately, and to see where live CPU goes (ring buffer drain, assembly,
the rest) next to ``bench.stages``'s replay.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import print_result, require_root
from bench.overhead import Agent, Server, run_wrk, thread_stats


def per_thread(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]], seconds: float,
               requests: int) -> list[dict[str, Any]]:
    """What each thread spent between two readings, by kernel name (threads of one name
    summed), the costliest first."""
    by_name: dict[str, list[float]] = {}
    for tid, (name, ns, sw) in after.items():
        _, ns0, sw0 = before.get(tid, (name, 0, 0))
        acc = by_name.setdefault(name, [0.0, 0.0, 0.0])
        acc[0] += ns - ns0
        acc[1] += sw - sw0
        acc[2] += 1
    rows = [
        {
            "name": name,
            "threads": int(n),
            "cpu_us_per_request": round(ns / 1e3 / requests, 2) if requests else None,
            "cpu_ms_per_s": round(ns / 1e6 / seconds, 3),
            "wakeups_per_s": round(sw / seconds, 1),
        }
        for name, (ns, sw, n) in by_name.items()
    ]
    return sorted(rows, key=lambda r: -r["cpu_ms_per_s"])


def measure(profile: str, seconds: float, chunks: int, conns: int, tmp: Path) -> dict[str, Any]:
    server = Server(profile, chunks, otel=False)
    try:
        agent = Agent(server.proc.pid, tmp / "agent.log")
        try:
            time.sleep(1.0)  # past the attach's own work (seeding, the first rescan)
            before, t0 = thread_stats(agent.proc.pid), time.monotonic()
            rps, requests = run_wrk(server.port, profile, seconds, conns, tmp)
            after, t1 = thread_stats(agent.proc.pid), time.monotonic()
        finally:
            agent.stop()
    finally:
        server.stop()
    rows = per_thread(before, after, t1 - t0, requests)
    total_ns = sum(after[t][1] - before.get(t, ("", 0, 0))[1] for t in after)
    return {
        "profile": profile,
        "chunks": chunks if profile == "sse" else None,
        "seconds": round(t1 - t0, 2),
        "connections": conns,
        "requests": requests,
        "requests_per_s": round(rps, 1),
        "agent_cpu_us_per_request": round(total_ns / 1e3 / requests, 2) if requests else None,
        "threads": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("sse", "json"), default="sse")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the load")
    ap.add_argument("--chunks", type=int, default=50, help="chunks per streamed response (sse)")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    require_root()
    with tempfile.TemporaryDirectory(prefix="infersight-threads-") as d:
        out = measure(args.profile, args.seconds, args.chunks, args.connections, Path(d))
    print_result(out, args.json, 24)
    return 0


if __name__ == "__main__":
    sys.exit(main())
