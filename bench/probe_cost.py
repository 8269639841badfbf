"""The kernel side of tracing: each BPF program's own run time under load.

    python -m bench.probe_cost --profile {json,sse} --seconds N [--json]

Starts the overhead benchmark's uvicorn server (pinned to CPU 0), attaches the
socket probe to it with its records drained and discarded (as
``bench.probe_only`` does, with the HTTP/2 walk loaded), turns on ``kernel.bpf_stats_enabled`` for the
length of one wrk run (CPU 1) and reads every program's ``run_time_ns`` and
``run_cnt`` from its ``/proc/self/fdinfo`` entry before and after. The setting
is put back as it was.

Printed: per program, calls and nanoseconds per call; the programs' total run
time per request; and the server's own CPU time per request over the same
run. The run-time counters are per program, not per CPU, so the total also
holds the programs' runs on wrk's syscalls (on CPU 1, turned away by the
target filter): ``bpf_share_of_server_cpu`` is an upper bound on the share of
the server's CPU spent in the probes' programs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from agent.cli import SYSCALL_ARGS, exit_args_option
from bench import print_result, require_root

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_run(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind ``fd``, from this process's fdinfo."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def program_stats(funcs: dict[Any, Any]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of each loaded program, read from this process's fdinfo."""
    out: dict[str, tuple[int, int]] = {}
    for name, fn in funcs.items():
        try:
            stats = program_run(fn.fd)
        except OSError:
            continue
        out[name.decode() if isinstance(name, bytes) else str(name)] = stats
    return out


def measure(profile: str, seconds: float, tmp: Path, exit_args: bool | None = None) -> dict[str, Any]:
    from bench.overhead import Server, cpu_seconds, run_wrk
    from probes.sockets import SocketProbe, SocketProbeConfig

    drained = [0]
    probe = SocketProbe(SocketProbeConfig(exit_args=exit_args), on_records=lambda _: None)
    server = Server(profile, 50, otel=False)
    stop = threading.Event()
    previous = STATS.read_text().strip()
    try:
        probe.add_target(server.proc.pid)
        probe.start_h2()  # as the agent runs: the HTTP/2 walk loaded beside the capture
        if not probe.wait_h2():
            raise RuntimeError("the HTTP/2 capture did not load")

        def drain() -> None:
            while not stop.is_set():
                drained[0] += probe.drain(50)

        t = threading.Thread(target=drain, name="drain")
        t.start()
        try:
            STATS.write_text("1")
            before = program_stats(probe.bpf.funcs)
            cpu0 = cpu_seconds(server.proc.pid)
            rps, requests = run_wrk(server.port, profile, seconds, 8, tmp)
            cpu1 = cpu_seconds(server.proc.pid)
            after = program_stats(probe.bpf.funcs)
        finally:
            STATS.write_text(previous)
            stop.set()
            t.join()
    finally:
        probe.close()
        server.stop()
    programs = {}
    total_ns = 0
    for name, (ns, cnt) in after.items():
        dns, dcnt = ns - before.get(name, (0, 0))[0], cnt - before.get(name, (0, 0))[1]
        if dcnt:
            programs[name] = {"calls": dcnt, "ns_per_call": round(dns / dcnt), "ms": round(dns / 1e6, 1)}
            total_ns += dns
    if not requests:
        raise RuntimeError("wrk completed no request")
    server_us = (cpu1 - cpu0) * 1e6 / requests
    probe_us = total_ns / 1e3 / requests
    return {
        "profile": profile,
        "seconds": seconds,
        "syscall_args": "exit" if probe.exit_args else "entry",
        "requests": requests,
        "requests_per_s": rps,
        "records_drained": drained[0],
        "programs": dict(sorted(programs.items(), key=lambda kv: -kv[1]["ms"])),
        "bpf_us_per_request": round(probe_us, 2),
        "server_cpu_us_per_request": round(server_us, 1),
        "bpf_share_of_server_cpu": round(probe_us / server_us, 4) if server_us else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("json", "sse"), default="json")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--syscall-args", choices=SYSCALL_ARGS, default="auto",
                    help="where the data syscalls' arguments are read (agent option --syscall-args)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    require_root()
    if not STATS.exists():
        raise SystemExit(f"{STATS} is missing: this kernel cannot count BPF run time")
    with tempfile.TemporaryDirectory(prefix="infersight-probe-cost-", ignore_cleanup_errors=True) as tmp:
        result = measure(a.profile, a.seconds, Path(tmp), exit_args_option(a.syscall_args))
    print_result(result, a.json, 28)
    return 0


if __name__ == "__main__":
    sys.exit(main())
