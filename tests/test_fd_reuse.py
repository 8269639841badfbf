"""A connection's fd number taken by a new connection before the probe saw the
old one close (``new_conn`` and ``close_conn`` in probes/sockets.bpf.c).

Two ways it happens, both with real eBPF and a real threaded server
(tests/servers/fd_reuse.py), with the syscalls' arguments read at exit and
saved at entry:

- the old connection was closed in a way the close programs never see
  (``close_range``): the new connection ends the old one's state then, and
  its stream is recorded, not left waiting;
- with the arguments read at exit, a close whose exit has not run yet while
  another thread's accept takes the fd number the kernel has just let go.
  A BPF program of the test's own, attached ahead of the agent's on close's
  exit, holds that close there for 60 ms to open the window wide. The late
  close must not end the new connection: its requests after the close are
  recorded too.
"""

from __future__ import annotations

import ctypes
import json
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.targets import TargetConfig
from probes.sockets import SocketProbeConfig, exit_args_supported
from tests.harness import Server, free_port, running_agent, start_server, wait_for

pytestmark = pytest.mark.ebpf

ARG_MODES = [pytest.param(True, id="args-at-exit"), pytest.param(False, id="args-at-entry")]

HOLD_NS = 60_000_000

# holds one thread's close exits for cfg[1] ns: a loop of clock reads, chained by tail calls
HOLDER = r"""
BPF_ARRAY(cfg, u64, 2);             /* 0: the thread id, 1: ns to hold */
BPF_PERCPU_ARRAY(until, u64, 1);
BPF_PROG_ARRAY(next, 1);
int spin(void *ctx) {
    u32 z = 0;
    u64 *u = until.lookup(&z);
    if (!u)
        return 0;
    for (int i = 0; i < 40000; i++)
        if (bpf_ktime_get_ns() >= *u)
            return 0;
    next.call(ctx, 0);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_close) {
    u32 z = 0, o = 1;
    u64 *tid = cfg.lookup(&z), *ns = cfg.lookup(&o), *u = until.lookup(&z);
    if (!tid || !ns || !u || !*tid || (u32)bpf_get_current_pid_tgid() != *tid)
        return 0;
    *u = bpf_ktime_get_ns() + *ns;
    next.call(args, 0);
    return 0;
}
"""


def arg_mode(exit_args: bool) -> SocketProbeConfig:
    if exit_args and not exit_args_supported()[0]:
        pytest.skip(f"syscall arguments cannot be read at exit here: {exit_args_supported()[1]}")
    return SocketProbeConfig(exit_args=exit_args)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    srv = start_server([sys.executable, "-m", "tests.servers.fd_reuse", str(port)], port, tmp_path, "fd-reuse")
    yield srv
    srv.stop()


@contextmanager
def close_holder() -> Iterator[object]:
    from bcc import BPF

    bpf = BPF(text=HOLDER.encode())
    try:
        bpf[b"next"][ctypes.c_int(0)] = ctypes.c_int(bpf.load_func(b"spin", BPF.TRACEPOINT).fd)
        yield bpf[b"cfg"]
    finally:
        bpf.cleanup()


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


def where(s: socket.socket, close: bool = False) -> dict[str, int]:
    s.sendall(b"GET /where HTTP/1.1\r\nhost: x\r\n%s\r\n" % (b"connection: close\r\n" if close else b""))
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
            s = connect_until_fd(server.port, vanished_fd, held)
            # past the window in which, with the arguments read at exit, another thread's close
            # of this connection is taken for the vanished one's late close (100 ms)
            time.sleep(0.15)
            s.close()
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


@pytest.mark.parametrize("exit_args", ARG_MODES)
def test_a_late_close_exit_does_not_end_the_connection_that_took_its_fd(
        server: Server, exit_args: bool) -> None:
    with close_holder() as holder, \
            running_agent(TargetConfig(pids=(server.pid,)), probe=arg_mode(exit_args)) as a:
        probe = a.pipeline.probe
        assert probe is not None
        before = probe.counters()
        mark = a.mark()
        old = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        first = where(old)
        # the thread serving the old connection will close it, and stay in close's exit a while
        holder[ctypes.c_int(0)] = ctypes.c_uint64(first["tid"])  # type: ignore[index]
        holder[ctypes.c_int(1)] = ctypes.c_uint64(HOLD_NS)  # type: ignore[index]
        where(old, close=True)
        old.close()
        time.sleep(0.005)
        t0 = time.monotonic()
        held: list[socket.socket] = []
        try:
            # a connection takes the number the held close has let go
            new = connect_until_fd(server.port, first["fd"], held)
            assert time.monotonic() - t0 < HOLD_NS / 1e9, "the new connection came after the held close"
            time.sleep(2 * HOLD_NS / 1e9)
            assert where(new)["fd"] == first["fd"]
            new.close()
        finally:
            for h in held:
                h.close()
        n = 4 + len(held)
        recs = a.wait_records(mark, n)
        time.sleep(0.3)
        assert [r.path for r in a.since(mark)] == ["/where"] * n
        assert all(r.status_code == 200 for r in recs)
        after = wait_for(lambda: (c := probe.counters())["closed"] >= before["closed"] + 1 + len(held) and c, 5)
        assert after["conns"] - before["conns"] == 2 + len(held)
        # at exit the new connection found the old one's state still there; at entry it was gone
        assert after["replaced"] - before["replaced"] == (1 if exit_args else 0)
        assert after["closed"] - before["closed"] == (1 if exit_args else 2) + len(held)
        a.pipeline._read_map_fill()
        assert a.metrics.get("infersight.bpf.map.evictions", (("map", "conns"),)) == 0
