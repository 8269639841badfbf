"""A connection's fd number taken by a new connection before the probe saw the
old one close (``new_conn`` in probes/sockets.bpf.c): the old connection was
closed in a way the close program never sees (``close_range``; also dup2 or
io_uring). The new connection ends the old one's state then: its stream is
recorded (not left waiting for a close that never comes), and the
replacement is counted (not taken for an LRU eviction). Real eBPF, a real
threaded server (tests/servers/fd_reuse.py), with the syscalls' arguments
read at exit and saved at entry.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.targets import TargetConfig
from tests.harness import ARG_MODES, Server, arg_mode, free_port, running_agent, start_server, wait_for

pytestmark = pytest.mark.ebpf

@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    srv = start_server([sys.executable, "-m", "tests.servers.fd_reuse", str(port)], port, tmp_path, "fd-reuse")
    yield srv
    srv.stop()


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one response with a content length, or of one delimited by the close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "closed before a response head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is None or len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            assert length is None, "closed inside a response body"
            break
        body += chunk
    return head, body


def where(s: socket.socket) -> dict[str, int]:
    s.sendall(b"GET /where HTTP/1.1\r\nhost: x\r\n\r\n")
    return json.loads(read_response(s)[1])


def connect_until_fd(port: int, fd: int, held: list[socket.socket]) -> socket.socket:
    """A connection the server holds on fd number ``fd``. A blocking accept takes the lowest
    free number when it starts waiting, before its client comes: the connections before it
    (at most a few) stay open in ``held``, so that each next accept starts from a lower one."""
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if where(s)["fd"] == fd:
            return s
        held.append(s)
    raise AssertionError(f"no connection got fd {fd}")


@pytest.mark.parametrize("exit_args", ARG_MODES)
def test_a_close_the_probe_never_saw_ends_the_connection_when_its_fd_is_taken(
        server: Server, exit_args: bool) -> None:
    with running_agent(TargetConfig(pids=(server.pid,)), probe=arg_mode(exit_args)) as a:
        probe = a.pipeline.probe
        assert probe is not None
        before = probe.counters()
        mark = a.mark()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /vanish HTTP/1.1\r\nhost: x\r\n\r\n")
            head, body = read_response(s)
        vanished_fd = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"x-fd:")))
        assert body.count(b"data:") == 8
        time.sleep(0.3)
        # the stream ends with its connection, which closed where the probe does not look
        assert a.since(mark) == []
        held: list[socket.socket] = []
        try:
            connect_until_fd(server.port, vanished_fd, held).close()
        finally:
            for h in held:
                h.close()
        recs = a.wait_records(mark, 2 + len(held))
        assert sorted(r.path for r in recs) == ["/vanish"] + ["/where"] * (1 + len(held))
        (stream,) = [r for r in recs if r.path == "/vanish"]
        assert stream.status_code == 200 and stream.streaming and stream.output_events == 8
        after = wait_for(lambda: (c := probe.counters())["closed"] >= before["closed"] + 1 + len(held) and c, 5)
        assert after["replaced"] - before["replaced"] == 1
        assert after["conns"] - before["conns"] == 2 + len(held)
        a.pipeline._read_map_fill()
        assert a.metrics.get("infersight.bpf.map.evictions", (("map", "conns"),)) == 0
