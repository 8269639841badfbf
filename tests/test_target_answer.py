"""The probe's target filter remembers its last answer per CPU (``target_answer`` in
probes/sockets.bpf.c); every change to the target table, from user space or from the
kernel's fork and exit programs, makes it ask again. Real eBPF, a real server: its
connections are traced from the moment it becomes a target, and no longer once it
stops being one, although the filter had just answered for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from probes.socket_events import DataEvent, Decoder, unpack
from probes.sockets import SocketProbe, SocketProbeConfig
from tests.harness import free_port, wait_for

pytestmark = pytest.mark.ebpf

# one request per connection (HTTP/1.0): each accept asks the filter
SERVER = ("import http.server, sys\n"
          "class H(http.server.BaseHTTPRequestHandler):\n"
          "    def do_GET(self):\n"
          "        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers()\n"
          "        self.wfile.write(b'ok')\n"
          "    def log_message(self, *a): pass\n"
          "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


@pytest.fixture
def pinned() -> Iterator[tuple[int, int]]:
    """The server on one CPU and this process (the client, the drain) on another, where there
    are two: the server's syscalls are then the last the filter answered on its CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    mine = set(cpus)
    server_cpu = cpus[0]
    if len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus[1:]))
    try:
        yield server_cpu, len(cpus)
    finally:
        os.sched_setaffinity(0, mine)


def test_a_server_is_traced_from_when_it_becomes_a_target_until_it_stops(pinned: tuple[int, int]) -> None:
    server_cpu, _ = pinned
    records: list[bytes] = []
    probe = SocketProbe(SocketProbeConfig(), on_records=lambda b: records.extend(unpack(b)))
    port = free_port()
    server = subprocess.Popen(["taskset", "-c", str(server_cpu), sys.executable, "-c", SERVER, str(port)])
    dec = Decoder(probe.config.layout)

    def get() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"ok"

    def requests_seen() -> int:
        """The server's request reads delivered so far (the first read of each connection)."""
        probe.drain(0)
        events = [dec.decode(r) for r in records]
        return sum(1 for e in events if isinstance(e, DataEvent) and e.tgid == server.pid and e.index == 0
                   and e.head.startswith(b"GET "))

    def serves() -> bool:
        try:
            get()
        except OSError:
            return False
        return True

    try:
        wait_for(serves, timeout=20, what="the server to answer")
        for _ in range(3):  # the filter answers no for the server, and remembers it
            get()
        time.sleep(0.2)
        assert requests_seen() == 0
        probe.add_target(server.pid)
        for _ in range(3):
            get()
        wait_for(lambda: requests_seen() >= 3, timeout=5, what="the new target's requests")
        assert requests_seen() == 3
        probe.remove_target(server.pid)
        for _ in range(3):
            get()
        time.sleep(0.2)
        assert requests_seen() == 3  # none after the removal
    finally:
        server.kill()
        server.wait(5)
        probe.close()

