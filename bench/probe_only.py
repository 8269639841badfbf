"""The socket probe alone: attached to ``--pid``, its ring buffer drained and
discarded. The overhead benchmark runs it to separate the kernel-side cost of
tracing from the agent's user-space work (parsing, assembly, export).

Run (root): ``python -m bench.probe_only --pid P``; prints "attached to 1 target(s)" when ready.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from agent.cli import SYSCALL_ARGS, exit_args_option
from probes.sockets import SocketProbe, SocketProbeConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--syscall-args", choices=SYSCALL_ARGS, default="auto")
    a = ap.parse_args(argv)
    seen = 0
    probe = SocketProbe(SocketProbeConfig(exit_args=exit_args_option(a.syscall_args)), on_records=lambda _: None)
    probe.add_target(a.pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("attached to 1 target(s) in 0s", flush=True)
    probe.start_h2()
    h2_told = False
    while not stop.is_set():
        seen += probe.drain(50)
        if not h2_told and probe.h2_ready.is_set():
            print("HTTP/2 capture ready", flush=True)
            h2_told = True
    probe.close()
    print(f"records drained: {seen}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
