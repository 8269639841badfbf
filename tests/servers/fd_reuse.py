"""A threaded server on bare sockets that closes a connection where the probe's
close program does not look: one thread accepts, each connection is served by
a thread of its own, and every response says which fd it was served on.

Routes (HTTP/1.1, keep-alive):
- ``GET /where`` (any other path too): ``{"fd": N}`` with a content length;
- ``GET /vanish``: a close-delimited SSE stream of ``events`` events (query
  ``?events=K``, default 8), one write each, after which the socket is closed
  with ``close_range`` (a close the probe's close programs never see); its
  fd in the ``x-fd`` header.

Run: python -m tests.servers.fd_reuse PORT
"""

from __future__ import annotations

import ctypes
import json
import socket
import sys
import threading
from urllib.parse import parse_qs, urlsplit

libc = ctypes.CDLL(None, use_errno=True)


def close_range(fd: int) -> None:
    if libc.close_range(ctypes.c_uint(fd), ctypes.c_uint(fd), ctypes.c_int(0)) != 0:
        raise OSError(ctypes.get_errno(), "close_range")


def serve(conn: socket.socket) -> None:
    pending = b""
    while True:
        while b"\r\n\r\n" not in pending:
            data = conn.recv(65536)
            if not data:
                conn.close()
                return
            pending += data
        head, _, pending = pending.partition(b"\r\n\r\n")
        url = urlsplit(head.decode().split("\r\n")[0].split(" ")[1])
        if url.path == "/vanish":
            events = int(parse_qs(url.query).get("events", ["8"])[0])
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"x-fd: %d\r\n\r\n" % conn.fileno())
            for i in range(events):
                conn.sendall(b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i)
            fd = conn.detach()
            close_range(fd)
            return
        body = json.dumps({"fd": conn.fileno()}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))


def main() -> None:
    port = int(sys.argv[1])
    with socket.create_server(("127.0.0.1", port)) as listener:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
