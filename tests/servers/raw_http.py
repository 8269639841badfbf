"""A third server for end-to-end tests, on bare sockets, exercising the
syscalls the uvicorn and aiohttp servers do not: it takes connections with
``accept`` (theirs use ``accept4``), reads requests with ``recvmsg`` into two
buffers, answers with ``sendmsg`` over several iovecs (head and body, or chunk
header, data and CRLF), and serves a file with ``sendfile``. One connection at
a time, keep-alive.

Routes:
- ``POST /v1/chat/completions``: an OpenAI-style SSE stream of ``max_tokens``
  chunks (chunked encoding), each chunk one ``sendmsg`` of three iovecs, after
  ``lead`` events without output (a role, then empty deltas; none by default);
  with ``group`` k, k chunks in each ``sendmsg``, as a server whose socket backed
  up writes the events it queued: in one buffer, or (``joined`` false) as their
  3·k iovecs, as Python 3.12's asyncio sends its queue; with ``end`` "with-last",
  the [DONE] event and the last chunk in the last tokens' ``sendmsg``;
- ``GET /file``: a file sent with ``sendfile`` after a ``sendmsg`` head.

Writes timing lines like agent.demo_server to INFERSIGHT_DEMO_TIMINGS.
Run: python -m tests.servers.raw_http PORT
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import tempfile
import time

TIMINGS = os.environ.get("INFERSIGHT_DEMO_TIMINGS")
FILE_BYTES = 300_000


def log(entry: dict) -> None:
    if TIMINGS:
        with open(TIMINGS, "a") as f:
            f.write(json.dumps(entry) + "\n")


def read_request(conn: socket.socket, pending: bytearray) -> tuple[bytes, bytes, int] | None:
    """(request line, body, monotonic ns when its first byte arrived) or None at EOF."""
    t0 = 0
    while b"\r\n\r\n" not in pending:
        a, b = bytearray(16), bytearray(4096)
        n, _, _, _ = conn.recvmsg_into([a, b])
        if n == 0:
            return None
        t0 = t0 or time.monotonic_ns()
        pending += (a + b)[:n]
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    pending[:] = rest[length:]
    return head.split(b"\r\n")[0], rest[:length], t0 or time.monotonic_ns()


def serve(conn: socket.socket, file_fd: int) -> None:
    pending = bytearray()
    while True:
        req = read_request(conn, pending)
        if req is None:
            return
        line, body, t0 = req
        _method, target, _ = line.decode().split(" ", 2)
        entry: dict = {"path": target, "t_start": t0, "chunks": []}
        if target == "/v1/chat/completions":
            opts = json.loads(body or b"{}")
            n = int(opts.get("max_tokens", 5))
            conn.sendmsg([b"HTTP/1.1 200 OK\r\n", b"content-type: text/event-stream\r\n",
                          b"transfer-encoding: chunked\r\n\r\n"])
            for i in range(int(opts.get("lead", 0))):
                time.sleep(float(opts.get("tpot_s", 0.002)))
                data = b"data: " + json.dumps({"model": opts.get("model", "raw"), "choices": [
                    {"index": 0, "delta": {"content": ""} if i else {"role": "assistant"},
                     "finish_reason": None}]}).encode() + b"\n\n"
                entry["chunks"].append(["lead", time.monotonic_ns()])
                conn.sendmsg([b"%x\r\n" % len(data), data, b"\r\n"])
            group = max(1, int(opts.get("group", 1)))
            for first in range(0, n, group):
                time.sleep(float(opts.get("tpot_s", 0.002)))
                iov: list[bytes] = []
                for i in range(first, min(n, first + group)):
                    data = b"data: " + json.dumps({"model": opts.get("model", "raw"), "choices": [
                        {"index": 0, "delta": {"content": f"w{i}"}, "finish_reason": None}]}).encode() + b"\n\n"
                    iov += [b"%x\r\n" % len(data), data, b"\r\n"]
                    entry["chunks"].append(["token", time.monotonic_ns()])
                if first + group >= n and opts.get("end") == "with-last":
                    # [DONE] and the last chunk go with the last tokens: a queue sent at once
                    done = b"data: [DONE]\n\n"
                    iov += [b"%x\r\n" % len(done), done, b"\r\n", b"0\r\n\r\n"]
                    entry["t_end"] = time.monotonic_ns()
                conn.sendmsg([b"".join(iov)] if opts.get("joined", True) else iov)
            if n and opts.get("end") == "with-last":
                log(entry)
                continue
            done = b"data: [DONE]\n\n"
            end = opts.get("end")
            if end == "after-crlf":  # the last chunk's "0\r\n" line with [DONE]'s chunk, its CRLF alone
                conn.sendmsg([b"%x\r\n" % len(done), done, b"\r\n", b"0\r\n"])
                entry["t_end"] = time.monotonic_ns()
                conn.sendmsg([b"\r\n"])
            elif end == "split":  # "0\r\n", then its CRLF (cpp-httplib: llama.cpp's server)
                conn.sendmsg([b"%x\r\n" % len(done), done, b"\r\n"])
                conn.sendmsg([b"0\r\n"])
                entry["t_end"] = time.monotonic_ns()
                conn.sendmsg([b"\r\n"])
            else:
                conn.sendmsg([b"%x\r\n" % len(done), done, b"\r\n"])
                entry["t_end"] = time.monotonic_ns()
                conn.sendmsg([b"0\r\n\r\n"])
        elif target == "/file":
            conn.sendmsg([b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n",
                          b"content-length: %d\r\n\r\n" % FILE_BYTES])
            sent = 0
            while sent < FILE_BYTES:  # from an explicit offset: the fd's own position never moves
                sent += os.sendfile(conn.fileno(), file_fd, sent, FILE_BYTES - sent)
            entry["t_end"] = time.monotonic_ns()
        else:
            conn.sendmsg([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"ok"])
            entry["t_end"] = time.monotonic_ns()
        if target != "/health":
            log(entry)


def main() -> None:
    port = int(sys.argv[1])
    # unlinked at once: the server is killed, not asked to stop, and the open fd keeps the file
    fd, path = tempfile.mkstemp(prefix="infersight-sendfile-")
    os.unlink(path)
    os.write(fd, os.urandom(FILE_BYTES))
    srv = socket.create_server(("127.0.0.1", port))
    libc = ctypes.CDLL(None, use_errno=True)
    while True:
        # accept(2) itself, where Python's socket.accept and the event loops call accept4
        peer = ctypes.create_string_buffer(128)
        peer_len = ctypes.c_uint32(len(peer))
        conn_fd = libc.accept(srv.fileno(), peer, ctypes.byref(peer_len))
        if conn_fd < 0:
            raise OSError(ctypes.get_errno(), "accept")
        conn = socket.socket(fileno=conn_fd)
        with conn:
            try:
                serve(conn, fd)
            except (ConnectionError, OSError):
                pass


if __name__ == "__main__":
    main()
